"""Hand training: few-image overfits where the joint and the MANO theta / beta losses drop, and
train_hand.py end to end on the bundled sample (metrics.jsonl with val_loss and mpjpe_fluct, overlay
PNG, the plan's log line, best weights, eval_only without the training split, the mean-pose
baseline through the eval path, predict and ONNX export, EMA + Ctrl-C + exact resume keeping the
best checkpoints, epoch units)."""

from __future__ import annotations

import json
import re
import shutil
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

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
    assert not (tmp_path / "eval" / "checkpoints").exists()  # eval_only writes no checkpoints


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
    assert not (out / "checkpoints").exists()  # predict / export write no checkpoints


@pytest.fixture
def no_plots(monkeypatch):
    """Skip metrics.png / losses.png (matplotlib redraws every panel at each evaluation: most of a sample run's time)."""
    monkeypatch.setattr("lib.logging.plot_curves", lambda run_dir: None)


def _ctrl_c_after(step_n: int):
    """RunLog.train_step that sends this process SIGINT (Ctrl-C) once step `step_n` is logged."""
    from lib.logging import RunLog

    orig = RunLog.train_step

    def train_step(self, step, *args, **kwargs):
        orig(self, step, *args, **kwargs)
        if step == step_n:
            signal.raise_signal(signal.SIGINT)

    return train_step


def test_ema_ctrl_c_resume_is_exact_and_keeps_the_best(tmp_path, monkeypatch, no_plots):
    """ema.decay=0.9: ema_* metrics and checkpoints/best_ema. A run stopped by Ctrl-C after step 4
    (mid-epoch: 12 images / batch 4 = 3 steps per epoch; dropout on from step 3) and resumed ends
    bit-identical to an uninterrupted one: model and EMA weights, every metric and loss. A worse
    evaluation after the resume (the recorded best made unbeatable) leaves checkpoints/best(_ema) alone."""
    from lib.checkpoint import step_checkpoints
    from lib.logging import RunLog
    from train_hand import main

    args = _common() + ["train.total_steps=6", "train.eval_interval=2", "train.ckpt_interval=6", "train.batch_size=4",
                        "train.log_interval=1", "train.max_keep_ckpts=0", "save_vis=0", "ema.decay=0.9",
                        "model.handec.dropout_warmup_step=2"]
    full, part = tmp_path / "full", tmp_path / "part"
    main(args + [f"output_dir={full}"])
    recs = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4, 6]
    assert all(0 < r["ema_mpjpe"] < 500 and 0 < r["ema_pa_mpjpe"] <= r["ema_mpjpe"] + 1e-6 for r in recs)
    assert recs[-1]["ema_mpjpe"] != recs[-1]["mpjpe"]  # the average lags the raw weights
    ema_best = json.loads((full / "checkpoints" / "best_ema" / "trainer_state.json").read_text())
    assert ema_best["metric"] == "mpjpe" and ema_best["mpjpe"] == min(r["ema_mpjpe"] for r in recs)
    assert ema_best["step"] == min(recs, key=lambda r: r["ema_mpjpe"])["step"]

    with monkeypatch.context() as m:
        m.setattr(RunLog, "train_step", _ctrl_c_after(4))
        main(args + [f"output_dir={part}"])
    assert step_checkpoints(part) == [part / "checkpoints" / "step_4"]
    assert "interrupted at step 4" in (part / "log.txt").read_text()
    kept = {}
    for name in ("best", "best_ema"):  # a scripted worse evaluation: the best so far becomes unbeatable
        state_file = part / "checkpoints" / name / "trainer_state.json"
        state = json.loads(state_file.read_text())
        state_file.write_text(json.dumps(state | {"mpjpe": 1e-3}))
        kept[name] = (state["step"], (part / "checkpoints" / name / "model.safetensors").read_bytes())
    main(args + [f"output_dir={part}", "resume=auto"])

    a, b = full / "checkpoints" / "step_6", part / "checkpoints" / "step_6"
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ea, eb = (torch.load(str(c / "custom_checkpoint_0.pkl"), weights_only=True)["module"] for c in (a, b))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    assert not all(torch.equal(ea[k], wa[k]) for k in ea if ea[k].is_floating_point())  # EMA != raw weights
    assert [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()] == recs
    train = [{k: v for k, v in json.loads(x).items() if k != "img/s"} for x in (full / "train.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in json.loads(x).items() if k != "img/s"}
            for x in (part / "train.jsonl").read_text().splitlines()] == train and len(train) == 6
    for name, (step, weights) in kept.items():
        assert json.loads((part / "checkpoints" / name / "trainer_state.json").read_text())["step"] == step
        assert (part / "checkpoints" / name / "model.safetensors").read_bytes() == weights

    # eval_only of the resumed model evaluates its EMA too: the numbers of the last evaluation
    ev = main(_common() + [f"output_dir={tmp_path / 'ev'}", "eval_only=true", f"resume={b}", "ema.decay=0.9"])
    assert ev["mpjpe"] == pytest.approx(recs[-1]["mpjpe"], abs=1e-6)
    assert ev["ema_mpjpe"] == pytest.approx(recs[-1]["ema_mpjpe"], abs=1e-6)
    assert not (tmp_path / "ev" / "checkpoints").exists()


def test_epoch_units_count_epochs(tmp_path, no_plots):
    """train.unit=epoch on the sample (12 images / batch 4 = 3 steps per epoch): 3 epochs = 9 steps,
    evaluation every epoch, and a 2-epoch lr warm-up = 6 steps of the schedule."""
    from lib.config import build_config, load_yaml, resolve_units
    from lib.schedules import schedule_factor
    from train_hand import HandConfig, main

    out = tmp_path / "ep"
    over = ["train.unit=epoch", "train.total_steps=3", "train.eval_interval=1", "train.ckpt_interval=3",
            "sched.warmup_steps=2", "train.batch_size=4", "train.log_interval=1", "save_vis=0"]
    main(_common() + [f"output_dir={out}"] + over)
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train] == list(range(1, 10))
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [3, 6, 9]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")) == ["step_9"]
    log = (out / "log.txt").read_text()
    assert "3 steps/epoch, 9 steps" in log and re.search(r"^step 9/9 ", log, re.M)
    cfg = resolve_units(build_config(HandConfig, load_yaml(ROOT / "configs" / "hand" / "sample.yaml"), _common()[2:] + over), 3)
    assert cfg.sched.warmup_steps == 6 and cfg.train.total_steps == 9
    want = [cfg.optim.lr * schedule_factor(i, 9, cfg.sched) for i in range(9)]  # lr of the head group at step i + 1
    assert [r["lr"] for r in train] == pytest.approx(want, rel=1e-9)


