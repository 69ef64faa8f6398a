"""Verification metrics: EER / TAR@FAR / best accuracy against hand-computed values and a brute-force sweep."""

import numpy as np
import pytest
import torch

from lib.errors import DataError
from lib.metrics.face import (accuracy_at, best_accuracy, cosine_scores, eer, heldout_metrics, random_embeddings,
                              save_roc, tar_at_far, verification_metrics)


def brute_force_eer(scores, labels):
    """Independent of scikit-learn: FAR/FRR at every threshold (accept score >= t), interpolated at the crossing."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    ts = np.concatenate([[np.inf], np.sort(np.unique(scores))[::-1]])
    far = np.array([(neg >= t).mean() for t in ts])
    frr = np.array([(pos < t).mean() for t in ts])
    d = far - frr
    i = int(np.argmax(d >= 0))
    t = -d[i - 1] / (d[i] - d[i - 1])
    return far[i - 1] + t * (far[i] - far[i - 1])


def test_eer_hand_computed():
    # sorted: .9 P, .8 P, .7 N, .3 P, .2 N. Between thresholds .8 and .7 the FRR stays 1/3 while the
    # FAR goes 0 -> 1/2: FAR = FRR = 1/3 on that segment.
    scores = np.array([0.9, 0.8, 0.3, 0.7, 0.2])
    labels = np.array([1, 1, 1, 0, 0])
    rate, thr = eer(scores, labels)
    assert rate == pytest.approx(1 / 3)
    assert 0.7 <= thr <= 0.8
    assert eer([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0])[0] == 0.0
    assert eer([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0])[0] == 1.0
    # crossing exactly at a ROC point: .9 P .8 P .7 N .6 P .5 N .4 N -> 1/3
    assert eer([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [1, 1, 0, 1, 0, 0])[0] == pytest.approx(1 / 3)


def test_eer_agrees_with_brute_force_on_random_scores():
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels = rng.integers(0, 2, 300)
        scores = np.round(rng.normal(labels * 0.8, 1.0), 2)  # ties included
        assert eer(scores, labels)[0] == pytest.approx(brute_force_eer(scores, labels), abs=1e-9)


def test_tar_at_far_and_best_accuracy_hand_computed():
    scores = np.array([0.95, 0.9, 0.85, 0.6, 0.5, 0.8, 0.4, 0.3, 0.2, 0.1])
    labels = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    # FAR <= 0: threshold above the highest negative (0.8): 3 of 5 positives accepted
    assert tar_at_far(scores, labels, 0.0) == pytest.approx(0.6)
    assert tar_at_far(scores, labels, 0.2) == pytest.approx(1.0)  # threshold 0.5 accepts 1 of 5 negatives
    acc, thr = best_accuracy(scores, labels)
    assert acc == pytest.approx(0.9) and thr == pytest.approx(0.5)  # 5 TP + 4 TN
    m = verification_metrics(torch.tensor(scores), torch.tensor(labels), far=1e-3)
    assert m["EER"] == pytest.approx(100 * brute_force_eer(scores, labels))
    assert m["TAR@FAR=0.001"] == pytest.approx(60.0) and m["acc"] == pytest.approx(90.0)
    with pytest.raises(DataError, match="both"):
        eer([0.1, 0.2], [1, 1])


def test_cosine_scores_and_roc_png(tmp_path):
    a = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [-2.0, -2.0]])
    assert torch.allclose(cosine_scores(a, b), torch.tensor([2 ** -0.5, -1.0]))
    save_roc(np.array([0.9, 0.8, 0.3, 0.7, 0.2]), np.array([1, 1, 1, 0, 0]), tmp_path / "roc.png")
    data = (tmp_path / "roc.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_test_metrics_use_the_given_threshold_and_label_the_fallback():
    scores = np.array([0.9, 0.8, 0.3, 0.6, 0.2, 0.1])
    labels = np.array([1, 1, 1, 0, 0, 0])
    # threshold 0.5 from elsewhere: accepted 0.9, 0.8, 0.6 -> correct: 2 same + 2 different of 6 ... by hand:
    # pairs (0.9,1) ok, (0.8,1) ok, (0.3,1) miss, (0.6,0) false accept, (0.2,0) ok, (0.1,0) ok -> 4/6
    m = heldout_metrics(scores, labels, threshold=0.5)
    assert m["acc"] == pytest.approx(100 * 4 / 6) and m["threshold"] == 0.5 and m["pairs"] == 6
    assert m["EER"] == pytest.approx(100 * eer(scores, labels)[0]) and "acc_at_test_eer_threshold" not in m
    assert accuracy_at(scores, labels, 0.25) == pytest.approx(5 / 6)  # only 0.6 wrong
    fb = heldout_metrics(scores, labels)  # no validation threshold: at this set's own EER threshold, named so
    assert "acc" not in fb and fb["acc_at_test_eer_threshold"] == pytest.approx(
        100 * accuracy_at(scores, labels, fb["eer_threshold"]))
    e = random_embeddings(5, 8, seed=1)
    assert e.shape == (5, 8) and torch.allclose(e.norm(dim=1), torch.ones(5))
    assert torch.equal(e, random_embeddings(5, 8, seed=1)) and not torch.equal(e, random_embeddings(5, 8, seed=2))
