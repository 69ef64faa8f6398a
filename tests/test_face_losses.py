"""Face losses: margin-head logits vs the formulas, m = 0 -> softmax, triplet mining, weighted sums."""

import math

import pytest
import torch
import torch.nn.functional as F

from lib.losses.face import (AdaFaceHead, ArcFaceHead, CosFaceHead, FaceLossConfig, build_heads, face_losses,
                             mine_negatives, triplet_loss)


def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def toy_head(cls, **kw):
    """2-d embeddings; class 0 weight at 0 deg, class 1 at 90 deg (weights of any norm: they are normalised)."""
    h = cls(2, 2, **kw)
    with torch.no_grad():
        h.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.5]]))
    return h


def test_arcface_logits_equal_formula():
    h = toy_head(ArcFaceHead, s=10.0, m=0.5)
    emb = torch.tensor([unit(60), [0.0, 2.0]]) * 5  # 60 deg from class 0; exactly class 1
    out = h(emb, torch.tensor([0, 1]))
    expect = torch.tensor([[10 * math.cos(math.radians(60) + 0.5), 10 * math.cos(math.radians(30))],
                           [10 * math.cos(math.pi / 2), 10 * math.cos(0 + 0.5)]])
    assert torch.allclose(out, expect, atol=1e-5)
    # theta + m > pi: insightface's fallback cos(theta) - m * sin(pi - m), not the non-monotonic cos(theta + m)
    far = h(torch.tensor([unit(170)]), torch.tensor([0]))
    expect_far = 10 * (math.cos(math.radians(170)) - 0.5 * math.sin(math.pi - 0.5))
    assert far[0, 0].item() == pytest.approx(expect_far, abs=1e-4)
    assert torch.allclose(h(emb), 10 * torch.tensor([[0.5, math.cos(math.radians(30))], [0.0, 1.0]]), atol=1e-5)


def test_cosface_logits_equal_formula():
    h = toy_head(CosFaceHead, s=8.0, m=0.35)
    out = h(torch.tensor([unit(60)]), torch.tensor([1]))
    assert torch.allclose(out, torch.tensor([[8 * 0.5, 8 * (math.cos(math.radians(30)) - 0.35)]]), atol=1e-5)


@pytest.mark.parametrize("cls", [ArcFaceHead, CosFaceHead])
def test_zero_margin_is_normalised_softmax(cls):
    torch.manual_seed(0)
    h = cls(16, 5, s=30.0, m=0.0)
    x, y = torch.randn(8, 16), torch.randint(0, 5, (8,))
    logits = h(x, y)
    ref = 30.0 * F.normalize(x) @ F.normalize(h.weight).T
    assert torch.allclose(logits, ref, atol=1e-5)
    assert F.cross_entropy(logits, y).item() == pytest.approx(F.cross_entropy(ref, y).item(), abs=1e-6)


def test_subcenter_arcface_takes_nearest_subcenter():
    h = ArcFaceHead(2, 2, s=1.0, m=0.0, sub_centers=3)
    with torch.no_grad():  # rows: class 0 centres at 0, 120, 240 deg; class 1 centres at 90, 200, 300 deg
        h.weight.copy_(torch.tensor([unit(0), unit(120), unit(240), unit(90), unit(200), unit(300)]))
    out = h(torch.tensor([unit(110)]))
    assert torch.allclose(out, torch.tensor([[math.cos(math.radians(10)), math.cos(math.radians(20))]]), atol=1e-5)
    assert h.weight.shape == (6, 2)


def test_adaface_margin_follows_feature_norm():
    h = toy_head(AdaFaceHead, s=10.0, m=0.4, h=0.5).eval()  # eval: running norm statistics stay fixed
    h.batch_mean.fill_(5.0)
    h.batch_std.fill_(2.0)
    theta = math.radians(60)
    mean_norm = h(torch.tensor([unit(60)]) * 5.0, torch.tensor([0]))  # scaler 0: cos(theta) - m
    assert mean_norm[0, 0].item() == pytest.approx(10 * (math.cos(theta) - 0.4), abs=1e-3)
    high = h(torch.tensor([unit(60)]) * 9.0, torch.tensor([0]))  # scaler clip(0.5 * 4 / 2) = 1: cos(theta - m) - 2m
    assert high[0, 0].item() == pytest.approx(10 * (math.cos(theta - 0.4) - 0.8), abs=1e-3)
    h.train()
    h(torch.tensor([unit(60), unit(10)]) * torch.tensor([[3.0], [7.0]]), torch.tensor([0, 1]))
    assert h.batch_mean.item() == pytest.approx(0.99 * 5.0 + 0.01 * 5.0)


