"""Hand training: few-image overfits where the joint and the MANO theta / beta losses drop, and
train_hand.py end to end on the bundled sample (metrics.jsonl with val_loss and mpjpe_fluct, overlay
PNG, the plan's log line, best weights, eval_only without the training split, the mean-pose
baseline through the eval path, predict and ONNX export)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lib.data.hand import FolderSource, HandAugConfig, HandDataConfig, HandDataset, label_stats
from lib.losses.hand import LossWeights, hand_losses
from lib.models.hand import HandRegressor
from tests.conftest import ROOT

SAMPLE = ROOT / "tests" / "data" / "hand"
TINY_BACKBONE = "{embed_dim: 96, depth: 2, num_heads: 3}"
NO_AUG = HandAugConfig(scale=0, rotation=0, translate=0, color=0, flip_prob=0)


def _sample_with_mano(tmp_path, seed: int = 0):
    """The bundled sample plus generated MANO labels (FreiHAND layout: <split>_mano.json, per image
    [[48 axis-angle pose, 10 betas, 3 translation]])."""
    root = tmp_path / "hand_mano"
    shutil.copytree(SAMPLE, root)
    rng = np.random.default_rng(seed)
    for split in ("training", "evaluation"):
        n = len(json.loads((root / f"{split}_xyz.json").read_text()))
        mano = [[rng.normal(0, 0.4, 48).tolist() + rng.normal(0, 1.0, 10).tolist() + [0.0, 0.0, 0.5]] for _ in range(n)]
        (root / f"{split}_mano.json").write_text(json.dumps(mano))
    return root


def _overfit(root, steps: int = 40):
    torch.manual_seed(0)
    cfg = HandDataConfig(root=str(root), img_size=42, aug=NO_AUG)
    ds = HandDataset(FolderSource(cfg.root, "training"), cfg, train=False)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    model = HandRegressor("vit_small_patch14_dinov2", img_size=42, dim=64, depth=1, heads=2, dim_head=32, mlp_dim=128,
                          backbone_overrides=dict(embed_dim=64, depth=1, num_heads=2))
    model.set_init(**label_stats(ds))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    w = LossWeights()
    first = None
    for _ in range(steps):
        losses = hand_losses(model(batch["image"], batch["is_right"]), batch, w)
        first = first if first is not None else {k: float(v.detach()) for k, v in losses.items()}
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    with torch.no_grad():
        last = {k: float(v) for k, v in hand_losses(model(batch["image"], batch["is_right"]), batch, w).items()}
    return first, last


def test_few_image_overfit_joint_loss_drops():
    first, last = _overfit(SAMPLE)
    assert last["loss_3d"] < 0.3 * first["loss_3d"], (first, last)
    assert last["loss_2d"] < 0.5 * first["loss_2d"], (first, last)
    assert first["loss_theta"] == 0.0 and last["loss_beta"] == 0.0  # no MANO labels in this folder


def test_mano_theta_and_beta_losses_are_nonzero_and_fall(tmp_path):
    first, last = _overfit(_sample_with_mano(tmp_path), steps=60)
    # generated labels: theta ~ N(0, 0.4) axis-angle, betas ~ N(0, 1); the head starts at identity pose, zero betas
    assert first["loss_theta"] > 1e-3 and first["loss_beta"] > 1e-3, first
    assert last["loss_theta"] < 0.5 * first["loss_theta"], (first, last)
    assert last["loss_beta"] < 0.6 * first["loss_beta"], (first, last)  # weight 5e-4: a slower fall


def _common(root=SAMPLE):
    return ["--config", str(ROOT / "configs" / "hand" / "sample.yaml"), f"data.root={root}",
            f"model.backbone_kwargs={TINY_BACKBONE}", "data.img_size=28", "save_vis=4"]


def test_train_hand_end_to_end(tmp_path):
    from train_hand import main

    out = tmp_path / "run"
    root = _sample_with_mano(tmp_path)
    res = main(_common(root) + [f"output_dir={out}", "train.total_steps=6", "train.eval_interval=2",
                                "train.ckpt_interval=6", "train.batch_size=4", "train.log_interval=1",
                                "model.handec.dropout_warmup_step=2"])
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4, 6]
    assert all(0 < r["mpjpe"] < 500 and 0 < r["pa_mpjpe"] <= r["mpjpe"] + 1e-6 and r["val_loss"] > 0 for r in recs)
    for i, r in enumerate(recs):  # the plan's validation fluctuation: std of val MPJPE over the evaluations so far
        assert r["mpjpe_fluct"] == pytest.approx(float(np.std([q["mpjpe"] for q in recs[:i + 1]])), abs=1e-9)
    assert recs[0]["mpjpe_fluct"] == 0.0 and recs[2]["mpjpe_fluct"] > 0
    assert abs(recs[0]["mpjpe_mean_pose"] - res["mpjpe_mean_pose"]) < 1e-9 and res["mpjpe_mean_pose"] > 10
    assert (out / "vis" / "step_4.png").is_file() and (out / "checkpoints" / "best" / "model.safetensors").is_file()
    log = (out / "log.txt").read_text()
    line = next(x for x in log.splitlines() if x.startswith("step 2/6"))
    for term in ("lr ", "total ", "loss_3d ", "loss_2d ", "loss_theta ", "loss_beta ", "dropout "):
        assert term in line, (term, line)  # step/total, lr, dropout, total and every term (MANO labels present)
    drop = {int(m[1]): float(m[2]) for m in re.finditer(r"^step (\d+)/6 .*\bdropout ([0-9.e-]+)", log, re.M)}
    assert drop == {1: 0.0, 2: 0.0, 3: 0.1, 4: 0.1, 5: 0.1, 6: 0.1}  # p = 0 for steps 1-2, then 0.1
    best_step = json.loads((out / "checkpoints" / "best" / "trainer_state.json").read_text())["step"]
    best = next(r for r in recs if r["step"] == best_step)
    # eval_only with load_from reads no training split (a missing one would be an error), logs the checkpoint's step
    ev = main(_common(root) + [f"output_dir={tmp_path / 'eval'}", "eval_only=true", "data.train_split=not_there",
                               f"load_from={out / 'checkpoints' / 'best'}"])
    assert abs(ev["mpjpe"] - best["mpjpe"]) < 1e-3 and abs(ev["pa_mpjpe"] - best["pa_mpjpe"]) < 1e-3
    assert abs(ev["val_loss"] - best["val_loss"]) < 1e-4
    ev_log = (tmp_path / "eval" / "log.txt").read_text()
    assert "no training split read" in ev_log and f"at step {best_step}" in ev_log
    assert json.loads((tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()[0])["step"] == best_step


def test_kfold_run_without_mano_labels(tmp_path):
    """sweep.py --folds passes data.folds=k data.fold=i; no MANO labels: no MANO terms in the log line."""
    from train_hand import main

    out = tmp_path / "run"
    main(_common() + [f"output_dir={out}", "train.total_steps=2", "train.eval_interval=2", "train.ckpt_interval=2",
                      "train.log_interval=1", "save_vis=0", "data.folds=3", "data.fold=1"])
    log = (out / "log.txt").read_text()
    assert "data: 8 train images" in log and "4 val images from" in log and "fold 1 of 3" in log
    line = next(x for x in log.splitlines() if x.startswith("step 1/2"))
    assert "loss_3d " in line and "total " in line and "loss_theta" not in line and "loss_beta" not in line


def test_mean_pose_baseline_equals_hand_computed_mpjpe(tmp_path):
    from train_hand import main

    res = main(_common() + [f"output_dir={tmp_path / 'b'}", "eval_only=true", "baseline=mean_pose"])
    train = np.array(json.loads((SAMPLE / "training_xyz.json").read_text()))  # (12, 21, 3) metres, all left hands
    val = np.array(json.loads((SAMPLE / "evaluation_xyz.json").read_text()))  # (4, 21, 3)
    mean = (train - train[:, :1]).mean(0)
    want = np.linalg.norm(mean[None] - (val - val[:, :1]), axis=-1).mean() * 1000  # mm
    assert res["mpjpe"] == pytest.approx(want, abs=1e-3) and res["mpjpe_mean_pose"] == pytest.approx(want, abs=1e-9)
    assert 10 < want < 100


def test_predict_and_onnx_export(tmp_path):
    from lib.config import build_config, load_yaml
    from lib.export import onnx_max_abs_diff
    from train_hand import HandConfig, JointsAndCamera, build_model, main

    cfg = build_config(HandConfig, load_yaml(ROOT / "configs" / "hand" / "sample.yaml"), _common()[2:])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.set_init(joints=torch.randn(21, 3) * 0.03, cam=torch.tensor([3.0, 0.05, -0.02]))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"),
              metadata={"step": "7"})
    cam = tmp_path / "K.json"
    cam.write_text(json.dumps({"K": [[500.0, 0, 128], [0, 500.0, 128], [0, 0, 1]]}))
    out = tmp_path / "pred"
    main(_common() + [f"output_dir={out}", f"load_from={tmp_path / 'model.safetensors'}", "predict_side=left",
                      f"predict={SAMPLE / 'evaluation' / 'rgb'}", f"predict_camera={cam}", "export=onnx"])
    preds = json.loads((out / "predict" / "joints.json").read_text())
    assert len(preds) == 4 and all((out / "predict" / f"0000000{i}.png").is_file() for i in range(4))
    # the same whole-image crop through the model gives the JSON's joints
    ds = HandDataset(FolderSource(SAMPLE, "evaluation"), cfg.data, train=False)
    with torch.no_grad():
        ref = model(ds[(0, 0)]["image"][None], torch.tensor([0]))
    j = ref["joints"][0] - ref["joints"][0, :1]
    assert np.allclose(preds[0]["joints3d"], j.numpy(), atol=1e-5) and preds[0]["K"][0][0] == 500.0
    s, tx = float(ref["cam"][0, 0]), float(ref["cam"][0, 1])
    assert preds[0]["joints2d"][0][0] == pytest.approx((tx + 0.5) * 256 - 0.5, abs=0.02)  # wrist pixel, 256 px image
    assert preds[0]["joints3d_cam"][0][2] == pytest.approx(500.0 / (s * 256), rel=1e-4)  # depth from the scale
    # ONNX (dynamic batch) equals PyTorch within 1e-4 on three sample crops
    x = torch.stack([ds[(i, 0)]["image"] for i in range(3)])
    side = torch.tensor([0, 1, 0])
    with torch.no_grad():
        want = JointsAndCamera(model)(x, side)
    assert onnx_max_abs_diff(out / "export" / "model.onnx", (x, side), want) < 1e-4
    assert json.loads((out / "export" / "export.json").read_text())["metadata"]["step"] == "7"
