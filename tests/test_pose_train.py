"""train_pose.py end to end on the bundled sample: train -> eval (AP) -> checkpoints -> ensemble eval."""

from __future__ import annotations

import json

import pytest

import train_pose

TINY = ["--config", "configs/pose/sample.yaml", "model.depth=1", "model.dim=32", "model.heads=2",
        "data.image_size=[48,64]", "train.batch_size=4", "eval.batch_size=64", "data.det_file="]  # gt boxes: 12 crops


@pytest.fixture(autouse=True)
def _no_curve_pictures(monkeypatch):
    """RunLog.close draws metrics.png / losses.png (~1.7 s of matplotlib per run here); tests/test_logging.py
    covers the pictures, these tests only read the records."""
    monkeypatch.setattr("lib.logging.plot_curves", lambda run_dir: None)


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
        assert (cfg.train.best_metric, cfg.train.best_mode) == ("AP", "max")


R, I = "random", "importance"
PLAN = {  # config: (vis (weight, ratio, strategy) or None, kpt ..., epochs, milestones, batch, lr)
    "seed_baseline": (None, None, 300, [200, 260], 64, 1e-3),
    "seed_random0.2": ((1e-5, 0.2, R), (1e-5, 0.2, R), 300, [200, 260], 64, 1e-3),
    "seed_random0.3": ((1e-5, 0.3, R), (1e-5, 0.3, R), 300, [200, 260], 64, 1e-3),
    "seed_random0.5": ((5e-6, 0.5, R), (5e-6, 0.5, R), 300, [200, 260], 64, 1e-3),
    "seed_random0.7": ((1e-6, 0.7, R), (1e-6, 0.7, R), 300, [200, 260], 64, 1e-3),
    "seed_importance0.3": ((1e-5, 0.3, I), (1e-5, 0.3, I), 300, [200, 260], 64, 1e-3),
    "seed_weight_strong": ((1e-4, 0.3, R), (1e-4, 0.3, R), 300, [200, 260], 64, 1e-3),
    "seed_weight_weak": ((1e-6, 0.3, R), (1e-6, 0.3, R), 300, [200, 260], 64, 1e-3),
    "seed_weight_asym": ((1e-5, 0.3, R), (5e-5, 0.3, R), 300, [200, 260], 64, 1e-3),
    "seed_mixed": ((1e-5, 0.3, R), (2e-5, 0.3, I), 300, [200, 260], 64, 1e-3),
    "seed_cycle3": (None, None, 300, [200, 260], 64, 1e-3),
    "seed_quick": (None, None, 100, [70, 90], 64, 1e-3),
    "seed_finetune": (None, None, 50, [30, 45], 64, 1e-4),
    "seed_batch128": (None, None, 300, [200, 260], 128, 2e-3),
    "seed_batch32": (None, None, 300, [200, 260], 32, 5e-4),
}


def test_plan_configs_carry_the_plans_values():
    from lib.config import build_config, load_yaml

    for name, (vis, kpt, epochs, milestones, batch, lr) in PLAN.items():
        cfg = build_config(train_pose.PoseConfig, load_yaml(f"configs/pose/{name}.yaml"))
        for term, want in ((cfg.loss.vis_token, vis), (cfg.loss.kpt_token, kpt)):
            got = None if term is None else (term.loss_weight, term.mask_ratio, term.mask_strategy)
            assert got == want, name
        assert (cfg.train.unit, cfg.train.total_steps, cfg.sched.milestones) == ("epoch", epochs, milestones), name
        assert (cfg.train.batch_size, cfg.optim.lr, cfg.optim.name, cfg.optim.scale_lr_with_batch) == \
            (batch, lr, "adam", False), name
        assert cfg.model.name == "s-v1" and cfg.model.cycle_num == (3 if name == "seed_cycle3" else 0), name
    quick = build_config(train_pose.PoseConfig, load_yaml("configs/pose/seed_quick.yaml"))
    assert (quick.train.eval_interval, quick.train.ckpt_interval, quick.train.max_keep_ckpts) == (5, 5, 2)
    ft = build_config(train_pose.PoseConfig, load_yaml("configs/pose/seed_finetune.yaml"))
    assert ft.load_from.endswith("runs/seed_baseline/checkpoints/best") and ft.sched.warmup_steps == 0


