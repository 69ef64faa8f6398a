"""The progressive dropout plan's config: its key values read back, and a few steps on the bundled sample;
range checks and path resolution of the hand config keys."""

from __future__ import annotations

import json
import re

import pytest

from lib.config import ConfigError, build_config, load_yaml, parse_config
from tests.conftest import ROOT

PLAN = ROOT / "configs" / "hand" / "stage1-dino_large.yaml"
SAMPLE = ROOT / "configs" / "hand" / "sample.yaml"


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


def test_hand_config_ranges_name_the_key():
    from train_hand import HandConfig

    for bad in ("model.handec.dropout=1.0", "model.drop_path_rate=-0.1", "model.layer_decay=0", "model.handec.depth=0",
                "data.img_size=0", "data.aug.flip_prob=1.5", "data.aug.rotation=200", "data.val_count=-1", "save_vis=-1"):
        key = bad.split("=")[0]
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: .* is out of range"):
            build_config(HandConfig, load_yaml(SAMPLE), [bad])


def test_hand_paths_file_values_from_the_project_root_cli_values_from_cwd(tmp_path, monkeypatch):
    from train_hand import HandConfig

    monkeypatch.chdir(tmp_path)
    cfg = parse_config(HandConfig, ["--config", str(SAMPLE)])
    assert cfg.data.root == str(ROOT / "tests" / "data" / "hand")
    cfg = parse_config(HandConfig, ["--config", str(SAMPLE), "data.root=mine", "model.mano_path=m/MANO_RIGHT.pkl",
                                    "model.backbone_weights=w.pth", "predict_camera=K.json", "data.train_split=train"])
    assert cfg.data.root == str(tmp_path / "mine") and cfg.model.mano_path == str(tmp_path / "m" / "MANO_RIGHT.pkl")
    assert cfg.model.backbone_weights == str(tmp_path / "w.pth") and cfg.predict_camera == str(tmp_path / "K.json")
    assert cfg.data.train_split == "train"  # a split name under data.root, never resolved
