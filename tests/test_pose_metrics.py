"""Pose evaluation: COCO AP of ground truth = 1, flip test, ensembles, decoding, rescoring, OKS-NMS."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib.data.coco import COCO_FLIP_PAIRS, CocoPoseDataset, PoseDataConfig
from lib.metrics.pose import (decode_heatmaps, evaluate_coco, flip_back, heatmap_to_image, oks_nms,
                              predict_heatmaps, rescore)

SAMPLE = "tests/data/pose"


def test_ground_truth_fed_back_scores_ap_1():
    ds = CocoPoseDataset(PoseDataConfig(root=SAMPLE), "val", train=False)  # gt boxes
    kpts = np.stack([it["joints"] for it in ds.items])
    ids = np.array([it["image_id"] for it in ds.items])
    area = np.array([it["box"][2] * it["box"][3] for it in ds.items])
    m = evaluate_coco(ds.coco, kpts, np.ones(kpts.shape[:2]), np.ones(len(ids)), area, ids)
    assert m["AP"] == 1.0 and m["AR"] == 1.0 and m["AP50"] == 1.0 and m["APl"] == 1.0
    bad = kpts + 25.0  # shifted poses: far below 1
    assert evaluate_coco(ds.coco, bad, np.ones(kpts.shape[:2]), np.ones(len(ids)), area, ids)["AP"] < 0.5


def test_mean_best_oks_equals_hand_computation():
    """"OKS": per labelled gt person the best OKS of a prediction in its image, averaged; here each
    prediction is its own gt shifted by d px, so OKS = mean over labelled joints of exp(-d^2 / (2 s^2 k^2))."""
    from lib.data.coco import COCO_SIGMAS

    ds = CocoPoseDataset(PoseDataConfig(root=SAMPLE), "val", train=False)
    kpts = np.stack([it["joints"] for it in ds.items])
    ids = np.array([it["image_id"] for it in ds.items])
    area = np.array([it["box"][2] * it["box"][3] for it in ds.items])
    assert evaluate_coco(ds.coco, kpts, np.ones(kpts.shape[:2]), np.ones(len(ids)), area, ids)["OKS"] == 1.0
    d = np.array([3.0, 4.0])  # 5 px
    m = evaluate_coco(ds.coco, kpts + d, np.ones(kpts.shape[:2]), np.ones(len(ids)), area, ids, use_nms=False)
    want = []
    for it in ds.items:  # the coco area of the annotation, not the crop box
        a = next(a for a in ds.coco["annotations"] if a["image_id"] == it["image_id"]
                 and np.allclose(np.array(a["keypoints"]).reshape(-1, 3)[:, :2], it["joints"]))
        v = np.array(a["keypoints"]).reshape(-1, 3)[:, 2] > 0
        want.append(np.exp(-25.0 / (2 * a["area"] * (2 * COCO_SIGMAS) ** 2))[v].mean())
    assert len(want) >= 2 and 0.2 < np.mean(want) < 0.99
    assert m["OKS"] == pytest.approx(np.mean(want), rel=1e-9)  # other persons in the image are further away
    assert m["AP"] < 1.0


def test_ground_truth_through_crop_heatmap_decode_path_scores_ap_1():
    """gt -> affine crop -> target heatmaps -> DARK decode -> image coords -> COCOeval."""
    ds = CocoPoseDataset(PoseDataConfig(root=SAMPLE), "val", train=False)
    items = [ds[i] for i in range(len(ds))]
    hm = torch.stack([x["target"] for x in items])
    center, scale = torch.stack([x["center"] for x in items]), torch.stack([x["scale"] for x in items])
    xy, maxval = decode_heatmaps(hm, "dark")
    kpts = heatmap_to_image(xy, center, scale, (48, 64)).numpy()
    ids = torch.stack([x["image_id"] for x in items]).numpy()
    m = evaluate_coco(ds.coco, kpts, maxval.numpy(), np.ones(len(ids)), scale.prod(-1).numpy(), ids)
    assert m["AP"] == 1.0
    vis = np.stack([it["visible"] for it in ds.items]) > 0
    assert np.abs(kpts - np.stack([it["joints"] for it in ds.items]))[vis].max() < 1.0  # image pixels


def test_flip_back_swaps_pairs_and_mirrors():
    hm = torch.arange(17 * 2 * 3, dtype=torch.float32).reshape(1, 17, 2, 3)
    fb = flip_back(hm, COCO_FLIP_PAIRS)
    assert torch.equal(fb[0, 0], hm[0, 0].flip(-1))  # nose stays
    assert torch.equal(fb[0, 5], hm[0, 6].flip(-1)) and torch.equal(fb[0, 6], hm[0, 5].flip(-1))
    assert torch.equal(flip_back(fb, COCO_FLIP_PAIRS), hm)


class _MirrorModel(torch.nn.Module):
    """Heatmaps = pooled red channel for every joint (mirror-equivariant), scaled by `gain`."""

    def __init__(self, gain: float = 1.0):
        super().__init__()
        self.gain = gain

    def forward(self, img):
        return [{"heatmap": self.gain * F.avg_pool2d(img[:, :1], 4).expand(-1, 17, -1, -1)}]


def test_flip_test_of_equivariant_model_and_ensemble_mean():
    img = torch.rand(2, 3, 32, 24)
    plain = _MirrorModel()(img)[0]["heatmap"]
    torch.testing.assert_close(predict_heatmaps([_MirrorModel()], img, COCO_FLIP_PAIRS, shift_heatmap=False), plain)
    shifted = predict_heatmaps([_MirrorModel()], img, COCO_FLIP_PAIRS, shift_heatmap=True)
    torch.testing.assert_close(shifted[..., 1:], 0.5 * (plain[..., 1:] + plain[..., :-1]))
    ens = predict_heatmaps([_MirrorModel(1.0), _MirrorModel(3.0)], img, COCO_FLIP_PAIRS, flip_test=False)
    torch.testing.assert_close(ens, 2.0 * plain)


def test_default_decoding_quarter_offset_and_image_coords():
    hm = torch.zeros(1, 1, 8, 8)
    hm[0, 0, 4, 3] = 1.0
    hm[0, 0, 4, 4] = 0.5  # right neighbour higher than left
    hm[0, 0, 3, 3] = 0.2  # upper neighbour higher than lower
    xy, maxval = decode_heatmaps(hm, "default")
    assert xy[0, 0].tolist() == [3.25, 3.75] and maxval.item() == 1.0
    img = heatmap_to_image(torch.tensor([[[2.0, 4.0]]]), torch.tensor([[100.0, 50.0]]), torch.tensor([[80.0, 160.0]]),
                           (8, 16))
    assert img[0, 0].tolist() == [100 - 40 + 2 * 10, 50 - 80 + 4 * 10]


def test_rescore_and_oks_nms():
    maxval = np.array([[0.9, 0.1, 0.5], [0.1, 0.1, 0.1]])
    np.testing.assert_allclose(rescore(maxval, np.array([0.5, 1.0]), vis_thr=0.2), [0.5 * 0.7, 0.0])
    rng = np.random.default_rng(0)
    pose = np.concatenate([rng.uniform(0, 100, (17, 2)), np.ones((17, 1))], 1)
    near, far = pose.copy(), pose.copy()
    near[:, :2] += 0.5
    far[:, :2] += 300
    kpts = np.stack([pose, near, far])
    keep = oks_nms(kpts, np.array([0.8, 0.9, 0.1]), np.full(3, 100.0 * 100.0), thr=0.9)
    assert keep == [1, 2]  # the duplicate with the lower score goes


@pytest.mark.parametrize("method", ["dark", "default", "argmax"])
def test_decoding_of_a_smooth_peak(method):
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(48.0), indexing="ij")
    hm = torch.exp(-((xx - 20.3) ** 2 + (yy - 30.6) ** 2) / 8)[None, None]
    xy, _ = decode_heatmaps(hm, method)
    tol = {"dark": 0.05, "default": 0.3, "argmax": 0.5}[method]
    assert abs(xy[0, 0, 0].item() - 20.3) < tol and abs(xy[0, 0, 1].item() - 30.6) < tol
