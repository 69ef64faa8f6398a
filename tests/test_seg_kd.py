import pytest
import torch

from lib.losses import seg_kd

LOSSES = {
    "kl": lambda s, t: seg_kd.kl_div(s, t, temperature=4.0),
    "cwd": lambda s, t: seg_kd.channel_wise(s, t, temperature=4.0),
    "at": seg_kd.attention_transfer,
    "sp": seg_kd.similarity_preserving,
}


@pytest.mark.parametrize("name", LOSSES)
def test_zero_when_student_equals_teacher(name):
    t = torch.randn(3, 5, 8, 6)
    assert LOSSES[name](t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_gradient_step_moves_student_towards_teacher(name):
    torch.manual_seed(0)
    t = torch.randn(3, 5, 8, 6)
    s = (t + 0.5 * torch.randn_like(t)).requires_grad_(True)
    loss = LOSSES[name](s, t)
    assert loss.item() > 0
    loss.backward()
    assert t.grad is None  # teacher never receives gradient
    with torch.no_grad():
        s2 = s - 1e-2 * s.grad / s.grad.norm()
    assert LOSSES[name](s2, t).item() < loss.item()


def test_kl_matches_formula_and_temperature_scaling():
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    T = 2.0
    pt = torch.softmax(t / T, 1)
    ref = (pt * (pt.log() - torch.log_softmax(s / T, 1))).sum(1).mean() * T * T
    assert seg_kd.kl_div(s, t, T).item() == pytest.approx(ref.item(), rel=1e-5)


def test_at_and_sp_work_across_channel_counts():
    s, t = torch.randn(4, 8, 6, 6), torch.randn(4, 32, 6, 6)
    assert seg_kd.attention_transfer(s, t).item() > 0
    assert seg_kd.similarity_preserving(s, t).item() > 0
