"""The seg configs say what they claim: the KD report's recipe read back, the next-steps sweep file, the
comparison file (every arm a valid train_seg config), and the report's recipe running on the sample."""

import json
import re

import pytest

import train_seg
from lib.config import build_config, load_yaml
from lib.runs import compare_jobs, load_compare
from lib.study import load_sweep
from tests.conftest import ROOT

TINY = ["tracker=none", "data.root=tests/data/seg", "data.scale=[120,90]", "data.crop_size=[64,64]",
        "train.num_workers=0", "train.log_interval=1"]


def seg_cfg(path, overrides=()):
    return build_config(train_seg.SegConfig, load_yaml(ROOT / path), list(overrides))


def test_report_recipe_values():
    cfg = seg_cfg("configs/seg/camvid_b0_kd_b2_report.yaml")
    kd = cfg.kd
    assert (kd.kl.weight, kd.kl.temperature) == (1.0, 4.0)
    assert (kd.at.weight, kd.sp.weight, kd.cwd.weight) == (1.0, 1.0, 0.0)
    assert cfg.optim.lr == 3e-5 and cfg.train.batch_size == 4
    assert kd.teacher_variant == "b2" and cfg.model.variant == "b0" and cfg.data.num_classes == 11
    ours = seg_cfg("configs/seg/camvid_b0_kd_b2.yaml")  # ours differs, says so, and is one override away
    assert (ours.optim.lr, ours.train.batch_size, ours.kd.at.weight, ours.kd.sp.weight) != (3e-5, 4, 1.0, 1.0)
    text = (ROOT / "configs/seg/camvid_b0_kd_b2.yaml").read_text()
    assert "camvid_b0_kd_b2_report.yaml" in text
    line = next(x for x in text.splitlines() if "one override away" in x)
    back = seg_cfg("configs/seg/camvid_b0_kd_b2.yaml", line.split(":", 1)[1].split())
    assert (back.optim.lr, back.train.batch_size, back.kd.cwd.weight, back.kd.at.weight, back.kd.sp.weight,
            back.kd.kl.weight, back.kd.kl.temperature) == (3e-5, 4, 0.0, 1.0, 1.0, 1.0, 4.0)


def test_next_steps_sweep_file():
    sweep, _ = load_sweep(ROOT / "configs/sweeps/seg_kd_next.yaml")
    assert sweep.config == "configs/seg/camvid_b0_kd_b2_report.yaml"
    assert {"optim.lr=2.0e-5", "sched.warmup_steps=2000"} <= set(sweep.overrides)
    for term in ("at", "sp"):
        spec = sweep.space[f"kd.{term}.weight"]
        assert (spec["low"], spec["high"]) == (0.1, 0.5)
    assert sweep.space["kd.kl.temperature"]["choices"] == [1.0, 2.0, 4.0, 8.0]
    for params in sweep.enqueue:  # every key a trial sets is a train_seg key, with the file's values applied
        cfg = seg_cfg(sweep.config, [*sweep.overrides, *(f"{k}={v}" for k, v in params.items())])
        assert cfg.optim.lr == 2e-5 and cfg.sched.warmup_steps == 2000 and 0.1 <= cfg.kd.at.weight <= 0.5


def test_comparison_file_arms_are_valid_seg_configs():
    cmp, out = load_compare(ROOT / "configs/compare/seg.yaml")
    assert [a.name for a in cmp.arms] == ["b0", "kd_kl", "kd_cwd"] and cmp.baseline == "b0"
    assert cmp.seeds == [0, 1, 2] and cmp.metric == "mIoU" and cmp.mode == "max"
    assert [t.overrides for t in cmp.trivial] == [["eval_only=true", "baseline=majority"]]
    jobs = compare_jobs(cmp, out)
    assert len(jobs) == 1 + 3 * 3
    cfgs = {a.name: seg_cfg(cmp.config, [*cmp.overrides, *a.overrides]) for a in cmp.arms}
    assert cfgs["b0"].kd.teacher_variant == "" and cfgs["kd_kl"].kd.kl.weight == 1.0
    assert cfgs["kd_cwd"].kd.cwd.weight == 3.0 and cfgs["kd_cwd"].kd.kl.weight == 0.0
    assert cfgs["b0"].data.scale == (240, 180) and cfgs["b0"].train.total_steps == 200
    # the teacher the arms read is the one the file's prerequisite command writes
    teacher = re.search(r"output_dir=(\S+)", (ROOT / "configs/compare/seg.yaml").read_text())[1]
    assert cfgs["kd_kl"].kd.teacher_weights.endswith(f"{teacher}/checkpoints/best")


def test_report_recipe_runs_on_the_sample(tmp_path):
    teacher = tmp_path / "teacher"
    train_seg.main(["--config", "configs/seg/sample.yaml", *TINY, f"output_dir={teacher}", "model.variant=b2",
                    "train.total_steps=1", "train.batch_size=2", "train.eval_interval=1", "train.ckpt_interval=1"])
    train_seg.main(["--config", "configs/seg/camvid_b0_kd_b2_report.yaml", *TINY, f"output_dir={tmp_path / 'kd'}",
                    f"kd.teacher_weights={teacher}/checkpoints/best", "train.total_steps=2", "train.eval_interval=2",
                    "train.ckpt_interval=2", "sched.warmup_steps=0"])
    rows = [json.loads(x) for x in (tmp_path / "kd" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r[k] > 0 for r in rows for k in ("loss_ce", "loss_kl", "loss_at", "loss_sp")) and "loss_cwd" not in rows[0]
    assert rows[0]["lr"] == pytest.approx(3e-5)
