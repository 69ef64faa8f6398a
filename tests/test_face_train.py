"""End-to-end train_face.py on the bundled sample: learning + EER eval, eval_only predictions,
fine-tuning with a new head, resume, the parameter budget and bad input as one-line errors."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_face
from lib.runtime import UserError
from tests.conftest import ROOT

TINY = ["--config", "configs/face/sample.yaml", "tracker=none", "data.image_size=64", "model.width=0.25",
        "model.embed_dim=64", "train.num_workers=0", "train.log_interval=1", "eval.batch_size=64"]


def run(tmp, *extra):
    return train_face.main(TINY + [f"output_dir={tmp}", *extra])


def rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_train_eval_predict_and_finetune(tmp_path):
    train_dir = tmp_path / "train"
    out = run(train_dir, "train.total_steps=16", "train.eval_interval=8", "train.ckpt_interval=8",
              "optim.lr=3e-3", "sched.warmup_steps=0", "data.aug.flip_p=0", "data.aug.rotation=0")
    losses = rows(train_dir / "train.jsonl")
    assert sum(r["loss"] for r in losses[-4:]) / 4 < 0.7 * losses[0]["loss"]
    evals = rows(train_dir / "metrics.jsonl")
    assert [r["step"] for r in evals] == [8, 16] and evals[-1]["EER"] == out["EER"]
    assert 0 <= out["EER"] <= 100 and {"TAR@FAR=0.001", "acc", "threshold", "loss", "epoch"} <= set(evals[-1])
    assert evals[0]["epoch"] == pytest.approx(4.0)  # 8 ids x 6 images, K=4: 1 chunk each; P=4: 2 steps per epoch
    best = train_dir / "checkpoints" / "best"
    state = json.loads((best / "trainer_state.json").read_text())
    assert state["EER"] == min(r["EER"] for r in evals)
    assert (train_dir / "roc.png").is_file()
    log = (train_dir / "log.txt").read_text()
    assert "params without the head" in log and "budget 11,500,000" in log

    # eval_only: the best checkpoint's EER again, and predictions.csv for the unlabelled test list
    ev = run(tmp_path / "eval", "eval_only=true", f"load_from={best}")
    assert ev["EER"] == pytest.approx(state["EER"], abs=1e-6)
    with open(tmp_path / "eval" / "predictions.csv") as f:
        pred = list(csv.DictReader(f))
    assert len(pred) == 8 and all(-1 <= float(r["score"]) <= 1 for r in pred) and set(pred[0]) >= {"pair", "score"}
    ens = run(tmp_path / "ens", "eval_only=true", f"ensemble=[{best},{best}]")
    assert ens["EER"] == pytest.approx(ev["EER"], abs=1e-6) and ens["member1_EER"] == pytest.approx(ev["EER"], abs=1e-6)

    # fine-tune on 6 of the 8 identities (k-fold): new head, loaded backbone, backbone lr x0; early stopping
    # (patience 1 on a metric that cannot improve: the pair count) ends the 6-step run at the 2nd evaluation
    ft = tmp_path / "ft"
    run(ft, f"load_from={best}", "data.folds=4", "data.fold=0", "data.fold_pairs=20", "train.total_steps=6",
        "train.eval_interval=2", "train.ckpt_interval=6", "optim.backbone_lr_mult=0", "optim.weight_decay=0",
        "data.classes_per_batch=2", "eval.patience=1", "train.best_metric=pairs")
    log = (ft / "log.txt").read_text()
    assert "classification head is re-initialised" in log and "8 rows" in log
    assert "early stop at step 4" in log and [r["step"] for r in rows(ft / "metrics.jsonl")] == [2, 4]
    a = load_file(str(best / "model.safetensors"))
    b = load_file(str(ft / "checkpoints" / "step_4" / "model.safetensors"))
    assert b["heads.arcface.weight"].shape[0] == 6 and a["heads.arcface.weight"].shape[0] == 8
    assert torch.equal(a["backbone.layer3.0.conv1.weight"], b["backbone.layer3.0.conv1.weight"])
    assert not torch.equal(a["heads.softmax.bias"][:6], b["heads.softmax.bias"])


def test_resume_is_bit_identical(tmp_path):
    common = ["train.total_steps=5", "train.eval_interval=100", "train.ckpt_interval=2", "train.max_keep_ckpts=5",
              "loss.terms=[triplet,cosface]", "loss.weights=[1,1]", "data.aug.jitter=0.3", "data.aug.rotation=10"]
    full = tmp_path / "full"
    run(full, *common)  # 3 P x K steps per epoch: step 4 is mid-epoch
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    os.rename(full / "checkpoints" / "step_4", part / "checkpoints" / "step_4")
    run(part, *common, "resume=auto")
    a = load_file(str(full / "checkpoints" / "step_5" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "step_5" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cli(*args):
    return subprocess.run([sys.executable, "train_face.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("extra, message", [
    (["model.backbone=resnet34", "model.width=1.0", "model.embed_dim=512"],
     "error: model has 21,547,840 parameters without the head, over the budget model.max_params=11,500,000"),
])
def test_bad_input_gives_one_line_error(tmp_path, extra, message):
    r = _cli(*TINY, f"output_dir={tmp_path}", *extra)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(message), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("extra, message", [
    (["loss.terms=[triplet]", "loss.weights=[1]", "data.sampler=shuffle"], "loss triplet needs data.sampler=pk"),
    (["loss.terms=[arcface]"], "loss.weights has 2 values for 1 loss.terms"),
    (["loss.terms=[arcface]", "loss.weights=[1]", "data.mixup_alpha=0.2"], "MixUp/CutMix need loss.terms=[softmax]"),
    (["data.val_pairs=/nonexistent/pairs.csv"], "pair list not found: /nonexistent/pairs.csv"),
    (["predict=tests/data/face/val"], "predict needs load_from=PATH"),
    (["export=onnx"], "export needs load_from=PATH"),
    (["baseline=random"], "baseline=random is evaluated with eval_only=true"),
    (["eval_only=true", "baseline=mean_pose"], "baseline: face has 'random'"),
    (["eval_only=true"], "eval_only=true needs load_from=PATH, ensemble=[...] or resume=PATH"),
    (["eval_only=true", "baseline=random", "data.val_pairs=", "data.test_pairs="],
     "eval_only=true needs data.val_pairs and/or data.test_pairs"),
])
def test_config_checks(tmp_path, extra, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run(tmp_path, *extra)


@pytest.mark.parametrize("extra, key", [(["data.aug.grayscale_p=1.5"], "data.aug.grayscale_p"),
                                        (["data.aug.rotation=-3"], "data.aug.rotation"),
                                        (["model.timm_kwargs=[1]"], "model.timm_kwargs")])
def test_bad_augmentation_and_timm_keys_are_config_errors(tmp_path, extra, key):
    with pytest.raises(SystemExit, match=f"config error: {key}"):
        run(tmp_path, *extra)
