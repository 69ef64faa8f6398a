"""train_seg.py: each bad input (issue 15 and the earlier ones) ends in exit code 1 and one line naming the cause.

In-process through cli_main (what `python train_seg.py ...` runs) with the error line read from stderr;
one subprocess checks the real exit code and the absence of a traceback.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import train_seg
from lib.runtime import cli_main
from tests import mini_train
from tests.conftest import ROOT

TINY = ["--config", "configs/seg/sample.yaml", "tracker=none", "data.scale=[120,90]", "data.crop_size=[64,64]",
        "train.num_workers=0", "train.log_interval=1", "train.batch_size=2"]


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("DEBUG", raising=False)  # DEBUG=1 would re-raise with the traceback


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """A 1-step B0 run on the sample: checkpoints/step_1 (with config.yaml) and best."""
    run = tmp_path_factory.mktemp("seg_errors") / "run"
    train_seg.main(TINY + [f"output_dir={run}", "train.total_steps=1", "train.eval_interval=1",
                           "train.ckpt_interval=1"])
    return run


def exit_of(capsys, *argv) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of `python train_seg.py ARGV` run in this process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(train_seg.main)(list(TINY) + list(argv))
    code = e.value.code
    err = capsys.readouterr().err
    if isinstance(code, str):  # parse_config's SystemExit("config error: ..."): Python prints it, exits 1
        err, code = err + code + "\n", 1
    return code, err.strip().splitlines()


def test_checkpoint_of_another_script_as_load_from(tmp_path, capsys):
    mini = tmp_path / "mini"
    mini_train.main(["tracker=none", f"output_dir={mini}", "train.total_steps=2", "train.eval_interval=2"])
    code, err = exit_of(capsys, f"output_dir={tmp_path / 'a'}", f"load_from={mini / 'checkpoints' / 'best'}")
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: {mini / 'checkpoints' / 'best'}: unrecognised SegFormer weight layout")
    assert err[0].endswith("(saved by mini_train.py, model Sequential)"), err[0]
    # a hand-made safetensors with foreign keys, no metadata
    foreign = tmp_path / "foreign.safetensors"
    save_file({"encoder.layer1.weight": torch.zeros(4, 4), "fc.bias": torch.zeros(4)}, str(foreign))
    code, err = exit_of(capsys, f"output_dir={tmp_path / 'b'}", f"load_from={foreign}")
    assert code == 1 and len(err) == 1 and err[0].startswith(f"error: {foreign}: unrecognised SegFormer weight layout")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # failed starts leave no folder


def test_resume_with_a_changed_variant_names_the_key(seg_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(seg_run, run)
    code, err = exit_of(capsys, f"output_dir={run}", "resume=auto", "model.variant=b1", "train.total_steps=2")
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: resume: checkpoint {run / 'checkpoints' / 'step_1'} was saved with "
                             "model.variant=b0, now b1 (size mismatch for "), err[0]
    assert len(err[0]) < 400


@pytest.mark.parametrize("extra, message", [
    (["train.bogus=1"], "config error: unknown config key 'train.bogus'"),
    (["data.root=/nonexistent/camvid"], "error: dataset root folder not found: /nonexistent/camvid"),
    (["load_from=/nonexistent/w.safetensors"], "error: weight file not found: /nonexistent/w.safetensors"),
    (["optim.lr=1e30", "sched.warmup_steps=0", "train.total_steps=3"], "error: non-finite loss at step"),
])
def test_bad_input_gives_one_line_error(tmp_path, capsys, extra, message):
    code, err = exit_of(capsys, f"output_dir={tmp_path / 'run'}", *extra)
    assert code == 1 and len(err) == 1 and err[0].startswith(message), err


@pytest.mark.parametrize("extra, line", [
    ("train.batch_size=0", "config error: train.batch_size: 0 is out of range (must be >= 1)"),
    ("optim.lr=nan", "config error: optim.lr: nan is out of range (must be a finite number > 0)"),
    ("model.drop_path_rate=1.5", "config error: model.drop_path_rate: 1.5 is out of range (must be a finite number in [0, 1])"),
    ("model.variant=b9", "config error: model.variant: 'b9' is not one of ['b0', 'b1', 'b2', 'b3', 'b4', 'b5']"),
    ("eval.stride=[0,341]", "config error: eval.stride[0]: 0 is out of range (must be >= 1)"),
])
def test_out_of_range_values_are_one_line(tmp_path, capsys, extra, line):
    code, err = exit_of(capsys, f"output_dir={tmp_path / 'run'}", extra)
    assert (code, err) == (1, [line])
    assert not (tmp_path / "run").exists()


def test_random_bytes_pth_is_not_a_weight_file(tmp_path, capsys):
    bad = tmp_path / "random.pth"
    bad.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                    .numpy().tobytes())
    for mode in ([], ["eval_only=true"]):  # fine-tuning and evaluation read it the same way
        code, err = exit_of(capsys, f"output_dir={tmp_path / 'run'}", f"load_from={bad}", *mode)
        assert code == 1 and len(err) == 1, err
        assert err[0].startswith(f"error: {bad} is not a weight file (cannot read weight file: "), err[0]


def test_command_line_exit_code_and_no_traceback(seg_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(seg_run, run)
    r = subprocess.run([sys.executable, "train_seg.py", *TINY, f"output_dir={run}", "resume=auto",
                        "model.variant=b1", "train.total_steps=2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "DEBUG"})
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    errors = [x for x in r.stderr.strip().splitlines() if "error" in x.lower()]
    assert errors == [r.stderr.strip().splitlines()[-1]], r.stderr[-2000:]
    assert errors[0].startswith("error: resume: checkpoint ") and "model.variant=b0, now b1" in errors[0]