def test_null_token_terms_are_off(tmp_path):
    from lib.config import parse_config

    cfg = parse_config(train_pose.PoseConfig, ["--config", "configs/pose/coco_s_v1.yaml", "loss.vis_token=null"])
    assert cfg.loss.vis_token is None and cfg.loss.kpt_token.loss_weight == 5e-6
    out = tmp_path / "off"
    train_pose.main(TINY + [f"output_dir={out}", "train.total_steps=1", "train.eval_interval=1", "tracker=none",
                            "loss.vis_token=null", "loss.kpt_token=null"])
    row = json.loads((out / "train.jsonl").read_text().splitlines()[-1])
    assert "loss_vis_token_dist" not in row and "loss_kpt_token_dist" not in row and row["loss_heatmap"] > 0


def test_plan_configs_run_on_the_sample(tmp_path):
    """Two plan configs as written (the others differ only in values checked above): seed_baseline in its
    epoch units (1 epoch = 12 persons / batch 4 = 3 steps, token terms off), then seed_mixed fine-tuning
    from it for 1 step (both token terms on, random + importance masking; load_from as seed_finetune)."""
    tiny = ["model.depth=1", "model.dim=32", "model.heads=2", "data.image_size=[48,64]", "train.batch_size=4",
            "eval.batch_size=64", "data.root=tests/data/pose", "data.train_ann=test_coco.json",
            "data.train_images=images", "data.val_ann=test_coco.json", "data.val_images=images", "data.det_file=",
            "train.total_steps=1", "train.eval_interval=1", "train.ckpt_interval=1", "train.num_workers=0",
            "tracker=none", "eval.flip_test=false"]
    base = tmp_path / "seed_baseline"
    m = train_pose.main(["--config", "configs/pose/seed_baseline.yaml", *tiny, f"output_dir={base}"])
    assert 0.0 <= m["AP"] <= 1.0
    rows = [json.loads(x) for x in (base / "train.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and "loss_vis_token_dist" not in rows[-1]  # train.unit=epoch: 1 epoch x 3 steps
    assert "3 steps/epoch, 3 steps" in (base / "log.txt").read_text()
    assert [json.loads(x)["step"] for x in (base / "metrics.jsonl").read_text().splitlines()] == [3]
    assert sorted(p.name for p in (base / "checkpoints").iterdir()) == ["best", "step_3"]
    mixed = tmp_path / "seed_mixed"
    m = train_pose.main(["--config", "configs/pose/seed_mixed.yaml", *tiny, "train.unit=step",
                         f"load_from={base / 'checkpoints' / 'best'}", f"output_dir={mixed}"])
    row = json.loads((mixed / "train.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 1 and row["loss_vis_token_dist"] > 0 and row["loss_kpt_token_dist"] > 0
    assert 0.0 <= m["AP"] <= 1.0 and f"from {base / 'checkpoints' / 'best'}" in (mixed / "log.txt").read_text()


def test_ema_ctrl_c_resume_is_bit_identical_and_keeps_the_best(tmp_path, monkeypatch):
    """ema.decay=0.9 logs ema_AP and keeps checkpoints/best_ema; a Ctrl-C (SIGINT) after step 2 (mid-epoch)
    saves step_2, and resume=auto ends at step 4 with the weights and EMA weights of an uninterrupted run;
    the best checkpoint from before the resume is kept when the evaluation after it is worse."""
    import os
    import signal

    import torch
    from safetensors.torch import load_file

    args = TINY + ["ema.decay=0.9", "train.total_steps=4", "train.eval_interval=2", "train.ckpt_interval=4",
                   "train.log_interval=1",
                   "loss.vis_token.mask_ratio=0.3", "tracker=none", "eval.flip_test=false"]
    full, part = tmp_path / "full", tmp_path / "part"
    m = train_pose.main(args + [f"output_dir={full}"])
    assert {"AP", "ema_AP", "ema_AR"} <= set(m)
    assert [r["step"] for r in map(json.loads, (full / "metrics.jsonl").read_text().splitlines())] == [2, 4]
    assert (full / "checkpoints" / "best_ema" / "model.safetensors").is_file()

    class CtrlCAtStep2(train_pose.RunLog):
        def train_step(self, step, *a, **kw):
            super().train_step(step, *a, **kw)
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)  # the handler asks the loop to stop after this step

    monkeypatch.setattr(train_pose, "RunLog", CtrlCAtStep2)
    train_pose.main(args + [f"output_dir={part}"])
    monkeypatch.undo()
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["best", "best_ema", "step_2"]
    assert "interrupted at step 2" in (part / "log.txt").read_text()
    state = part / "checkpoints" / "best" / "trainer_state.json"
    state.write_text(json.dumps(json.loads(state.read_text()) | {"AP": 1.0}))  # an unbeatable best before the resume
    best_bytes = (part / "checkpoints" / "best" / "model.safetensors").read_bytes()
    m2 = train_pose.main(args + [f"output_dir={part}", "resume=auto"])
    assert "resumed at step 2" in (part / "log.txt").read_text()
    a, b = (load_file(d / "checkpoints" / "step_4" / "model.safetensors") for d in (full, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = (torch.load(d / "checkpoints" / "step_4" / "custom_checkpoint_0.pkl", weights_only=False)["module"]
              for d in (full, part))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    assert not all(torch.equal(ea[k], a[k]) for k in a)  # the EMA is not the raw weights
    assert m2 == m  # same evaluation numbers at step 4
    train_rows = [[r for r in map(json.loads, (d / "train.jsonl").read_text().splitlines())] for d in (full, part)]
    assert [(r["step"], r["loss"]) for r in train_rows[0]] == [(r["step"], r["loss"]) for r in train_rows[1]]
    assert (part / "checkpoints" / "best" / "model.safetensors").read_bytes() == best_bytes
    assert json.loads(state.read_text())["step"] == 2


def write_tiny_coco(tmp_path, train_persons, val_persons):
    """A COCO keypoints json pair on one bundled sample image: persons = [(box, joints (17, 2)), ...]."""
    import shutil

    import numpy as np

    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    src = json.load(open("tests/data/pose/test_coco.json"))
    im = dict(src["images"][0])
    shutil.copy(f"tests/data/pose/images/{im['file_name']}", root / "images" / im["file_name"])

    def write(name, persons):
        anns = [{"id": i + 1, "image_id": im["id"], "category_id": 1, "iscrowd": 0, "bbox": list(box),
                 "area": float(box[2] * box[3]), "num_keypoints": 17,
                 "keypoints": np.concatenate([j, np.full((17, 1), 2)], 1).reshape(-1).tolist()}
                for i, (box, j) in enumerate(persons)]
        (root / name).write_text(json.dumps({"images": [im], "annotations": anns, "categories": src["categories"]}))

    write("train.json", train_persons)
    write("val.json", val_persons)
    return root, im


def test_mean_pose_baseline_equals_a_hand_computed_ap(tmp_path):
    """Two train persons whose normalised joints average to u; one val person = u placed in its box
    shifted by d pixels: OKS_j = exp(-d^2 / (2 area (2 sigma_j)^2)), AP = share of the 10 thresholds passed."""
    import numpy as np

    from lib.data.coco import COCO_SIGMAS

    rng = np.random.default_rng(0)
    u = rng.uniform(0.3, 0.7, (17, 2))
    boxes = [(100.0, 50.0, 60.0, 80.0), (200.0, 40.0, 90.0, 120.0)]  # aspect 0.75: crop = box * 1.25

    def place(box, uv):
        crop = np.array([box[2], box[3]]) * 1.25
        center = np.array([box[0] + box[2] / 2, box[1] + box[3] / 2])
        return center - crop / 2 + uv * crop

    train = [(boxes[0], place(boxes[0], u - 0.05)), (boxes[1], place(boxes[1], u + 0.05))]
    vbox, d = (150.0, 60.0, 75.0, 100.0), 7.0  # OKS 0.730: passes 0.5 .. 0.7, fails 0.75 .. 0.95
    root, im = write_tiny_coco(tmp_path, train, [(vbox, place(vbox, u) + np.array([d, 0.0]))])
    area = vbox[2] * vbox[3]
    oks = np.exp(-d ** 2 / (2 * area * (2 * COCO_SIGMAS) ** 2)).mean()
    want = np.mean([oks >= t for t in np.linspace(0.5, 0.95, 10)])
    assert 0 < want < 1  # the shift lands between thresholds
    m = train_pose.main(["--config", "configs/pose/sample.yaml", f"data.root={root}", "data.train_ann=train.json",
                         "data.train_images=images", "data.val_ann=val.json", "data.val_images=images",
                         "data.det_file=", "eval_only=true", "baseline=mean_pose", "tracker=none",
                         f"output_dir={tmp_path / 'run'}", "data.image_size=[48,64]"])
    assert m["AP"] == pytest.approx(want, abs=1e-6) and m["AR"] == pytest.approx(want, abs=1e-6)


def test_eval_only_reads_no_training_annotations_and_logs_the_step(tmp_path):
    out = tmp_path / "run"
    train_pose.main(TINY + [f"output_dir={out}", "train.total_steps=2", "train.eval_interval=2", "tracker=none",
                            "eval.flip_test=false"])
    best = out / "checkpoints" / "best"
    m = train_pose.main(TINY + [f"output_dir={tmp_path / 'ev'}", "eval_only=true", f"load_from={best}",
                                "data.train_ann=missing.json", "data.train_images=missing", "tracker=none",
                                "eval.flip_test=false"])
    assert m["AP"] == pytest.approx(json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["AP"])
    log = (tmp_path / "ev" / "log.txt").read_text()
    assert "no training data read" in log and "at step 2" in log
    assert not (tmp_path / "ev" / "checkpoints").exists()  # eval_only writes no checkpoints
    assert json.loads((tmp_path / "ev" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_eval_only_follows_the_member_rule(tmp_path):
    """ensemble without load_from evaluates exactly the ensemble (not a resumed model)."""
    out = tmp_path / "run"
    train_pose.main(TINY + [f"output_dir={out}", "train.total_steps=1", "train.eval_interval=1", "tracker=none",
                            "eval.flip_test=false"])
    best = out / "checkpoints" / "best"
    m = train_pose.main(TINY + [f"output_dir={out}", "eval_only=true", "resume=auto", f"ensemble=[{best}]",
                                "tracker=none", "eval.flip_test=false"])
    assert "member0_AP" not in m  # one member: the ensemble of one, no resumed model added
    assert "eval_only: 1 model(s)" in (out / "log.txt").read_text()


def test_folds_validate_on_held_out_training_images(tmp_path):
    from lib.data.coco import fold_image_ids, load_coco_json

    coco = load_coco_json(__import__("pathlib").Path("tests/data/pose/test_coco.json"))
    tr, va = fold_image_ids(coco, 2, 0)
    tr1, va1 = fold_image_ids(coco, 2, 1)
    assert tr | va == {im["id"] for im in coco["images"]} and not tr & va and va1 == tr and tr1 == va
    out = tmp_path / "f0"
    train_pose.main(TINY + [f"output_dir={out}", "train.total_steps=1", "train.eval_interval=1", "tracker=none",
                            "data.folds=2", "data.fold=0", "train.batch_size=2", "eval.flip_test=false"])
    log = (out / "log.txt").read_text()
    n_val = sum(a["image_id"] in va and max(a["keypoints"]) > 0 for a in coco["annotations"])
    assert f"{n_val} val boxes from fold 0 of 2" in log


def test_predict_writes_coco_results_and_export_matches_onnxruntime(tmp_path):
    import numpy as np

    out = tmp_path / "run"
    train_pose.main(TINY + [f"output_dir={out}", "train.total_steps=1", "train.eval_interval=1", "tracker=none",
                            "eval.flip_test=false"])
    best = str(out / "checkpoints" / "best")
    img = "tests/data/pose/images/000000000785.jpg"
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([{"image_id": 785, "bbox": [280, 44, 218, 346], "score": 0.9},
                                 {"file_name": "000000000785.jpg", "bbox": [10, 10, 100, 200], "score": 0.5}]))
    pred = tmp_path / "pred"
    r = train_pose.main(TINY + [f"output_dir={pred}", f"load_from={best}", f"predict={img}", "eval.decode=argmax",
                                f"predict_boxes={boxes}", "tracker=none"])  # argmax: joints on heatmap pixels
    res = json.loads((pred / "predict" / "keypoints.json").read_text())
    assert r["predictions"] == 2 and [p["bbox"] for p in res] == [[280, 44, 218, 346], [10, 10, 100, 200]]
    k = np.array(res[0]["keypoints"]).reshape(17, 3)
    half_w = 346 * 0.75 * 1.25 / 2  # the padded crop of the box (width 0.75 x height x 1.25): joints lie inside
    assert res[0]["image_id"] == 785 and (np.abs(k[:, 0] - (280 + 109)) <= half_w + 1).all()
    assert (pred / "predict" / "000000000785.jpg").is_file() and not (pred / "checkpoints").exists()
    whole = train_pose.main(TINY + [f"output_dir={tmp_path / 'whole'}", f"load_from={best}",
                                    "predict=tests/data/pose/images", "tracker=none"])
    assert whole["predictions"] == len(list(__import__("pathlib").Path("tests/data/pose/images").glob("*.jpg")))
    pytest.importorskip("onnxruntime")
    ex = train_pose.main(TINY + [f"output_dir={tmp_path / 'ex'}", f"load_from={best}", "export=onnx",
                                 "tracker=none"])
    assert (tmp_path / "ex" / "export" / "model.onnx").is_file() and ex["onnx_max_abs_diff"] < 1e-4
    assert not (tmp_path / "ex" / "checkpoints").exists()


@pytest.mark.slow
def test_predict_on_two_processes_equals_one(tmp_path):
    """predict= on 2 processes (torchrun, gloo): each predicts every other image; the main process writes
    the same keypoints.json as one process (same images, boxes and joints)."""
    import os
    import subprocess
    import sys

    import numpy as np

    out = tmp_path / "run"
    train_pose.main(TINY + [f"output_dir={out}", "train.total_steps=1", "train.eval_interval=1", "tracker=none"])
    cmd = ["train_pose.py", *TINY, f"load_from={out / 'checkpoints' / 'best'}", "predict=tests/data/pose/images",
           "tracker=none"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *cmd,
                          f"output_dir={tmp_path / 'two'}"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    train_pose.main(cmd[1:] + [f"output_dir={tmp_path / 'one'}"])
    a, b = (json.loads((tmp_path / r / "predict" / "keypoints.json").read_text()) for r in ("one", "two"))
    n = len(list(__import__("pathlib").Path("tests/data/pose/images").glob("*.jpg")))
    assert len(a) == n >= 3 and sorted(p["file_name"] for p in a) == sorted(p["file_name"] for p in b)
    key = {p["file_name"]: p for p in b}
    for p in a:
        q = key[p["file_name"]]
        assert q["bbox"] == p["bbox"]
        np.testing.assert_allclose(q["keypoints"], p["keypoints"], atol=1e-3)
    assert len(list((tmp_path / "two" / "predict").glob("*.jpg"))) == n
