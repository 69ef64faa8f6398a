"""Hand data: crop intrinsics of hand3d, deterministic augmentation, flip / rotation geometry,
MANO label rotation, held-out splits, WebDataset round trip, one-line errors."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import webdataset as wds
from scipy.spatial.transform import Rotation

from lib.data.common import DataError
from lib.data.hand import (FolderSource, HandAugConfig, HandDataConfig, HandDataset, Hand3DSource, ShardSource,
                           is_right_hand, label_stats, mean_pose, project, split_indices, train_val_indices)
from lib.data.make_shards import write_shards
from tests.conftest import ROOT, shared_path

SAMPLE = ROOT / "tests" / "data" / "hand"
NO_AUG = HandAugConfig(scale=0.0, rotation=0.0, rotation_prob=0.0, translate=0.0, color=0.0, flip_prob=0.0)


def _ds(aug: HandAugConfig = NO_AUG, train: bool = True, img_size: int = 64, root=SAMPLE, seed: int = 0):
    cfg = HandDataConfig(root=str(root), img_size=img_size, aug=aug)
    return HandDataset(FolderSource(cfg.root, "training"), cfg, train=train, seed=seed)


def test_hand3d_crop_intrinsics():
    src = Hand3DSource(shared_path("hand3d"))
    assert len(src) == 583
    m = src.meta(0)  # params.mat row 0: fx 923.648, u0 640.047, bbox x 380, w 493
    s = 256 / 493
    assert np.allclose(np.array(m["K"])[0], [923.648 * s, 0, (640.047 - 380) * s], atol=1e-3)
    uv = np.stack([project(np.array(src.meta(i)["xyz"]), np.array(src.meta(i)["K"])) for i in range(0, 583, 50)])
    assert uv.min() > 0 and uv.max() < 256  # every projected joint inside the 256 x 256 crop
    assert not any(is_right_hand(np.array(src.meta(i)["xyz"])) for i in range(0, 583, 25))  # all left hands
    assert abs(np.array(m["xyz"])[0, 2] - 0.4243) < 1e-3  # cm -> m


def test_augmentation_is_a_function_of_seed_epoch_index():
    aug = HandAugConfig(rotation_prob=1.0, flip_prob=0.5)
    a, b = _ds(aug), _ds(aug)
    for key in [(0, 0), (5, 3)]:
        x, y = a[key], b[key]
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a[(5, 3)]["joints2d"], a[(5, 4)]["joints2d"])  # other epoch, other augmentation
    assert not torch.equal(a[(5, 3)]["joints2d"], _ds(aug, seed=1)[(5, 3)]["joints2d"])
    v = _ds(aug, train=False)
    assert torch.equal(v[(2, 0)]["image"], v[(2, 7)]["image"])  # validation ignores the epoch ...
    assert torch.equal(v[(2, 0)]["image"], _ds()[(2, 0)]["image"])  # ... and augments nothing


def test_flip_mirrors_image_joints_and_side():
    plain = _ds()[(3, 0)]
    flipped = _ds(dataclasses.replace(NO_AUG, flip_prob=1.0))[(3, 0)]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))  # exact: mirrored sampling grid
    assert torch.allclose(flipped["joints3d"], plain["joints3d"] * torch.tensor([-1.0, 1.0, 1.0]))
    assert torch.allclose(flipped["joints2d"], plain["joints2d"] * torch.tensor([-1.0, 1.0]), atol=1e-6)
    assert int(plain["is_right"]) == 0 and int(flipped["is_right"]) == 1  # hand3d crops are left hands


def test_rotation_rotates_2d_and_3d_alike():
    plain = _ds()[(1, 0)]
    rot = _ds(dataclasses.replace(NO_AUG, rotation=30.0, rotation_prob=1.0))
    rng = np.random.default_rng([0, 0, 1])  # the draws of sample_rng(seed 0, index 1, epoch 0)
    deg = 30.0 * rng.uniform(-1, 1, size=5)[1]
    out = rot[(1, 0)]
    t = np.deg2rad(deg)
    r2 = torch.tensor([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]], dtype=torch.float32)
    assert abs(deg) > 1
    assert torch.allclose(out["joints2d"], plain["joints2d"] @ r2.T, atol=1e-5)  # about the crop centre
    assert torch.allclose(out["joints3d"][:, :2], plain["joints3d"][:, :2] @ r2.T, atol=1e-6)
    assert torch.allclose(out["joints3d"][:, 2], plain["joints3d"][:, 2])


def _folder_with_mano(tmp_path, is_right: bool):
    tmp_path.mkdir(parents=True, exist_ok=True)
    for f in ["training_K.json", "training_xyz.json"]:
        shutil.copy(SAMPLE / f, tmp_path / f)
    (tmp_path / "training").mkdir()
    shutil.copytree(SAMPLE / "training" / "rgb", tmp_path / "training" / "rgb")
    xyz = json.loads((SAMPLE / "training_xyz.json").read_text())
    if is_right:  # mirror the skeletons: right hands (images stay as they are; only labels matter here)
        xyz = [[[-x, y, z] for x, y, z in s] for s in xyz]
        (tmp_path / "training_xyz.json").write_text(json.dumps(xyz))
    mano = [[[0.4, -0.2, 0.9] + [0.0] * 45 + [0.1] * 10 + [0.0, 0.0, 0.5]] for _ in xyz]
    (tmp_path / "training_mano.json").write_text(json.dumps(mano))
    return tmp_path


@pytest.mark.parametrize("is_right", [True, False])
def test_mano_global_rotation_follows_the_image(tmp_path, is_right):
    root = _folder_with_mano(tmp_path, is_right)
    aug = dataclasses.replace(NO_AUG, rotation=30.0, rotation_prob=1.0)
    s = _ds(aug, root=root)[(1, 0)]
    deg = 30.0 * np.random.default_rng([0, 0, 1]).uniform(-1, 1, size=5)[1]
    assert float(s["has_mano"]) == 1.0 and torch.allclose(s["mano_betas"], torch.full((10,), 0.1))
    rz = Rotation.from_euler("z", deg if is_right else -deg, degrees=True)
    want = (rz * Rotation.from_rotvec([0.4, -0.2, 0.9])).as_matrix()
    assert np.allclose(Rotation.from_rotvec(s["mano_pose"][0].double().numpy()).as_matrix(), want, atol=1e-5)
    assert torch.equal(s["mano_pose"][1:], torch.zeros(15, 3)) and int(s["is_right"]) == int(is_right)


def test_label_stats_mean_joints_in_right_hand_frame():
    ds = _ds(train=False)
    stats = label_stats(ds)
    mean_cam = np.mean([ds.joints(i) for i in range(len(ds))], 0)  # camera frame (left hands)
    assert np.allclose(stats["joints"].numpy(), mean_cam * [-1, 1, 1], atol=1e-6)
    assert 2.0 < float(stats["cam"][0]) < 10.0  # crop / metre scale of a hand filling a 256 px crop


def test_train_val_indices_tail_and_random():
    cfg = HandDataConfig(val_count=103)
    tr, va = train_val_indices(583, cfg)
    assert tr == list(range(480)) and va == list(range(480, 583))
    cfg = HandDataConfig(val_count=103, split_mode="random")
    tr2, va2 = train_val_indices(583, cfg)
    assert len(va2) == 103 and not set(tr2) & set(va2) and len(tr2) + len(va2) == 583
    assert train_val_indices(583, cfg) == (tr2, va2)  # fixed by val_seed, not by the run's seed
    assert train_val_indices(583, dataclasses.replace(cfg, val_seed=1))[1] != va2
    with pytest.raises(DataError, match="val_count"):
        train_val_indices(10, HandDataConfig(val_count=10))


def test_split_indices_folds_and_val_seed():
    """data.folds / data.fold (sweep.py --folds): k-fold over the training samples left after the hold-out,
    seeded by val_seed like the random hold-out; the held-out set stays out of every fold."""
    hold = HandDataConfig(val_count=103)
    assert split_indices(583, hold) == train_val_indices(583, hold)
    assert split_indices(12, HandDataConfig()) == (list(range(12)), None)  # val from data.val_split
    folds = [split_indices(583, dataclasses.replace(hold, folds=4, fold=i)) for i in range(4)]
    vals = [set(v) for _, v in folds]
    assert sorted(set().union(*vals)) == list(range(480)) and sum(map(len, vals)) == 480  # each sample once
    assert all(set(t) | v == set(range(480)) and not set(t) & v for (t, _), v in zip(folds, vals))
    other_seed = split_indices(583, dataclasses.replace(hold, folds=4, fold=0, val_seed=1))[1]
    assert set(other_seed) != vals[0]
    with pytest.raises(DataError, match="data.folds"):
        split_indices(583, dataclasses.replace(hold, folds=4, fold=4))


def test_mean_pose_right_hand_frame_from_labels():
    ds = _ds(train=False)
    xyz = np.array(json.loads((SAMPLE / "training_xyz.json").read_text()))
    assert np.allclose(mean_pose(ds), (xyz - xyz[:, :1]).mean(0) * [-1, 1, 1])  # left hands, mirrored
    assert not any(ds.is_right(i) for i in range(len(ds)))


def test_folder_and_shards_read_mano_labels(tmp_path):
    root = _folder_with_mano(tmp_path / "f", False)
    assert FolderSource(root, "training").has_mano and not FolderSource(SAMPLE, "training").has_mano
    write_shards(FolderSource(root, "training"), tmp_path / "wds", "training", maxcount=6)
    shards = ShardSource(tmp_path / "wds", "training")
    assert shards.has_mano and np.allclose(shards.meta(3)["mano"][:3], [0.4, -0.2, 0.9])


def test_webdataset_round_trip(tmp_path):
    index = write_shards(FolderSource(SAMPLE, "training"), tmp_path, "training", maxcount=5)
    assert [s["nsamples"] for s in json.loads(index.read_text())["shardlist"]] == [5, 5, 2]
    cfg = HandDataConfig(root=str(tmp_path), format="webdataset", img_size=48, aug=HandAugConfig(flip_prob=0.5))
    shards = HandDataset(ShardSource(tmp_path, "training"), cfg, train=True, seed=3)
    folder = HandDataset(FolderSource(SAMPLE, "training"), dataclasses.replace(cfg, format="folder", root=str(SAMPLE)),
                         train=True, seed=3)
    assert len(shards) == len(folder) == 12
    for key in [(0, 0), (4, 1), (5, 1), (11, 2)]:
        a, b = shards[key], folder[key]
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the shards are plain WebDataset tars: the streaming reader sees the same samples and bytes
    stream = list(wds.WebDataset(str(tmp_path / "training-{000000..000002}.tar"), shardshuffle=False))
    assert [s["__key__"] for s in stream] == [f"{i:08d}" for i in range(12)]
    assert stream[7]["jpg"] == (SAMPLE / "training" / "rgb" / "00000007.jpg").read_bytes()


def test_bad_input_names_the_cause(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        FolderSource(tmp_path, "training")
    root = _folder_with_mano(tmp_path, False)
    (root / "training_K.json").write_text(json.dumps(json.loads((root / "training_K.json").read_text())[:3]))
    with pytest.raises(DataError, match="different lengths"):
        FolderSource(root, "training")
    (root / "training_K.json").write_text("[not json")
    with pytest.raises(DataError, match="cannot parse"):
        FolderSource(root, "training")
    shutil.copy(SAMPLE / "training_K.json", root / "training_K.json")
    (root / "training" / "rgb" / "00000002.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="corrupt or unreadable image 00000002.jpg"):
        _ds(root=root)[(2, 0)]
