import math

import pytest
import torch

from lib.config import ScheduleConfig
from lib.schedules import lr_scheduler, schedule_factor


def f(step, total=100, **kw):
    return schedule_factor(step, total, ScheduleConfig(**kw))


def test_constant_and_linear_warmup():
    assert f(0, name="constant") == 1.0
    # warm-up multiplies: s + (1 - s) * step / warmup
    assert f(0, name="constant", warmup_steps=10, warmup_start_factor=0.1) == pytest.approx(0.1)
    assert f(5, name="constant", warmup_steps=10, warmup_start_factor=0.1) == pytest.approx(0.55)
    assert f(10, name="constant", warmup_steps=10, warmup_start_factor=0.1) == 1.0


def test_hold_warmup_for_progressive_dropout():
    cfg = dict(name="constant", warmup_steps=10000, warmup_mode="hold", warmup_start_factor=0.0)
    assert f(9999, total=100000, **cfg) == 0.0 and f(10000, total=100000, **cfg) == 1.0


def test_step_multistep():
    assert f(25, name="step", step_size=10, gamma=0.5) == pytest.approx(0.25)
    assert f(9, name="multistep", milestones=[10, 20], gamma=0.1) == 1.0
    assert f(10, name="multistep", milestones=[10, 20], gamma=0.1) == pytest.approx(0.1)
    assert f(25, name="multistep", milestones=[10, 20], gamma=0.1) == pytest.approx(0.01)


def test_cosine_linear_poly():
    assert f(50, name="cosine") == pytest.approx(0.5)
    assert f(100, name="cosine") == pytest.approx(0.0)
    assert f(25, name="cosine", min_factor=0.2) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(30, name="linear") == pytest.approx(0.7)
    assert f(50, name="poly", power=2.0) == pytest.approx(0.25)
    assert f(50, name="poly", power=1.0, min_factor=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    # poly with warm-up (mmseg: warm-up factor times the regular value)
    assert f(5, name="poly", warmup_steps=10, warmup_start_factor=0.0) == pytest.approx(0.5 * 0.95)
    assert f(200, name="linear") == 0.0  # clamped past the end


def test_sgdr_restarts():
    kw = dict(name="sgdr", restart_period=10)
    assert f(0, **kw) == 1.0 and f(10, **kw) == 1.0 and f(20, **kw) == 1.0
    assert f(5, **kw) == pytest.approx(0.5)
    kw2 = dict(name="sgdr", restart_period=10, restart_mult=2.0)  # periods 10, 20, 40
    assert f(10, **kw2) == 1.0 and f(20, **kw2) == pytest.approx(0.5) and f(30, **kw2) == 1.0


def test_lambda_lr_keeps_group_multipliers():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1], "lr": 1.0}, {"params": [p2], "lr": 10.0}], lr=1.0)
    sch = lr_scheduler(opt, ScheduleConfig(name="linear"), total_steps=10)
    for _ in range(3):
        opt.step()
        sch.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.7, 7.0])
