"""lib/ema.py: the EMA rule by hand, fp32 copy, and an exact resume through accelerate's checkpoint."""

import shutil

import pytest
import torch
from torch import nn

from lib.ema import ModelEMA
from tests.test_runtime import mini


def test_ema_equals_the_hand_computed_average():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    ema = ModelEMA(model, decay=0.9, start_step=1)
    values = [1.0, 2.0, 4.0]
    for step, v in enumerate(values, 1):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(v)
            model[1].running_mean.fill_(10 * v)
        model[1].num_batches_tracked.fill_(step)
        ema.update(model, step)
    # step 1 <= start_step: copy; steps 2, 3: e = 0.9 e + 0.1 v
    e = 1.0
    for v in values[1:]:
        e = 0.9 * e + 0.1 * v
    assert e == pytest.approx(1.39)
    for name, p in ema.module.named_parameters():
        assert torch.allclose(p, torch.full_like(p, e), atol=1e-6), name
    assert torch.allclose(ema.module[1].running_mean, torch.full((3,), 10 * e), atol=1e-5)
    assert int(ema.module[1].num_batches_tracked) == 3  # integer buffers are copied
    assert ema.updates == 3 and not any(p.requires_grad for p in ema.module.parameters())


def test_ema_copy_is_fp32_and_separate():
    model = nn.Linear(4, 4).to(torch.bfloat16)
    ema = ModelEMA(model, 0.5)
    assert ema.module.weight.dtype == torch.float32
    with torch.no_grad():
        model.weight.zero_()
    before = ema.module.weight.clone()
    assert before.abs().sum() > 0  # the EMA holds its own copy
    ema.update(model, 1)  # start_step 0: averaging from step 1 on
    assert torch.equal(ema.module.weight, 0.5 * before)


def test_resume_gives_a_bit_identical_ema(tmp_path):
    common = ["train.total_steps=6", "train.eval_interval=2", "train.ckpt_interval=2", "train.max_keep_ckpts=5",
              "ema.decay=0.8", "ema.start_step=1"]
    full, part = tmp_path / "full", tmp_path / "part"
    mini(full, *common)
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_4", part / "checkpoints" / "step_4")
    mini(part, *common, "resume=auto")
    a = torch.load(full / "checkpoints" / "step_6" / "custom_checkpoint_0.pkl", weights_only=False)
    b = torch.load(part / "checkpoints" / "step_6" / "custom_checkpoint_0.pkl", weights_only=False)
    assert a["updates"] == b["updates"] == 6
    assert a["module"].keys() == b["module"].keys() and all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"])
    for name in ("best", "best_ema"):
        assert (part / "checkpoints" / name / "model.safetensors").is_file()
    # the EMA lags the raw weights: different from them after 6 steps
    raw = torch.load(full / "checkpoints" / "step_6" / "custom_checkpoint_0.pkl", weights_only=False)["module"]["0.weight"]
    from safetensors.torch import load_file

    assert not torch.equal(raw, load_file(full / "checkpoints" / "step_6" / "model.safetensors")["0.weight"])
