"""MPJPE / PA-MPJPE against hand-computed values, and the keypoint overlay picture."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from lib.metrics.hand import LEGEND_HEIGHT, fluctuation, mpjpe, pa_mpjpe, save_overlay, summarize


def _skeleton(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 21, 3, generator=g, dtype=torch.float64) * 0.05  # (B, 21, 3) metres


def _rot(axis: torch.Tensor, angle: float) -> torch.Tensor:
    k = axis / axis.norm()
    kmat = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * kmat + (1 - math.cos(angle)) * kmat @ kmat


def test_pa_mpjpe_zero_for_similarity_copy_while_mpjpe_is_not():
    gt = _skeleton()
    r = _rot(torch.tensor([0.3, -1.0, 0.5], dtype=torch.float64), 0.7)
    pred = 1.7 * gt @ r.T + torch.tensor([0.1, -0.2, 0.5], dtype=torch.float64)
    assert pa_mpjpe(pred, gt).max().item() < 1e-9
    assert mpjpe(pred, gt).min().item() > 0.01  # > 10 mm: rotation and scale are not undone by MPJPE


def test_pa_mpjpe_does_not_undo_a_reflection():
    gt = _skeleton(1)
    assert pa_mpjpe(gt * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64), gt).min().item() > 1e-3


def test_mpjpe_hand_computed_and_root_relative():
    gt = _skeleton(2)
    assert mpjpe(gt + torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), gt).abs().max().item() < 1e-12
    pred = gt.clone()
    pred[:, 5, 0] += 0.003  # one joint 3 mm off -> 3 / 21 mm
    pred[1, 7] += torch.tensor([0.0, 0.003, 0.004], dtype=torch.float64)  # another one 5 mm off in sample 1
    assert torch.allclose(mpjpe(pred, gt) * 1000, torch.tensor([3 / 21, 8 / 21], dtype=torch.float64))
    pred = gt.clone()
    pred[:, 0] += 0.021  # moving the root moves every other joint by 21 mm relative to it: 20 * 21 / 21 mm
    assert torch.allclose(mpjpe(pred, gt) * 1000, torch.full((2,), 20 * math.sqrt(3) * 21 / 21, dtype=torch.float64))


def test_summarize_mean_and_std():
    s = summarize({"mpjpe": torch.tensor([10.0, 20.0, 30.0, 40.0])})
    assert s["mpjpe"] == 25.0 and abs(s["mpjpe_std"] - math.sqrt(125.0)) < 1e-9


def test_overlay_png_draws_keypoints(tmp_path):
    imgs = torch.zeros(3, 3, 32, 32)
    gt = torch.zeros(3, 21, 2)  # all joints at the centre
    pred = torch.full((3, 21, 2), -0.25)  # all joints at (8, 8) of 32
    save_overlay(tmp_path / "vis.png", imgs, gt, pred, cols=2, scale=2)
    arr = np.array(Image.open(tmp_path / "vis.png"))
    assert arr.shape == (2 * 64 + LEGEND_HEIGHT, 2 * 64, 3)  # 2 x 2 tiles + the legend strip
    assert tuple(arr[32, 32]) == (0, 255, 0) and tuple(arr[16, 16]) == (255, 0, 0)
    assert arr[64:128, 64:].max() == 0  # the empty fourth tile
    legend = arr[128:]
    assert tuple(legend[8, 8]) == (255, 0, 0)  # "prediction" swatch ...
    assert (legend == (0, 255, 0)).all(-1).sum() >= 81  # ... and a 9 x 9 "truth" swatch
    save_overlay(tmp_path / "pred.png", imgs[:1], None, pred[:1], cols=1, scale=2)  # no labels: no truth swatch
    arr = np.array(Image.open(tmp_path / "pred.png"))
    assert arr.shape == (64 + LEGEND_HEIGHT, 64, 3) and not (arr == (0, 255, 0)).all(-1).any()


def test_fluctuation_is_std_over_evaluations():
    assert fluctuation([40.0]) == 0.0
    assert fluctuation([40.0, 42.0, 44.0]) == np.std([40.0, 42.0, 44.0]) == math.sqrt(8 / 3)
