"""lib/runtime.py: one error family, the run-folder rule, Ctrl-C saves, launcher settings, world size, trackers.

Most runs call tests/mini_train.py's main in this process; the signal and launcher tests start it
as a subprocess (slow: a few seconds of start-up each).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lib.checkpoint import WeightFileError
from lib.config import ConfigError
from lib.errors import DataError, ModelError, UserError
from lib.logging import NonFiniteLossError
from lib.runtime import cli_main, make_accelerator, world_size_warning
from tests import mini_train
from tests.conftest import ROOT

MINI = str(ROOT / "tests" / "mini_train.py")
BASE = ["tracker=none", "train.log_interval=1", "optim.lr=0.05"]


def mini(out, *extra):
    """Run mini_train in-process through cli_main, as `python tests/mini_train.py ...` would."""
    return cli_main(mini_train.main)(BASE + [f"output_dir={out}", *extra])


def steps(path):
    return [json.loads(x)["step"] for x in path.read_text().splitlines()]


@pytest.mark.parametrize("exc", [UserError("bad"), DataError("bad"), ModelError("bad"), WeightFileError("bad"),
                                 NonFiniteLossError("bad"), ConfigError("bad"), FileNotFoundError("bad")])
def test_user_errors_are_one_family_of_one_line_exits(exc, capsys, monkeypatch):
    def fail():
        raise exc

    monkeypatch.delenv("DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        cli_main(fail)()
    assert e.value.code == 1
    assert capsys.readouterr().err == "error: bad\n"
    monkeypatch.setenv("DEBUG", "1")
    with pytest.raises(type(exc)):
        cli_main(fail)()
    # the old bases still hold for code that catches them
    assert isinstance(WeightFileError("x"), ValueError) and isinstance(NonFiniteLossError("x"), FloatingPointError)
    from lib.runtime import UserError as RuntimeUserError

    assert RuntimeUserError is UserError


def test_new_run_into_a_finished_run_refuses_resume_continues_overwrite_starts_afresh(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["train.eval_interval=2", "train.ckpt_interval=2", "train.max_keep_ckpts=5"]
    mini(run, *common, "train.total_steps=4")
    before = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    # the scenario: the same command again into the same folder
    with pytest.raises(SystemExit):
        mini(run, *common, "train.total_steps=2")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: output_dir {run} already holds a run")
    assert "resume=auto" in err[0] and "overwrite=true" in err[0]
    assert (run / "metrics.jsonl").read_bytes() == before  # untouched
    # resume=auto continues: no repeated steps, a mark in log.txt
    mini(run, *common, "train.total_steps=6", "resume=auto")
    assert steps(run / "metrics.jsonl") == [2, 4, 6]
    assert steps(run / "train.jsonl") == [1, 2, 3, 4, 5, 6]
    assert f"resumed at step 4 from {run / 'checkpoints' / 'step_4'}" in (run / "log.txt").read_text()
    # eval_only into the folder: no refusal, nothing deleted, the run's config.yaml kept
    cfg_before = (run / "config.yaml").read_text()
    mini(run, "eval_only=true", f"load_from={run / 'checkpoints' / 'best'}")
    assert (run / "config.yaml").read_text() == cfg_before and (run / "config_eval_only.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "step_2", "step_4", "step_6"]
    # overwrite=true: a fresh run, nothing of the old one left
    mini(run, *common, "train.total_steps=2", "overwrite=true")
    assert steps(run / "metrics.jsonl") == [2] and steps(run / "train.jsonl") == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "step_2"]
    assert "resumed" not in (run / "log.txt").read_text() and not (run / "config_eval_only.yaml").exists()


def test_resume_drops_the_records_after_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    mini(run, "train.total_steps=6", "train.eval_interval=2", "train.ckpt_interval=4")
    assert steps(run / "metrics.jsonl") == [2, 4, 6]
    # a kill after step 6 was logged but before its checkpoint landed: the last one is step_4
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_6")
    mini(run, "train.total_steps=6", "train.eval_interval=2", "train.ckpt_interval=4", "resume=auto")
    assert steps(run / "metrics.jsonl") == [2, 4, 6]
    assert steps(run / "train.jsonl") == [1, 2, 3, 4, 5, 6]
    log = (run / "log.txt").read_text()
    assert log.count("---- resumed at step 4") == 1 and log.count("eval @ step 6") == 2


def test_failed_start_leaves_no_half_run_folder(tmp_path, capsys):
    new = tmp_path / "new"
    with pytest.raises(SystemExit):
        mini(new, "mini.fail_at_start=true")
    assert capsys.readouterr().err.strip() == "error: mini.fail_at_start: no data here"
    assert not new.exists()
    # a folder the user made (with their own file in it) is never removed
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit):
        mini(mine, "mini.fail_at_start=true")
    assert (mine / "notes.txt").read_text() == "keep"


def _start(out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DEBUG", None)
    return subprocess.Popen([sys.executable, MINI, *BASE, f"output_dir={out}", *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, out, n=1, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        path = out / "train.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no training step logged")


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, "train.total_steps=30", "train.eval_interval=10", "train.ckpt_interval=10", "mini.sleep=0.3")
    _wait_for_step(proc, out)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "SIGINT: stopping after this step" in stderr
    done = steps(out / "train.jsonl")
    n = done[-1]
    assert 1 <= n < 30 and done == list(range(1, n + 1))
    line = f"interrupted at step {n}; checkpoint saved to {out / 'checkpoints' / f'step_{n}'}; continue with resume=auto"
    assert line in stdout and line in (out / "log.txt").read_text()
    assert json.loads((out / "checkpoints" / f"step_{n}" / "trainer_state.json").read_text())["step"] == n
    mini(out, "train.total_steps=30", "train.eval_interval=10", "train.ckpt_interval=10", "resume=auto")
    assert steps(out / "train.jsonl") == list(range(1, 31))
    assert steps(out / "metrics.jsonl") == [10, 20, 30]


@pytest.mark.slow
def test_second_signal_exits_at_once(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, "train.total_steps=30", "mini.sleep=20")  # a step takes 20 s
    t0 = time.time()
    while not ((out / "log.txt").is_file() and "train: steps" in (out / "log.txt").read_text()):
        assert proc.poll() is None and time.time() - t0 < 120, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)  # in step 1's 20 s (a first signal before the loop starts ends the run at once, see below)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=15)
    assert time.time() - t0 < 5
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert "SIGINT again: exiting now without saving" in stderr


def test_launcher_settings_apply_unless_the_config_sets_them(tmp_path, monkeypatch):
    cfg = mini_train.parse_config(mini_train.MiniConfig, [f"output_dir={tmp_path}", "tracker=none"])
    assert cfg.mixed_precision == "" and cfg.train.grad_accum_steps == 0  # unset
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    acc = make_accelerator(cfg)
    assert acc.gradient_accumulation_steps == 4  # the launcher's
    cfg.train.grad_accum_steps = 2
    cfg.mixed_precision = "no"
    acc = make_accelerator(cfg)
    assert acc.gradient_accumulation_steps == 2
    assert "config train.grad_accum_steps=2 overrides the launcher's 4" in acc.run_notes
    assert "config mixed_precision=no overrides the launcher's bf16" in acc.run_notes
    assert acc.run_notes[-1].startswith("mixed precision: ")


def test_world_size_mismatch_warns_with_the_command_that_works():
    env = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    cmd = ["accelerate", "launch", "--cpu", "--num_processes", "4", "train_seg.py"]
    msg = world_size_warning(1, env, cmd)
    assert "4 processes were requested but this run has 1" in msg and "torchrun --nproc_per_node 4" in msg
    assert "torchrun --nproc_per_node 3" in world_size_warning(1, env, ["accelerate", "launch", "--num_processes=3"])
    assert world_size_warning(1, {"ACCELERATE_NUM_PROCESSES": "2"}, []).count("nproc_per_node 2") == 1
    assert world_size_warning(2, {**env, "WORLD_SIZE": "2"}, cmd) == ""  # torchrun: real processes
    assert world_size_warning(1, {}, []) == ""  # plain python


@pytest.mark.slow
def test_accelerate_launch_flags_are_honoured(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--mixed_precision", "bf16",
                        "--num_processes", "2", "--num_machines", "1", "--dynamo_backend", "no",
                        MINI, *BASE, f"output_dir={out}", "train.total_steps=2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "mixed precision: bf16" in log
    assert "2 processes were requested but this run has 1" in log
    assert "torchrun --nproc_per_node 2 mini_train.py" in log


@pytest.mark.parametrize("tracker", ["wandb", "aim"])
def test_missing_tracker_package_stops_at_start(tmp_path, capsys, tracker):
    import importlib.util

    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed")
    with pytest.raises(SystemExit):
        cli_main(mini_train.main)([f"output_dir={tmp_path / 'x'}", f"tracker={tracker}"])
    assert capsys.readouterr().err.strip() == f"error: tracker={tracker} needs the {tracker} package: pip install {tracker}"
    assert not (tmp_path / "x").exists()


def test_mlflow_tracker_logs_the_scalars_and_config(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 refuses a file store without it
    mini(tmp_path / "run", "tracker=mlflow", "train.total_steps=3", "train.eval_interval=3", "run_name=three" if
         hasattr(mini_train.MiniConfig(), "run_name") else "seed=0")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(getattr(mini_train.MiniConfig(), "project", "") or "mini")
    (run,) = client.search_runs([exp.experiment_id])
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    expected = [json.loads(x)["loss"] for x in (tmp_path / "run" / "train.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses == pytest.approx(expected)
    (score,) = client.get_metric_history(run.info.run_id, "val/score")
    assert score.step == 3 and score.value == pytest.approx(json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["score"])
    assert run.data.params["train.total_steps"] == "3" and run.data.params["optim.lr"] == "0.05"


def test_stop_handlers_stay_until_the_run_log_has_closed(tmp_path, monkeypatch):
    # a second Ctrl-C while close() draws the pictures / ends the trackers must still exit at once (130),
    # not raise KeyboardInterrupt: the handlers are put back only at the very end of close()
    import lib.logging
    from lib.logging import RunLog
    from lib.runtime import _on_signal, install_stop_handlers

    cfg = mini_train.parse_config(mini_train.MiniConfig, [f"output_dir={tmp_path}", "tracker=none"])
    log = RunLog(make_accelerator(cfg), tmp_path, 1)
    before = signal.getsignal(signal.SIGINT)
    seen = []
    monkeypatch.setattr(lib.logging, "plot_curves", lambda run_dir: seen.append(signal.getsignal(signal.SIGINT)))
    install_stop_handlers()
    log.close()
    assert seen == [_on_signal] and signal.getsignal(signal.SIGINT) is before