def test_hard_negative_mining_picks_hardest_and_random_stays_negative():
    sim = torch.tensor([[9.0, 0.8, 0.1, 0.5, 0.3],
                        [0.2, 9.0, 0.7, 0.1, 0.6]])
    neg = torch.tensor([[False, True, True, True, True], [True, False, True, True, False]])
    pos = torch.tensor([0.9, 0.9])
    hardest = mine_negatives(sim, neg, pos, hard_rank=0, hard_prob=1.0, margin=0.1)
    assert hardest.tolist() == [1, 2]
    g = torch.Generator().manual_seed(0)
    picks = torch.stack([mine_negatives(sim, neg, pos, 1, 1.0, 0.1, g) for _ in range(200)])
    assert set(picks[:, 0].tolist()) == {1, 3} and set(picks[:, 1].tolist()) == {2, 0}  # top-2 only
    rand = torch.stack([mine_negatives(sim, neg, pos, 10, 0.0, 0.1, g) for _ in range(400)])
    assert set(rand[:, 0].tolist()) == {1, 2, 3, 4} and set(rand[:, 1].tolist()) == {0, 2, 3}
    semi = torch.stack([mine_negatives(sim, neg, pos, -1, 0.0, 0.3, g) for _ in range(100)])
    assert set(semi[:, 0].tolist()) == {1} and set(semi[:, 1].tolist()) == {2}  # 0.6 < sim < 0.9


def test_triplet_loss_hand_value():
    # identity 0 at 0 and 10 deg, identity 1 at 40 and 180 deg: hardest negative of anchor 0 is 40 deg
    emb = torch.tensor([unit(0), unit(10), unit(40), unit(180)]) * 3
    labels = torch.tensor([0, 0, 1, 1])
    d2 = lambda a, b: 2 - 2 * math.cos(math.radians(a - b))  # noqa: E731  squared distance of unit vectors
    loss = triplet_loss(emb, labels, margin=0.2, hard_rank=0, hard_prob=1.0)
    terms = [max(d2(0, 10) - d2(0, 40) + 0.2, 0), max(d2(10, 0) - d2(10, 40) + 0.2, 0),
             max(d2(40, 180) - d2(40, 10) + 0.2, 0), max(d2(180, 40) - d2(180, 10) + 0.2, 0)]
    assert loss.item() == pytest.approx(sum(terms) / 4, abs=1e-5)
    assert triplet_loss(emb, torch.tensor([0, 1, 2, 3])).item() == 0.0  # no positives in the batch


def test_weighted_combination_and_training_reduces_loss():
    torch.manual_seed(0)
    cfg = FaceLossConfig(terms=["softmax", "arcface", "triplet"], weights=[0.7, 0.3, 0.5], scale=16.0,
                         arcface_margin=0.3, hard_prob=1.0, hard_rank=0)
    heads = build_heads(cfg, 8, 4)
    assert set(heads) == {"softmax", "arcface"}
    emb = torch.randn(16, 8, requires_grad=True)
    labels = torch.arange(4).repeat_interleave(4)
    logits = {k: h(emb, labels) for k, h in heads.items()}
    torch.manual_seed(1)  # the triplet positive is a random other image of the identity
    losses = face_losses(emb, logits, labels, cfg)
    torch.manual_seed(1)
    ref_triplet = triplet_loss(emb, labels, 0.1, 0, 1.0).item()
    assert losses["loss_softmax"].item() == pytest.approx(0.7 * F.cross_entropy(logits["softmax"], labels).item())
    assert losses["loss_arcface"].item() == pytest.approx(0.3 * F.cross_entropy(logits["arcface"], labels).item())
    assert losses["loss_triplet"].item() == pytest.approx(0.5 * ref_triplet, abs=1e-6) and ref_triplet > 0
    opt = torch.optim.Adam([emb, *heads.parameters()], lr=0.05)
    first = None
    for _ in range(60):
        loss = sum(face_losses(emb, {k: h(emb, labels) for k, h in heads.items()}, labels, cfg).values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_soft_targets_replace_labels_for_softmax():
    cfg = FaceLossConfig(terms=["softmax"], label_smoothing=0.1)
    logits = {"softmax": torch.tensor([[2.0, 0.0], [0.0, 1.0]])}
    soft = torch.tensor([[0.6, 0.4], [0.3, 0.7]])
    out = face_losses(torch.zeros(2, 2), logits, torch.tensor([0, 1]), cfg, soft)
    expect = -(soft * logits["softmax"].log_softmax(1)).sum(1).mean()
    assert out["loss_softmax"].item() == pytest.approx(expect.item(), abs=1e-6)
