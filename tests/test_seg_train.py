"""End-to-end train_seg.py on the bundled sample: learning, resume, 2 processes, eval/ensemble, errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_seg
from tests.conftest import ROOT

TINY = ["--config", "configs/seg/sample.yaml", "tracker=none", "data.scale=[120,90]", "data.crop_size=[64,64]",
        "train.num_workers=0", "train.log_interval=1"]


def run(tmp, *extra):
    return train_seg.main(TINY + [f"output_dir={tmp}", *extra])


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(path):
    return load_file(str(path / "model.safetensors"))


def test_overfit_one_batch_loss_drops(tmp_path):
    run(tmp_path, "train.total_steps=30", "train.batch_size=2", "train.eval_interval=30", "train.ckpt_interval=30",
        "data.ratio_range=[1.0,1.0]", "data.photometric=false", "data.flip_prob=0", "optim.lr=2e-3",
        "sched.name=constant", "sched.warmup_steps=0", "data.folds=3", "data.fold=0")
    rows = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss_ce"], sum(r["loss_ce"] for r in rows[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "checkpoints" / "best").is_dir()
    assert (tmp_path / "metrics.png").is_file() and (tmp_path / "losses.png").is_file()


def test_resume_is_bit_identical(tmp_path):
    common = ["train.total_steps=6", "train.batch_size=2", "train.eval_interval=100", "train.ckpt_interval=2",
              "train.max_keep_ckpts=5", "train.grad_accum_steps=1"]
    full = tmp_path / "full"
    run(full, *common)  # 6 images / batch 2 = 3 steps per epoch: step 4 is mid-epoch
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_4", part / "checkpoints" / "step_4")
    run(part, *common, "resume=auto")
    a, b = weights(full / "checkpoints" / "step_6"), weights(part / "checkpoints" / "step_6")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((part / "checkpoints" / "step_6" / "trainer_state.json").read_text())
    assert state["step"] == 6


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    run(tmp_path, "train.total_steps=2", "train.batch_size=1", "train.grad_accum_steps=3", "train.eval_interval=2",
        "train.ckpt_interval=2", "sched.name=linear", "sched.warmup_steps=0", "optim.lr=1e-3")
    rows = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 0.5e-3])  # schedule advanced once per 3 micro-batches
    state = json.loads((tmp_path / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state == {"step": 2, "epoch": 0}  # 6 images / 3 per step: both steps in epoch 0


def test_eval_only_and_ensemble_of_identical_checkpoints(tmp_path):
    train_dir = tmp_path / "train"
    run(train_dir, "train.total_steps=4", "train.batch_size=2", "train.eval_interval=4", "train.ckpt_interval=4")
    best = train_dir / "checkpoints" / "best"
    member = run(tmp_path / "eval", "eval_only=true", f"load_from={best}", "--save-vis")
    assert member["mIoU"] == pytest.approx(metrics(train_dir)[-1]["mIoU"])
    assert len(list((tmp_path / "eval" / "vis").glob("*.png"))) == 2
    ens = run(tmp_path / "ens", "eval_only=true", f"ensemble=[{best},{best}]")
    assert ens["mIoU"] == pytest.approx(member["mIoU"], abs=1e-6)
    assert ens["member0_mIoU"] == pytest.approx(member["mIoU"], abs=1e-6)


def test_distillation_runs_and_reports_each_term(tmp_path):
    teacher = tmp_path / "teacher"
    run(teacher, "train.total_steps=2", "train.batch_size=2", "train.eval_interval=2", "train.ckpt_interval=2",
        "model.variant=b1")
    run(tmp_path / "kd", "train.total_steps=2", "train.batch_size=2", "train.eval_interval=2", "train.ckpt_interval=2",
        "kd.teacher_variant=b1", f"kd.teacher_weights={teacher}/checkpoints/best", "kd.kl.weight=1",
        "kd.cwd.weight=1", "kd.at.weight=10", "kd.sp.weight=10")
    row = json.loads((tmp_path / "kd" / "train.jsonl").read_text().splitlines()[-1])
    for k in ("loss_ce", "loss_kl", "loss_cwd", "loss_at", "loss_sp"):
        assert row[k] > 0, k
    assert row["loss"] == pytest.approx(sum(row[k] for k in ("loss_ce", "loss_kl", "loss_cwd", "loss_at", "loss_sp")),
                                        rel=1e-4)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "train_seg.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize("extra, message", [
    (["train.bogus=1"], "config error: unknown config key 'train.bogus'"),
    (["data.root=/nonexistent/camvid"], "error: dataset root folder not found: /nonexistent/camvid"),
    (["load_from=/nonexistent/w.safetensors"], "error: weight file not found: /nonexistent/w.safetensors"),
    (["optim.lr=1e30", "sched.warmup_steps=0", "train.total_steps=3"], "error: non-finite loss at step"),
])
def test_bad_input_gives_one_line_error(tmp_path, extra, message):
    r = _cli(*TINY, f"output_dir={tmp_path}", "train.batch_size=2", *extra)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(message), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_two_processes_equal_one_process_with_same_global_batch(tmp_path):
    common = TINY + ["train.total_steps=4", "train.eval_interval=2", "train.ckpt_interval=4", "sched.warmup_steps=0",
                     "model.drop_path_rate=0", "model.decoder_dropout=0", "optim.name=sgd", "optim.lr=0.05"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train_seg.py",
                          *common, "train.batch_size=1", f"output_dir={tmp_path / 'two'}"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "train_seg.py", *common, "train.batch_size=2", f"output_dir={tmp_path / 'one'}"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [2, 4]
    for r1, r2 in zip(m1, m2):
        for k in ("mIoU", "mAcc", "aAcc"):
            assert r1[k] == pytest.approx(r2[k], abs=0.01), (k, r1[k], r2[k])
    w1, w2 = weights(tmp_path / "one" / "checkpoints" / "step_4"), weights(tmp_path / "two" / "checkpoints" / "step_4")
    for k in w1:  # BN running statistics: float sums in another order, amplified by 4 SGD steps at lr 0.05
        if w1[k].is_floating_point():
            tol = 1e-2 if "running_" in k else 1e-3
            assert torch.allclose(w1[k], w2[k], rtol=tol, atol=tol), k
    # the two processes really formed one group: each saw half of every global batch
    assert "processes: 2" in (tmp_path / "two" / "log.txt").read_text()
