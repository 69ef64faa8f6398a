"""Hand training: a few-image overfit where the joint loss drops, and train_hand.py end to end on the
bundled sample (metrics.jsonl, overlay PNG, dropout in the log, best weights, eval_only reload)."""

from __future__ import annotations

import json

import torch

from lib.data.hand import HandAugConfig, HandDataConfig, HandDataset, FolderSource, label_stats
from lib.losses.hand import LossWeights, hand_losses
from lib.models.hand import HandRegressor
from tests.conftest import ROOT

TINY_BACKBONE = "{embed_dim: 96, depth: 2, num_heads: 3}"


def test_few_image_overfit_joint_loss_drops():
    torch.manual_seed(0)
    cfg = HandDataConfig(root=str(ROOT / "tests" / "data" / "hand"), img_size=42,
                         aug=HandAugConfig(scale=0, rotation=0, translate=0, color=0, flip_prob=0))
    ds = HandDataset(FolderSource(cfg.root, "training"), cfg, train=False)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    model = HandRegressor("vit_small_patch14_dinov2", img_size=42, dim=64, depth=1, heads=2, dim_head=32, mlp_dim=128,
                          backbone_overrides=dict(embed_dim=64, depth=1, num_heads=2))
    model.set_init(**label_stats(ds))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    w = LossWeights()
    first = None
    for _ in range(40):
        losses = hand_losses(model(batch["image"], batch["is_right"]), batch, w)
        first = first if first is not None else {k: float(v.detach()) for k, v in losses.items()}
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    with torch.no_grad():
        last = {k: float(v) for k, v in hand_losses(model(batch["image"], batch["is_right"]), batch, w).items()}
    assert last["loss_3d"] < 0.3 * first["loss_3d"], (first, last)
    assert last["loss_2d"] < 0.5 * first["loss_2d"], (first, last)
    assert first["loss_pose"] == 0.0 and last["loss_betas"] == 0.0  # no MANO labels in this folder


def test_train_hand_end_to_end(tmp_path):
    from train_hand import main

    out = tmp_path / "run"
    common = ["--config", str(ROOT / "configs" / "hand" / "sample.yaml"), f"data.root={ROOT / 'tests' / 'data' / 'hand'}",
              f"model.backbone_kwargs={TINY_BACKBONE}", "data.img_size=28", "save_vis=4"]
    res = main(common + [f"output_dir={out}", "train.total_steps=4", "train.eval_interval=2", "train.ckpt_interval=4",
                         "train.batch_size=4", "train.log_interval=1", "model.handec.dropout_warmup_step=2"])
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4]
    assert all(0 < r["mpjpe"] < 500 and 0 < r["pa_mpjpe"] <= r["mpjpe"] + 1e-6 for r in recs)
    assert abs(recs[0]["mpjpe_mean_pose"] - res["mpjpe_mean_pose"]) < 1e-9 and res["mpjpe_mean_pose"] > 10
    assert (out / "vis" / "step_4.png").is_file() and (out / "checkpoints" / "best" / "model.safetensors").is_file()
    log = (out / "log.txt").read_text()
    assert "step 2/4" in log and "dropout 0 " in log and "dropout 0.1 " in log  # p = 0 for steps 1-2, then 0.1
    best_step = json.loads((out / "checkpoints" / "best" / "trainer_state.json").read_text())["step"]
    best = next(r for r in recs if r["step"] == best_step)
    ev = main(common + [f"output_dir={tmp_path / 'eval'}", "eval_only=true", f"load_from={out / 'checkpoints' / 'best'}"])
    assert abs(ev["mpjpe"] - best["mpjpe"]) < 1e-3 and abs(ev["pa_mpjpe"] - best["pa_mpjpe"]) < 1e-3
