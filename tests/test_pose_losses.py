"""Pose losses: JointsMSE with target weights, masked token distillation (random / importance)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lib.losses.pose import MaskedTokenDistilLoss, joints_mse, num_masked, token_importance


def test_joints_mse_hand_computed():
    pred = torch.zeros(1, 2, 2, 2)
    target = torch.zeros(1, 2, 2, 2)
    pred[0, 0, 0, 0] = 2.0  # joint 0: one pixel off by 2
    pred[0, 1] = 5.0  # joint 1: weight 0, ignored
    loss = joints_mse(pred, target, torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(4.0 / 8)  # mean over B * J * H * W = 8 values
    assert joints_mse(pred, target, torch.tensor([[[0.5], [0.0]]])).item() == pytest.approx(1.0 / 8)


@pytest.mark.parametrize("strategy", ["random", "importance"])
@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("n", [17, 192])
def test_mask_counts_exactly_round_ratio_n(strategy, ratio, n):
    loss = MaskedTokenDistilLoss(mask_ratio=ratio, mask_strategy=strategy)
    keep = loss.keep_mask(4, n, importance=torch.rand(4, n))
    expected = int(ratio * n + 0.5)
    assert expected == num_masked(ratio, n)
    assert (~keep).sum(dim=1).tolist() == [expected] * 4


def test_importance_masks_the_lowest_attention_positions():
    imp = torch.rand(3, 50, generator=torch.Generator().manual_seed(0))
    keep = MaskedTokenDistilLoss(mask_ratio=0.3, mask_strategy="importance").keep_mask(3, 50, imp)
    for b in range(3):
        lowest = set(imp[b].argsort()[:15].tolist())
        assert set(torch.nonzero(~keep[b])[:, 0].tolist()) == lowest
        assert imp[b][~keep[b]].max() < imp[b][keep[b]].min()


def test_random_masks_differ_per_sample():
    keep = MaskedTokenDistilLoss(mask_ratio=0.5).keep_mask(8, 64, generator=torch.Generator().manual_seed(1))
    assert len({tuple(k.tolist()) for k in keep}) == 8


def test_zero_for_identical_cycles_and_plain_mse_without_mask():
    s, t = torch.randn(2, 30, 8), torch.randn(2, 30, 8)
    for strategy in ("random", "importance"):
        loss = MaskedTokenDistilLoss(loss_weight=1.0, mask_ratio=0.3, mask_strategy=strategy)
        assert loss(t, t.clone(), importance=torch.rand(2, 30)).item() == 0.0
    plain = MaskedTokenDistilLoss(loss_weight=5e-6)(s, t)
    assert plain.item() == pytest.approx(5e-6 * F.mse_loss(s, t).item(), rel=1e-6)


def test_masked_loss_is_mean_over_kept_positions():
    s, t = torch.zeros(1, 4, 2), torch.zeros(1, 4, 2)
    s[0, 0] = 1.0  # least important position, error 1 per channel
    s[0, 3] = 2.0  # most important position, error 4 per channel
    loss = MaskedTokenDistilLoss(loss_weight=1.0, mask_ratio=0.25, mask_strategy="importance")
    value = loss(s, t, importance=torch.tensor([[0.0, 1.0, 2.0, 3.0]]))
    assert value.item() == pytest.approx((0 + 0 + 4 * 2) / (3 * 2))  # position 0 masked out


def test_token_importance_from_keypoint_attention():
    attn = torch.zeros(1, 2, 5)  # 2 keypoint queries over 2 keypoint + 3 visual keys
    attn[0, 0] = torch.tensor([0.5, 0.0, 0.5, 0.0, 0.0])
    attn[0, 1] = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4])
    vis, kpt = token_importance(attn, num_joints=2)
    assert vis[0].tolist() == pytest.approx([0.7, 0.3, 0.4])
    assert kpt[0].tolist() == pytest.approx([0.5, 0.9])


def test_importance_without_attention_is_an_error():
    with pytest.raises(ValueError, match="attention"):
        MaskedTokenDistilLoss(mask_ratio=0.3, mask_strategy="importance")(torch.zeros(1, 4, 2), torch.zeros(1, 4, 2))
