"""The progressive dropout plan's config: its key values read back, and a few steps on the bundled sample."""

from __future__ import annotations

import json

from lib.config import build_config, load_yaml
from tests.conftest import ROOT

PLAN = ROOT / "configs" / "hand" / "stage1-dino_large.yaml"


def test_stage1_dino_large_has_the_plans_values():
    from train_hand import HandConfig

    cfg = build_config(HandConfig, load_yaml(PLAN))
    assert cfg.model.backbone == "vit_large_patch14_dinov2"  # DINOv2-L
    assert cfg.model.handec.dropout == 0.1 and cfg.model.handec.dropout_warmup_step == 10000
    assert cfg.model.handec.dropout_ramp == "step" and cfg.data.val_seed == 42
    assert cfg.train.best_metric == "mpjpe" and cfg.train.best_mode == "min"


def test_stage1_dino_large_runs_on_the_sample(tmp_path):
    from train_hand import main

    out = tmp_path / "run"
    main(["--config", str(PLAN), f"output_dir={out}", f"data.root={ROOT / 'tests' / 'data' / 'hand'}",
          "data.img_size=28", "model.backbone_kwargs={embed_dim: 48, depth: 1, num_heads: 3}",
          "model.handec={dim: 32, depth: 1, heads: 2, dim_head: 16, mlp_dim: 32}", "mixed_precision=no",
          "train.total_steps=2", "train.batch_size=4", "train.eval_interval=2", "train.ckpt_interval=2",
          "train.num_workers=0", "tracker=none", "save_vis=0"])
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 2 and 0 < rec["mpjpe"] < 500 and rec["mpjpe_fluct"] == 0.0
