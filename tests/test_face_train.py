"""End-to-end train_face.py on the bundled sample: learning + EER eval, eval_only predictions,
fine-tuning with a new head, resume, the parameter budget and bad input as one-line errors."""

import csv
import json
import os
import shutil
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
    assert not (tmp_path / "eval" / "checkpoints").exists()  # eval_only writes no checkpoints
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


def test_resume_with_ema_is_bit_identical_and_keeps_the_best(tmp_path):
    common = ["train.total_steps=5", "train.eval_interval=2", "train.ckpt_interval=2", "train.max_keep_ckpts=5",
              "loss.terms=[triplet,cosface]", "loss.weights=[1,1]", "data.aug.jitter=0.3", "data.aug.rotation=10",
              "ema.decay=0.9"]
    full = tmp_path / "full"
    run(full, *common)  # 3 P x K steps per epoch: step 4 is mid-epoch
    evals = rows(full / "metrics.jsonl")
    assert [r["step"] for r in evals] == [2, 4, 5] and all(0 <= r["ema_EER"] <= 100 for r in evals)
    for name, key in (("best", "EER"), ("best_ema", "ema_EER")):  # each holds its own lowest EER
        state = json.loads((full / "checkpoints" / name / "trainer_state.json").read_text())
        assert state["EER"] == min(r[key] for r in evals) and state["step"] in (2, 4, 5)
    ema_w = load_file(str(full / "checkpoints" / "best_ema" / "model.safetensors"))
    raw_w = load_file(str(full / "checkpoints" / "best" / "model.safetensors"))
    assert ema_w.keys() == raw_w.keys() and all(v.dtype == torch.float32 for v in ema_w.values() if v.is_floating_point())

    # resume from step 4 with a best of EER -1 from "before the resume": the step-5 evaluation is worse,
    # so checkpoints/best stays as it was (its weights too); the step-5 weights AND the EMA are bit-identical
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    os.rename(full / "checkpoints" / "step_4", part / "checkpoints" / "step_4")
    kept = part / "checkpoints" / "best"
    shutil.copytree(full / "checkpoints" / "best", kept)
    (kept / "trainer_state.json").write_text(json.dumps({"step": 4, "metric": "EER", "mode": "min", "EER": -1.0}))
    before = (kept / "model.safetensors").read_bytes()
    run(part, *common, "resume=auto")
    assert [r["step"] for r in rows(part / "metrics.jsonl")] == [5]
    assert rows(part / "metrics.jsonl")[0]["EER"] == evals[-1]["EER"]
    assert json.loads((kept / "trainer_state.json").read_text())["EER"] == -1.0
    assert (kept / "model.safetensors").read_bytes() == before
    assert "---- resumed at step 4" in (part / "log.txt").read_text()
    a = load_file(str(full / "checkpoints" / "step_5" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "step_5" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea = torch.load(full / "checkpoints" / "step_5" / "custom_checkpoint_0.pkl", weights_only=False)
    eb = torch.load(part / "checkpoints" / "step_5" / "custom_checkpoint_0.pkl", weights_only=False)
    assert ea["updates"] == eb["updates"] == 5 and ea["module"].keys() == eb["module"].keys()
    assert all(torch.equal(ea["module"][k], eb["module"][k]) for k in ea["module"])
    assert not torch.equal(ea["module"]["embed.fc.weight"], a["embed.fc.weight"])  # an average, not the raw weights


def test_epoch_units_count_epochs_of_steps(tmp_path):
    # 8 ids x 6 images, P=4 x K=4: 2 steps per epoch; 3 epochs = 6 steps, eval and checkpoint every epoch
    out = tmp_path / "ep"
    run(out, "train.unit=epoch", "train.total_steps=3", "train.eval_interval=1", "train.ckpt_interval=3",
        "sched.warmup_steps=1")
    assert [r["step"] for r in rows(out / "train.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows(out / "metrics.jsonl")] == [2, 4, 6]
    lrs = [r["lr"] for r in rows(out / "train.jsonl")]
    assert lrs[0] < lrs[1] < lrs[2] and lrs[2] > lrs[3]  # warm-up of 1 epoch = 2 steps, then cosine decay
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_6"]
    assert "2 steps per epoch, 6 steps" in (out / "log.txt").read_text()


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
    (["data.folds=4", "data.fold=4"], "data.folds=4, data.fold=4: k-fold needs folds >= 2 and 0 <= fold < folds"),
    (["eval_only=true", "baseline=random", "data.val_pairs=", "data.test_pairs="],
     "eval_only=true needs data.val_pairs and/or data.test_pairs"),
])
def test_config_checks(tmp_path, extra, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run(tmp_path, *extra)


@pytest.mark.parametrize("extra, key", [(["data.aug.grayscale_p=1.5"], "data.aug.grayscale_p"),
                                        (["data.aug.rotation=-3"], "data.aug.rotation"),
                                        (["model.timm_kwargs=[1]"], "model.timm_kwargs"),
                                        (["model.embed_dim=0"], "model.embed_dim"),
                                        (["model.stem_stride=3"], "model.stem_stride"),
                                        (["eval.far=0"], "eval.far"),
                                        (["data.classes_per_batch=0"], "data.classes_per_batch"),
                                        (["data.center_crop=1.5"], "data.center_crop"),
                                        (["data.val_folds=[0]"], "data.val_folds")])
def test_bad_augmentation_and_timm_keys_are_config_errors(tmp_path, extra, key):
    with pytest.raises(SystemExit, match=f"config error: {key}"):
        run(tmp_path, *extra)
