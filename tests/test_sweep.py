"""sweep.py on a toy objective (tests/toy_train.py): search, pruning, parallel workers, failures,
resume, folds, seeds, ensembles, report tables; kfold_indices splits; a real train_seg.py ensemble."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

import sweep
from lib.data.common import kfold_indices
from lib.runs import HOST, report_table
from lib.study import load_sweep, n_counted, open_study

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "tests" / "toy_train.py")


def make_sweep(tmp_path: Path, **kw) -> Path:
    (tmp_path / "base.yaml").write_text("tracker: none\ntrain: {total_steps: 3, eval_interval: 3}\n")
    spec = {"script": TOY, "config": str(tmp_path / "base.yaml"), "metric": "score", "trials": 4,
            "output_dir": str(tmp_path / "sweep"), "poll_s": 0.02, "pruner": {"name": "none"},
            "space": {"toy.x": {"type": "float", "low": -2, "high": 2}}} | kw
    path = tmp_path / "toy_sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def study_of(path: Path) -> optuna.Study:
    cfg, out = load_sweep(path)
    return open_study(cfg, out)


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def records(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_sweep_finds_optimum_region(tmp_path):
    path = make_sweep(tmp_path, trials=20, sampler={"name": "tpe", "seed": 0, "n_startup_trials": 8},
                      space={"toy.x": {"type": "uniform", "low": -2, "high": 2}, "toy.opt": ["a", "b"]})
    assert sweep.main(["run", str(path)]) == 0
    study = study_of(path)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 20
    best = study.best_trial
    # optimum: x = 0.3, opt = b: score -0.25 - 1/3 at step 3 (y = 0); a random trial lands in
    # |x - 0.3| < 0.5 with opt = b with probability 1/8
    assert abs(best.params["toy.x"] - 0.3) < 0.25 and best.params["toy.opt"] == "b"
    assert best.value > -0.25 - 1 / 3 - 0.06
    in_region = [abs(t.params["toy.x"] - 0.3) < 0.5 and t.params["toy.opt"] == "b" for t in trials[8:]]
    assert sum(in_region) >= 3  # the model's 12 trials, vs 1.5 expected at random
    # the objective is the run's own metrics.jsonl value; summary files are written
    assert best.value == max(r["score"] for r in records(best.user_attrs["run_dir"]))
    out = tmp_path / "sweep"
    rows = read_csv(out / "trials.csv")
    assert [int(r["trial"]) for r in rows] == list(range(20))
    assert float(rows[best.number]["score"]) == best.value
    assert yaml.safe_load((out / "best.yaml").read_text())["params"] == best.params
    assert (out / "history.png").stat().st_size > 1000 and (out / "importance.png").is_file()
    assert f"## Best: trial {best.number}" in (out / "summary.md").read_text()


def test_pruning_stops_a_clearly_worse_trial(tmp_path):
    path = make_sweep(tmp_path, trials=2, pruner={"name": "sha", "min_resource": 1, "reduction_factor": 2},
                      overrides=["train.total_steps=20", "train.eval_interval=2", "toy.sleep=0.05"],
                      enqueue=[{"toy.x": 0.3}, {"toy.x": 2.0}])
    assert sweep.main(["run", str(path)]) == 0
    good, bad = study_of(path).get_trials()
    assert good.state == TrialState.COMPLETE and len(good.intermediate_values) == 10
    assert bad.state == TrialState.PRUNED
    assert len(bad.intermediate_values) <= 2  # stopped at the first rung, not after 10 evaluations
    assert len(records(bad.user_attrs["run_dir"])) < 10  # the process was killed mid-run
    assert json.loads((Path(bad.user_attrs["run_dir"]) / "sweep_run.json").read_text())["status"] == "pruned"


def test_two_workers_share_one_journal(tmp_path):
    path = make_sweep(tmp_path, trials=8, sampler={"name": "random"},
                      overrides=["train.total_steps=10", "train.eval_interval=2", "toy.sleep=0.01"])
    assert sweep.main(["run", str(path), "--workers", "2"]) == 0
    trials = study_of(path).get_trials()
    assert [t.number for t in trials] == list(range(8))  # exactly `trials`, none twice
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both workers ran trials
    assert len({t.params["toy.x"] for t in trials}) == 8  # different sampler seeds per worker
    for t in trials:  # each trial folder was written by one run only
        assert [r["step"] for r in records(t.user_attrs["run_dir"])] == [2, 4, 6, 8, 10]


def test_failed_trials_do_not_stop_the_sweep(tmp_path):
    path = make_sweep(tmp_path, trials=4, overrides=["toy.nan_above=1.5"],
                      space={"toy.x": {"type": "float", "low": -2, "high": 2}, "toy.crash_at": [0, 3]},
                      enqueue=[{"toy.x": 0.3, "toy.crash_at": 0}, {"toy.x": 1.8, "toy.crash_at": 0},
                               {"toy.x": 0.0, "toy.crash_at": 3}, {"toy.x": 0.5, "toy.crash_at": 0}])
    assert sweep.main(["run", str(path)]) == 0
    trials = study_of(path).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["error"] == "error: non-finite loss at step 2: loss = nan"
    assert trials[2].user_attrs["error"] == "RuntimeError: toy crash at step 3"
    assert trials[3].value == pytest.approx(-0.04 - 0.25 - 0.2 - 1 / 3)
    assert [r["state"] for r in read_csv(tmp_path / "sweep" / "trials.csv")] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE"]
    # the best parameters (trial 0) on two seeds
    assert sweep.main(["apply-best", str(path), "--seeds", "0", "1"]) == 0
    for s in (0, 1):
        cfg = yaml.safe_load((tmp_path / "sweep" / "best" / f"seed_{s}" / "config.yaml").read_text())
        assert (cfg["seed"], cfg["toy"]["x"], cfg["toy"]["crash_at"], cfg["toy"]["nan_above"]) == (s, 0.3, 0, 1.5)
    runs = [r["run"] for r in read_csv(tmp_path / "sweep" / "best" / "seeds.csv")]
    assert runs == ["seed_0", "seed_1", "mean", "std"]


def test_config_error_stops_the_sweep(tmp_path, capsys):
    path = make_sweep(tmp_path, space={"toy.nope": [1, 2]})
    assert sweep.main(["run", str(path)]) == 1
    assert "unknown config key 'toy.nope'" in capsys.readouterr().err
    assert len(study_of(path).get_trials()) == 1


def test_resume_continues_and_reruns_interrupted_trials(tmp_path):
    path = make_sweep(tmp_path, trials=2, sampler={"name": "random"})
    assert sweep.main(["run", str(path)]) == 0
    # a trial left RUNNING by a worker that died (its pid no longer exists)
    study = study_of(path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = study.ask()
    x = trial.suggest_float("toy.x", -2, 2)
    trial.set_user_attr("host", HOST)
    trial.set_user_attr("pid", dead.pid)
    assert sweep.main(["run", str(path), "trials=4"]) == 0
    trials = study_of(path).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] + [TrialState.COMPLETE] * 2
    assert trials[3].params["toy.x"] == x and trials[3].user_attrs["retry_of"] == 2
    assert study_of(path).user_attrs["interrupted"] == [2]
    assert n_counted(study_of(path)) == 4


def test_stopping_a_sweep_stops_its_trial_and_queues_it_again(tmp_path):
    path = make_sweep(tmp_path, trials=2, overrides=["train.total_steps=100", "train.eval_interval=1",
                                                      "toy.sleep=0.1"])
    proc = subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), "run", str(path)], cwd=ROOT)
    metrics = tmp_path / "sweep" / "trials" / "trial_0000" / "metrics.jsonl"
    deadline = time.time() + 30
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # like `kill` or a cluster job's time limit
    assert proc.wait(30) == 130
    study = study_of(path)
    first, retry = study.get_trials()
    assert first.state == TrialState.FAIL and study.user_attrs["interrupted"] == [0]
    assert retry.state == TrialState.WAITING and retry.system_attrs["fixed_params"] == first.params
    child = first.user_attrs["child_pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # the training run did not outlive the sweep
    assert json.loads((metrics.parent / "sweep_run.json").read_text())["status"] == "interrupted"
    assert metrics.read_text().count("\n") < 100


def test_kfold_indices_disjoint_and_covering():
    n, k = 23, 5
    vals = [kfold_indices(n, k, i, seed=3) for i in range(k)]
    assert sorted(i for _, v in vals for i in v) == list(range(n))  # each sample validated exactly once
    assert [len(v) for _, v in vals] == [5, 5, 5, 4, 4]
    for train, val in vals:
        assert sorted(train + val) == list(range(n)) and not set(train) & set(val)
    # identity-disjoint: 9 identities with 1..7 images each
    groups = [f"id{g}" for g in range(9) for _ in range(1 + g % 7)]
    splits = [kfold_indices(len(groups), 4, i, seed=0, groups=groups) for i in range(4)]
    assert sorted(i for _, v in splits for i in v) == list(range(len(groups)))
    for train, val in splits:
        assert not {groups[i] for i in train} & {groups[i] for i in val}
        assert sorted(train + val) == list(range(len(groups)))
    assert [len({groups[i] for i in v}) for _, v in splits] == [3, 2, 2, 2]  # whole identities per fold
    assert kfold_indices(n, k, 0, seed=3) == vals[0] and kfold_indices(n, k, 0, seed=4) != vals[0]


def test_folds_then_ensemble_of_identical_members(tmp_path):
    (tmp_path / "base.yaml").write_text("tracker: none\n")
    out = tmp_path / "folds"
    assert sweep.main(["folds", "--script", TOY, "--config", str(tmp_path / "base.yaml"), "--k", "3",
                       "--out", str(out), "train.total_steps=4", "train.eval_interval=2", "toy.x=0.5"]) == 0
    for i in range(3):
        cfg = yaml.safe_load((out / f"fold_{i}" / "config.yaml").read_text())
        assert cfg["data"] == {"folds": 3, "fold": i}
    finals = [records(out / f"fold_{i}")[-1]["score"] for i in range(3)]
    rows = read_csv(out / "folds.csv")
    assert [float(r["score"]) for r in rows[:3]] == finals
    assert float(rows[3]["score"]) == pytest.approx(np.mean(finals), abs=1e-12)
    ens = records(out / "ensemble")[-1]  # same weights in every member: ensemble = member
    assert ens["score"] == ens["member0_score"] == ens["member1_score"] == ens["member2_score"]
    assert yaml.safe_load((out / "ensemble" / "config.yaml").read_text())["data"]["folds"] == 0


def test_seeds_mean_std_equal_numpy(tmp_path):
    (tmp_path / "base.yaml").write_text("tracker: none\n")
    out = tmp_path / "seeds"
    assert sweep.main(["seeds", "--script", TOY, "--config", str(tmp_path / "base.yaml"), "--seeds", "0", "1", "2",
                       "3", "--workers", "2", "--out", str(out), "train.total_steps=4", "train.eval_interval=2",
                       "toy.noise=0.1"]) == 0
    finals = np.array([[records(out / f"seed_{s}")[-1][k] for k in ("score", "loss")] for s in range(4)])
    rows = {r["run"]: r for r in read_csv(out / "seeds.csv")}
    got_mean = [float(rows["mean"][k]) for k in ("score", "loss")]
    got_std = [float(rows["std"][k]) for k in ("score", "loss")]
    np.testing.assert_allclose(got_mean, finals.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_std, finals.std(0, ddof=1), rtol=0, atol=1e-12)
    assert got_std[0] > 0.01 and got_std[1] == 0.0
    assert float(rows["seed_2"]["score (best)"]) == max(r["score"] for r in records(out / "seed_2"))


def _fake_run(path: Path, lr: float, variant: str, recs: list[dict]) -> Path:
    path.mkdir(parents=True)
    cfg = {"output_dir": str(path), "seed": 0, "optim": {"lr": lr}, "model": {"variant": variant},
           "train": {"best_metric": "mIoU", "best_mode": "max"}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_report_table_numbers_equal_metrics_files(tmp_path):
    a = _fake_run(tmp_path / "runs" / "a", 0.1, "b1", [
        {"step": 100, "mIoU": 40.25, "mAcc": 50.0, "aAcc": 80.0, "IoU": [1.0, 2.0]},
        {"step": 200, "mIoU": 45.125, "mAcc": 55.5, "aAcc": 85.0},
        {"step": 300, "mIoU": 44.0, "mAcc": 56.0, "aAcc": 86.0}])
    _fake_run(tmp_path / "runs" / "b", 0.2, "b1", [
        {"step": 100, "mIoU": 30.0, "mAcc": 35.0, "aAcc": 70.0},
        {"step": 200, "mIoU": 50.5, "mAcc": 60.25, "aAcc": 90.0},
        {"step": 300, "mIoU": float("nan"), "mAcc": 1.0, "aAcc": 1.0}])
    (tmp_path / "base.yaml").write_text("model: {variant: b0}\noptim: {lr: 0.1}\n")
    out = tmp_path / "table"
    assert sweep.main(["report", str(tmp_path / "runs"), "--base", str(tmp_path / "base.yaml"),
                       "--out", str(out)]) == 0
    rows = {r["run"]: r for r in read_csv(out.with_suffix(".csv"))}
    assert list(rows["a"])[:3] == ["run", "model.variant", "optim.lr"]
    assert (rows["a"]["optim.lr"], rows["b"]["optim.lr"], rows["a"]["model.variant"]) == ("0.1", "0.2", "b1")
    assert float(rows["a"]["mIoU (best)"]) == 45.125 and int(rows["a"]["step"]) == 200
    assert float(rows["a"]["mAcc"]) == 55.5 and float(rows["a"]["aAcc"]) == 85.0
    assert float(rows["a"]["mIoU (final)"]) == 44.0 and int(rows["a"]["final step"]) == 300
    assert float(rows["b"]["mIoU (best)"]) == 50.5 and float(rows["b"]["mAcc"]) == 60.25
    assert float(rows["b"]["mIoU (final)"]) == 50.5  # the NaN evaluation is not a result
    md = out.with_suffix(".md").read_text()
    assert "| a | b1 | 0.1 | 45.125 | 200 | 55.5 | 85 | 44 | 300 |" in md
    # without a base: only the keys that differ between the runs
    cols, _ = report_table([a, tmp_path / "runs" / "b"])
    assert cols[1] == "optim.lr" and "model.variant" not in cols


def test_batch_runs_each_line_and_goes_on_after_a_failure(tmp_path):
    (tmp_path / "base.yaml").write_text("tracker: none\ntrain: {total_steps: 4, eval_interval: 2}\n")
    base = tmp_path / "base.yaml"
    listing = tmp_path / "exp.txt"
    listing.write_text(f"# three experiments\npython {TOY} --config {base} toy.x=0.3\n"
                       f"{TOY} --config {base} toy.crash_at=1\n"
                       f"python {TOY} --config {base} toy.x=1.3 output_dir={tmp_path / 'named'}\n")
    assert sweep.main(["batch", str(listing), "--out", str(tmp_path / "b"), "toy.y=-0.5"]) == 1
    rows = read_csv(tmp_path / "b" / "report.csv")
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert [r["toy.x"] for r in rows] == ["0.3", "0.0", "1.3"]
    assert float(rows[0]["score (best)"]) == pytest.approx(-0.2 - 0.25)
    assert float(rows[2]["score (best)"]) == records(tmp_path / "named")[-1]["score"]
    assert yaml.safe_load((tmp_path / "b" / "00_base" / "config.yaml").read_text())["toy"]["y"] == -0.5


@pytest.mark.slow
def test_train_seg_ensemble_of_two_identical_checkpoints(tmp_path, monkeypatch):
    if not (ROOT / "train_seg.py").is_file():
        pytest.skip("train_seg.py not present")
    import torch
    from safetensors.torch import save_file

    from lib.models.segformer import SegFormer

    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    model = SegFormer("b0", 11)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    monkeypatch.chdir(ROOT)
    out = tmp_path / "ens"
    assert sweep.main(["ensemble", "--script", "train_seg.py", "--config", "configs/seg/sample.yaml",
                       str(ckpt), str(ckpt), "--out", str(out), "train.num_workers=0", "data.scale=[120,90]"]) == 0
    rec = records(out)[-1]
    for k in ("mIoU", "mAcc", "aAcc"):
        assert rec[k] == rec[f"member0_{k}"] == rec[f"member1_{k}"]
    rows = read_csv(out / "ensemble.csv")
    assert [r["model"].split()[0] for r in rows] == ["ensemble", "member0", "member1"]
    assert float(rows[0]["mIoU"]) == float(rows[1]["mIoU"]) == rec["mIoU"]


EPOCH_SCRIPT = '''
import json, sys
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
run = Path(args["output_dir"]); run.mkdir(parents=True, exist_ok=True)
(run / "config.yaml").write_text("train: {unit: epoch, total_steps: 3, best_metric: score, best_mode: max}\\n")
x = float(args["toy.x"])
with open(run / "metrics.jsonl", "a") as f:  # 4 optimizer steps per epoch, evaluated every 2 steps
    for step in range(2, 13, 2):
        f.write(json.dumps({"step": step, "epoch": step / 4, "score": -x * x + step}) + "\\n")
'''


def test_pruner_checks_every_n_epochs(tmp_path):
    (tmp_path / "fake.py").write_text(EPOCH_SCRIPT)
    path = make_sweep(tmp_path, script=str(tmp_path / "fake.py"), trials=1, enqueue=[{"toy.x": 1.0}],
                      pruner={"name": "sha", "min_resource": 1, "check_every_epochs": 1})
    assert sweep.main(["run", str(path)]) == 0
    (trial,) = study_of(path).get_trials()
    assert trial.state == TrialState.COMPLETE and trial.value == -1.0 + 12
    # the pruner saw the evaluations at epochs 1, 2, 3 (steps 4, 8, 12), resource = epochs / 1
    assert trial.intermediate_values == {1: 3.0, 2: 7.0, 3: 11.0}
    path = make_sweep(tmp_path, script=str(tmp_path / "fake.py"), trials=1, enqueue=[{"toy.x": 1.0}],
                      pruner={"name": "sha", "check_every_epochs": 2}, output_dir=str(tmp_path / "s2"))
    assert sweep.main(["run", str(path)]) == 0
    assert study_of(path).get_trials()[0].intermediate_values == {1: 7.0}  # epoch 2 only (epoch 4 never comes)


def test_sweep_files_parse_and_the_plan_space_reaches_the_script(monkeypatch):
    monkeypatch.chdir(ROOT)
    for f in sorted((ROOT / "configs" / "sweeps").glob("*.yaml")):
        cfg, _ = load_sweep(f)
        assert cfg.space and cfg.metric, f
    cfg, out = load_sweep(ROOT / "configs" / "sweeps" / "face_plan.yaml")
    assert (cfg.sampler.name, cfg.pruner.name, cfg.pruner.check_every_epochs, cfg.workers) == ("tpe", "hyperband", 2, 8)
    assert cfg.space["sched.t_max"] == {"type": "categorical", "choices": [10, 20, 30]}
    assert cfg.space["sched.eta_min"]["log"] and set(cfg.space) == {"optim.lr", "optim.weight_decay",
                                                                    "sched.t_max", "sched.eta_min"}
    import train_face
    from lib.config import build_config, load_yaml
    from lib.runs import override

    params = cfg.enqueue[0]
    face = build_config(train_face.FaceConfig, load_yaml(cfg.config),
                        [*cfg.overrides, *[override(k, v) for k, v in params.items()]])
    assert (face.train.unit, face.sched.t_max, face.sched.eta_min, face.optim.lr) == ("epoch", 20, 1e-5, 3e-3)


@pytest.mark.parametrize("script,cls", [("train_seg.py", "SegConfig"), ("train_face.py", "FaceConfig"),
                                        ("train_pose.py", "PoseConfig"), ("train_hand.py", "HandConfig")])
def test_apply_best_folds_overrides_parse_for_every_script(script, cls, monkeypatch):
    """apply-best --folds k runs each fold with data.folds=k data.fold=i and the ensemble with data.folds=0."""
    import importlib

    from lib.config import build_config, load_yaml
    from lib.runs import ensemble_overrides

    monkeypatch.chdir(ROOT)
    config_cls = getattr(importlib.import_module(script[:-3]), cls)
    sample = load_yaml(ROOT / "configs" / script[6:-3] / "sample.yaml")
    cfg = build_config(config_cls, sample, ["data.folds=3", "data.fold=2"])
    assert (cfg.data.folds, cfg.data.fold) == (3, 2)
    members = [str(ROOT / "runs" / f"fold_{i}" / "checkpoints" / "best") for i in range(2)]
    cfg = build_config(config_cls, sample, ["data.folds=0", *ensemble_overrides(members)])
    assert cfg.data.folds == 0 and cfg.eval_only and cfg.ensemble == members
