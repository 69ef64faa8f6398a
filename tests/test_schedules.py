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


# ----------------------------------------------------------------------------- against torch's schedulers
def torch_lrs(make, steps, base=0.5):
    """lr of one param group (base lr `base`) before each of `steps` torch scheduler steps."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sch = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    return out


def ours(steps, base=0.5, total=100, **kw):
    cfg = ScheduleConfig(**kw)
    return [base * schedule_factor(s, total, cfg, base) for s in range(steps)]


def test_step_and_multistep_equal_torch():
    assert ours(40, name="step", step_size=3, gamma=0.9) == pytest.approx(
        torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.9), 40), rel=1e-9)
    assert ours(40, name="multistep", milestones=[5, 12, 30], gamma=0.1) == pytest.approx(
        torch_lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[5, 12, 30], gamma=0.1), 40),
        rel=1e-9)
    assert ours(40, name="step", step_size=3, gamma=0.9)[7] == pytest.approx(0.5 * 0.9 ** 2)  # hand number


@pytest.mark.parametrize("t_max", [1, 7, 10, 25])
@pytest.mark.parametrize("eta_min", [0.0, 0.01])
def test_cosine_t_max_eta_min_equal_torch_past_t_max(t_max, eta_min):
    steps = 3 * t_max + 2  # past T_max the cosine rises again, as torch's
    want = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=t_max, eta_min=eta_min), steps)
    got = ours(steps, name="cosine", t_max=t_max, eta_min=eta_min)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert got[t_max] == pytest.approx(eta_min) and got[2 * t_max] == pytest.approx(0.5)


def test_eta_min_is_absolute_and_overrides_min_factor():
    # lr = eta_min + (base - eta_min) * (1 + cos(pi * 5 / 10)) / 2 = 0.01 + 0.49 * 0.5 = 0.255
    assert ours(6, name="cosine", t_max=10, eta_min=0.01, min_factor=0.9)[5] == pytest.approx(0.255)
    assert ours(11, base=2.0, name="cosine", t_max=10, eta_min=0.01)[10] == pytest.approx(0.01)
    assert ours(101, name="cosine", min_factor=0.2)[100] == pytest.approx(0.1)  # t_max = 0: total_steps, stays
    assert ours(131, name="cosine", min_factor=0.2)[130] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="eta_min"):
        schedule_factor(3, 10, ScheduleConfig(eta_min=0.1))


def test_linear_and_poly_t_max_equal_torch():
    want = torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.1,
                                                                  total_iters=8), 20)
    assert ours(20, name="linear", t_max=8, min_factor=0.1) == pytest.approx(want, rel=1e-6)
    want = torch_lrs(lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=8, power=2.0), 20)
    assert ours(20, name="poly", t_max=8, power=2.0) == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_lr_scheduler_eta_min_per_group_equals_torch():
    def groups():
        return [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0},
                {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1}]

    o1, o2 = torch.optim.SGD(groups(), lr=1.0), torch.optim.SGD(groups(), lr=1.0)
    s1 = lr_scheduler(o1, ScheduleConfig(name="cosine", t_max=6, eta_min=0.02), total_steps=100)
    s2 = torch.optim.lr_scheduler.CosineAnnealingLR(o2, T_max=6, eta_min=0.02)
    for _ in range(15):
        assert [g["lr"] for g in o1.param_groups] == pytest.approx([g["lr"] for g in o2.param_groups], rel=1e-6)
        o1.step(), o2.step(), s1.step(), s2.step()
    assert [g["lr"] for g in o1.param_groups] == pytest.approx([0.02 + 0.98 * 0.5, 0.02 + 0.08 * 0.5])  # step 15: cos(2.5 pi) = 0
