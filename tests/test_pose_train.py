"""train_pose.py end to end on the bundled sample: train -> eval (AP) -> checkpoints -> ensemble eval."""

from __future__ import annotations

import json

import pytest

import train_pose

TINY = ["--config", "configs/pose/sample.yaml", "model.depth=1", "model.dim=32", "model.heads=2",
        "data.image_size=[48,64]", "train.batch_size=4", "eval.batch_size=64", "data.det_file="]  # gt boxes: 12 crops


@pytest.mark.slow
def test_train_eval_checkpoint_and_ensemble(tmp_path):
    out = tmp_path / "run"
    metrics = train_pose.main(TINY + [f"output_dir={out}", "train.total_steps=3", "train.eval_interval=3", "save_vis=2",
                                      "loss.vis_token.mask_ratio=0.3", "loss.vis_token.mask_strategy=importance",
                                      "loss.kpt_token.mask_ratio=0.3", "tracker=none"])
    assert set(metrics) >= {"AP", "AP50", "AP75", "APm", "APl", "AR"} and 0.0 <= metrics["AP"] <= 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and rows[-1]["AP"] == metrics["AP"]
    assert (out / "checkpoints" / "best" / "model.safetensors").is_file()
    assert (out / "checkpoints" / "step_3" / "trainer_state.json").is_file()
    assert len(list((out / "vis" / "step_3").glob("*.jpg"))) == 2
    best = str(out / "checkpoints" / "best")
    single = train_pose.main(TINY + [f"output_dir={tmp_path / 'ev1'}", "eval_only=true", f"load_from={best}",
                                     "tracker=none"])
    assert single["AP"] == pytest.approx(metrics["AP"])  # the best checkpoint re-evaluates to the same AP
    ens = train_pose.main(TINY + [f"output_dir={tmp_path / 'ev2'}", "eval_only=true", f"ensemble=[{best},{best}]",
                                  "tracker=none"])
    assert ens["member0_AP"] == pytest.approx(metrics["AP"]) and ens["AP"] == pytest.approx(metrics["AP"])


def test_eval_only_without_weights_is_a_user_error(tmp_path):
    from lib.runtime import UserError

    with pytest.raises(UserError, match="eval_only"):
        train_pose.main(TINY + [f"output_dir={tmp_path}", "eval_only=true", "tracker=none"])


def test_every_pose_config_parses():
    from pathlib import Path

    from lib.config import build_config, load_yaml

    names = sorted(p.name for p in Path("configs/pose").glob("*.yaml"))
    assert {"sample.yaml", "coco_mini.yaml", "seed_baseline.yaml", "seed_importance0.3.yaml", "seed_mixed.yaml"} <= set(names)
    for name in names:
        cfg = build_config(train_pose.PoseConfig, load_yaml(Path("configs/pose") / name))
        assert cfg.model.name in ("t", "s-v1", "s-v2") and cfg.data.image_size == (192, 256)
    mixed = build_config(train_pose.PoseConfig, load_yaml("configs/pose/seed_mixed.yaml"))
    assert (mixed.loss.vis_token.mask_strategy, mixed.loss.kpt_token.mask_strategy) == ("importance", "random")
    asym = build_config(train_pose.PoseConfig, load_yaml("configs/pose/seed_weight_asym.yaml"))
    assert asym.loss.kpt_token.loss_weight == 10 * asym.loss.vis_token.loss_weight and asym.loss.kpt_token.mask_ratio == 0.3
