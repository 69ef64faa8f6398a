"""COCO keypoint data: flip pairs, affine crop, heatmap encoding <-> decoding, determinism, bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.data.coco import (COCO_FLIP_PAIRS, COCO_KEYPOINTS, CocoPoseDataset, PoseDataConfig, affine_matrix,
                           affine_points, box_to_center_scale, encode_heatmaps, warp_image)
from lib.data.common import DataError
from lib.metrics.pose import decode_heatmaps, flip_back

SAMPLE = "tests/data/pose"


def no_aug(**kw) -> PoseDataConfig:
    off = dict(shift_prob=0.0, flip_prob=0.0, half_body_prob=0.0, scale_factor=0.0, rot_prob=0.0)
    return dataclasses.replace(PoseDataConfig(root=SAMPLE), **{**off, **kw})


def test_flip_pairs_match_the_json_names():
    names = json.load(open(f"{SAMPLE}/test_coco.json"))["categories"][0]["keypoints"]
    assert names == COCO_KEYPOINTS
    paired = set()
    for a, b in COCO_FLIP_PAIRS:
        assert names[a].startswith("left_") and names[b] == "right_" + names[a][5:]
        paired |= {a, b}
    assert sorted(set(range(17)) - paired) == [0]  # only the nose maps to itself


def test_box_to_center_scale_pads_to_aspect():
    c, s = box_to_center_scale((10, 20, 30, 100), aspect=0.75, padding=1.25)
    np.testing.assert_allclose(c, [25, 70])
    np.testing.assert_allclose(s, [75 * 1.25, 100 * 1.25])  # width grown to 0.75 * height


def test_affine_warp_moves_a_pixel_where_the_points_go():
    yy, xx = np.mgrid[0:80, 0:100]
    blob = 255 * np.exp(-((xx - 60) ** 2 + (yy - 30) ** 2) / (2 * 4.0 ** 2))
    img = np.repeat(blob[..., None], 3, axis=2).round().astype(np.uint8)  # a smooth spot at (60, 30)
    m = affine_matrix(center=(50, 40), scale=(60, 80), rot=30.0, out_size=(48, 64))
    out = warp_image(img, m, (48, 64))[..., 0].astype(float)
    expect = affine_points(np.array([[60.0, 30.0]]), m)[0]
    ys, xs = np.nonzero(out)
    centroid = np.array([(xs * out[ys, xs]).sum(), (ys * out[ys, xs]).sum()]) / out[ys, xs].sum()
    np.testing.assert_allclose(centroid, expect, atol=0.05)


@pytest.mark.parametrize("unbiased", [True, False])
def test_encode_then_dark_decode_within_0p1_px(unbiased):
    rng = np.random.default_rng(0)
    joints = rng.uniform([6, 6], [42, 58], size=(17, 2)).astype(np.float32)
    if not unbiased:
        joints = np.round(joints)  # the biased encoding places the peak on the rounded pixel
    target, weight = encode_heatmaps(joints, np.ones(17), (48, 64), sigma=2.0, unbiased=unbiased)
    assert target.shape == (17, 64, 48) and weight.tolist() == [1.0] * 17
    xy, maxval = decode_heatmaps(torch.from_numpy(target)[None], "dark")
    err = np.abs(xy[0].numpy() - joints).max()
    assert err < 0.1, err
    assert maxval.min() > 0.9


def test_encode_weights_invisible_and_far_outside():
    joints = np.array([[10.0, 10.0], [10.0, 10.0], [-20.0, 5.0]])
    target, weight = encode_heatmaps(joints, np.array([1, 0, 1]), (48, 64))
    assert weight.tolist() == [1.0, 0.0, 0.0]
    assert target[1].max() == 0 and target[2].max() == 0 and target[0].max() == pytest.approx(1.0)


def test_flip_augmentation_mirrors_targets_with_pairs_swapped():
    plain = CocoPoseDataset(no_aug(), "train", train=True)[(3, 0)]
    flipped = CocoPoseDataset(no_aug(flip_prob=1.0), "train", train=True)[(3, 0)]
    w = plain["target_weight"]
    xy_p, _ = decode_heatmaps(plain["target"][None], "dark")
    xy_f, _ = decode_heatmaps(flip_back(flipped["target"][None], COCO_FLIP_PAIRS), "dark")
    vis = (w > 0) & (flip_back(flipped["target_weight"][None, :, None, None], COCO_FLIP_PAIRS)[0, :, 0, 0] > 0)
    assert vis.sum() >= 10
    # mirrored crop: x -> 48 - x in heatmap pixels (flip_back flips the map: 47 - x), y unchanged
    np.testing.assert_allclose(xy_f[0, vis, 0] + 1, xy_p[0, vis, 0], atol=0.1)
    np.testing.assert_allclose(xy_f[0, vis, 1], xy_p[0, vis, 1], atol=0.1)


def test_train_samples_deterministic_per_seed_epoch_index():
    ds = CocoPoseDataset(PoseDataConfig(root=SAMPLE), "train", train=True, seed=3)
    a, b, c = ds[(5, 1)], ds[(5, 1)], ds[(5, 2)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    assert not torch.equal(a["image"], c["image"])
    assert a["image"].shape == (3, 256, 192) and a["target"].shape == (17, 64, 48)


def test_val_uses_detections_or_gt_boxes():
    dets = json.load(open(f"{SAMPLE}/test_coco_det_AP_H_56.json"))
    ds = CocoPoseDataset(PoseDataConfig(root=SAMPLE, det_file="test_coco_det_AP_H_56.json", det_bbox_thr=0.5),
                         "val", train=False)
    assert len(ds) == sum(d["category_id"] == 1 and d["score"] > 0.5 for d in dets)
    gt = CocoPoseDataset(PoseDataConfig(root=SAMPLE), "val", train=False)
    assert len(gt) == 12  # annotated persons with keypoints on the 4 images
    assert float(gt[0]["box_score"]) == 1.0


def test_bad_input_names_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.json"):
        CocoPoseDataset(PoseDataConfig(root=SAMPLE, train_ann="missing.json"), "train", train=True)
    bad = tmp_path / "ann.json"
    bad.write_text('{"images": []}')
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="ann.json.*annotations"):
        CocoPoseDataset(PoseDataConfig(root=str(tmp_path), train_ann="ann.json"), "train", train=True)


def test_extra_train_adds_persons_but_not_val_or_repeated_images(tmp_path):
    coco = json.load(open(f"{SAMPLE}/test_coco.json"))
    for im in coco["images"][1:]:  # the first image keeps its id: already in the training set
        im["id"] += 10 ** 6
    for a in coco["annotations"]:
        a["image_id"] += 10 ** 6 if a["image_id"] != coco["images"][0]["id"] else 0
    (tmp_path / "test_coco.json").write_text(json.dumps(coco))
    (tmp_path / "images").symlink_to(Path(SAMPLE).resolve() / "images")
    base = CocoPoseDataset(no_aug(), "train", train=True)
    per_image = {}
    for it in base.items:
        per_image[it["image_id"]] = per_image.get(it["image_id"], 0) + 1
    val_id = coco["images"][1]["id"]  # an extra image that is also a validation image
    ds = CocoPoseDataset(no_aug(extra_train=[str(tmp_path)]), "train", train=True, exclude_ids={val_id})
    first = coco["images"][0]["id"]
    assert ds.excluded == per_image[first] + per_image[val_id - 10 ** 6]
    assert len(ds) == 2 * len(base) - ds.excluded
    extra = ds.items[len(base):]
    assert {it["image_id"] for it in extra} == {im["id"] for im in coco["images"][2:]}
    i = len(base)  # an extra person loads its image from the extra folder and equals the same person in base
    j = next(k for k, it in enumerate(base.items) if it["image_id"] == extra[0]["image_id"] - 10 ** 6)
    assert torch.equal(ds[i]["image"], base[j]["image"]) and torch.equal(ds[i]["target"], base[j]["target"])
