"""Face configs: every file parses; the plan's Phase-1 baseline holds the plan's values and runs on the
sample with epoch units (StepLR per epoch); early stopping and the best checkpoint follow EER (min)."""

import json
import os
from pathlib import Path

import pytest

import train_face
from lib.config import load_yaml, parse_config
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs" / "face").glob("*.yaml"))
SAMPLE = ["data.root=tests/data/face/train", "data.val_pairs=tests/data/face/val_pairs.csv", "data.test_pairs=",
          "tracker=none", "model.width=0.25", "model.embed_dim=64", "train.num_workers=0", "train.log_interval=1",
          "eval.batch_size=64"]


def rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_face_config_parses(path):
    cfg = parse_config(train_face.FaceConfig, ["--config", str(path)])
    train_face.check_config(cfg)
    assert cfg.train.best_metric == "EER" and cfg.train.best_mode == "min"  # the script's declared default


def test_phase1_baseline_holds_the_plans_values():
    cfg = parse_config(train_face.FaceConfig, ["--config", str(ROOT / "configs/face/phase1_baseline.yaml")])
    assert cfg.loss.terms == ["softmax"] and cfg.loss.weights == []
    assert (cfg.optim.name, cfg.optim.lr) == ("adam", 1e-3)
    assert (cfg.sched.name, cfg.sched.gamma, cfg.sched.step_size, cfg.sched.warmup_steps) == ("step", 0.9, 1, 0)
    assert (cfg.data.resize, cfg.data.image_size) == (256, 224)
    assert tuple(cfg.data.mean) == (0.485, 0.456, 0.406) and tuple(cfg.data.std) == (0.229, 0.224, 0.225)
    assert (cfg.train.unit, cfg.train.total_steps) == ("epoch", 10)
    assert cfg.data.aug.rotation == 15.0 and cfg.data.aug.flip_p == 0.5 and cfg.data.aug.jitter == 0.0
    raw = load_yaml(ROOT / "configs/face/phase1_baseline.yaml")  # the file itself says so (not only a base)
    assert raw["optim"]["lr"] == 1e-3 and raw["sched"]["gamma"] == 0.9 and raw["train"]["unit"] == "epoch"


def test_phase1_baseline_runs_in_epochs_on_the_sample(tmp_path):
    # 48 sample images, batch 16: 3 steps per epoch; 2 epochs = 6 steps, eval each epoch, lr x0.9 per epoch
    out = tmp_path / "p1"
    train_face.main(["--config", "configs/face/phase1_baseline.yaml", *SAMPLE, f"output_dir={out}",
                     "data.image_size=64", "data.resize=72", "train.batch_size=16", "train.total_steps=2"])
    assert [r["step"] for r in rows(out / "metrics.jsonl")] == [3, 6]
    lrs = [r["lr"] for r in rows(out / "train.jsonl")]
    assert lrs == pytest.approx([1e-3] * 3 + [9e-4] * 3)
    assert "3 steps per epoch, 6 steps" in (out / "log.txt").read_text()


def test_early_stopping_and_best_checkpoint_follow_eer(tmp_path):
    out = tmp_path / "es"
    patience = 2
    train_face.main(["--config", "configs/face/sample.yaml", *SAMPLE, f"output_dir={out}", "data.image_size=64",
                     "train.total_steps=12", "train.eval_interval=1", "train.ckpt_interval=100", "optim.lr=1e-2",
                     f"eval.patience={patience}"])
    evals = rows(out / "metrics.jsonl")
    best, stale, stop = None, 0, None
    for r in evals:  # the rule by hand: a strictly lower EER resets the count
        if best is None or r["EER"] < best:
            best, best_step, stale = r["EER"], r["step"], 0
        else:
            stale += 1
            if stale >= patience:
                stop = r["step"]
                break
    assert stop is not None and stop < 12 and evals[-1]["step"] == stop
    assert f"early stop at step {stop}: no better EER in {patience} evaluations" in (out / "log.txt").read_text()
    state = json.loads((out / "checkpoints" / "best" / "trainer_state.json").read_text())
    assert state["step"] == best_step and state["EER"] == best == min(r["EER"] for r in evals)


def test_pair_list_and_root_paths_follow_the_path_rule(tmp_path, monkeypatch):
    # in a config file: relative to the project root wherever one stands; on the command line: to the current folder
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(train_face.FaceConfig, ["--config", str(ROOT / "configs/face/lfw.yaml")])
    lfw = Path(os.path.normpath(ROOT.parent / "shared" / "data" / "lfw"))  # normalised, links kept (as the config does)
    assert (cfg.data.root, cfg.data.val_root) == (str(lfw / "images"),) * 2
    assert cfg.data.identities_from == cfg.data.val_pairs == str(lfw / "pairs_dev.txt")
    cfg = parse_config(train_face.FaceConfig, ["--config", str(ROOT / "configs/face/sample.yaml"), "data.val_root=imgs",
                                               "data.test_pairs=t.csv", "model.backbone_weights=w.pth"])
    assert cfg.data.val_pairs == str(ROOT / "tests/data/face/val_pairs.csv")
    assert cfg.data.test_root == ""  # "" stays "" (= the pair file's folder)
    assert (cfg.data.val_root, cfg.data.test_pairs, cfg.model.backbone_weights) == (
        str(tmp_path / "imgs"), str(tmp_path / "t.csv"), str(tmp_path / "w.pth"))