@pytest.mark.slow
def test_predict_on_two_processes_equals_one(tmp_path):
    """predict= on 2 processes (torchrun, gloo): each takes half of the images; joints.json equals one process's."""
    import os
    import subprocess
    import sys

    from lib.config import build_config, load_yaml
    from train_hand import HandConfig, build_model, main

    cfg = build_config(HandConfig, load_yaml(ROOT / "configs" / "hand" / "sample.yaml"), _common()[2:])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.set_init(joints=torch.randn(21, 3) * 0.03, cam=torch.tensor([3.0, 0.05, -0.02]))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    cmd = ["train_hand.py", *_common(), f"load_from={tmp_path / 'model.safetensors'}",
           f"predict={SAMPLE / 'evaluation' / 'rgb'}"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *cmd,
                          f"output_dir={tmp_path / 'two'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    main(cmd[1:] + [f"output_dir={tmp_path / 'one'}"])
    a, b = (json.loads((tmp_path / r / "predict" / "joints.json").read_text()) for r in ("one", "two"))
    assert len(a) == 4 and [p["image"] for p in a] == [p["image"] for p in b]
    for p, q in zip(a, b):
        assert np.allclose(p["joints3d"], q["joints3d"], atol=1e-5) and np.allclose(p["joints2d"], q["joints2d"], atol=0.02)
    assert len(list((tmp_path / "two" / "predict").glob("*.png"))) == 4
