import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lib.config import build_config
from lib.data.common import DataError, EpochSampler
from lib.data.seg import SegDataConfig, SegFolderDataset
from tests.conftest import ROOT, shared_path

SAMPLE = ROOT / "tests" / "data" / "seg"


def _cfg(root, **kw):
    return build_config(SegDataConfig, {"root": str(root), "scale": [120, 90], "crop_size": [64, 64], **kw})


def test_sample_loads_and_void_becomes_ignore():
    ds = SegFolderDataset(_cfg(SAMPLE), "train", train=True, seed=0)
    item = ds[(0, 0)]
    assert item["image"].shape == (3, 64, 64) and item["label"].shape == (64, 64)
    raw = np.array(Image.open(ds.pairs[0][1]))
    _, lab = ds.load(0)
    assert (lab[raw == 11] == 255).all() and (lab[raw < 11] == raw[raw < 11]).all()
    val = SegFolderDataset(_cfg(SAMPLE), "val", train=False)[0]
    assert val["label"].shape == (360, 480) and val["image"].shape == (3, 90, 120)


def test_augmentation_depends_only_on_seed_epoch_index():
    ds = SegFolderDataset(_cfg(SAMPLE), "train", train=True, seed=3)
    a, b, c = ds[(1, 0)], ds[(1, 0)], ds[(1, 1)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], c["image"])


def test_epoch_sampler_is_a_seeded_permutation():
    s = EpochSampler(10, shuffle=True, seed=1)
    s.set_epoch(2)
    keys = list(s)
    assert sorted(i for i, _ in keys) == list(range(10)) and {e for _, e in keys} == {2}
    assert keys == list(s) and keys != (s.set_epoch(3) or list(s))


def _copy_sample(tmp_path):
    dst = tmp_path / "seg"
    shutil.copytree(SAMPLE, dst)
    return dst


def test_label_out_of_range_names_the_file(tmp_path):
    root = _copy_sample(tmp_path)
    f = sorted((root / "trainannot").iterdir())[0]
    lab = np.array(Image.open(f))
    lab[0, 0] = 17
    Image.fromarray(lab).save(f)
    ds = SegFolderDataset(_cfg(root), "train", train=True)
    with pytest.raises(DataError, match=f"label value 17 out of range in .*{f.name}"):
        ds[0]


def test_corrupt_image_and_missing_folder(tmp_path):
    root = _copy_sample(tmp_path)
    f = sorted((root / "train").iterdir())[0]
    f.write_bytes(b"\x89PNG garbage")
    ds = SegFolderDataset(_cfg(root), "train", train=True)
    with pytest.raises(DataError, match=f"corrupt or unreadable image .*{f.name}"):
        ds[0]
    with pytest.raises(DataError, match="dataset root folder not found"):
        SegFolderDataset(_cfg(tmp_path / "nope"), "train", train=True)
    shutil.rmtree(root / "valannot")
    with pytest.raises(DataError, match="label folder not found: .*valannot"):
        SegFolderDataset(_cfg(root), "val", train=False)


def test_camvid_shared_data_layout():
    root = shared_path("camvid")
    ds = SegFolderDataset(_cfg(root), "val", train=False)
    assert len(ds) == 101
    _, lab = ds.load(0)
    assert lab.max() <= 255 and set(np.unique(lab)) <= set(range(11)) | {255}


def test_test_split_reads_the_given_folders_absolute_or_relative(tmp_path):
    root = _copy_sample(tmp_path)
    (root / "val").rename(tmp_path / "held_out")
    (root / "valannot").rename(tmp_path / "held_out_annot")
    cfg = _cfg(tmp_path / "missing_root", test_img_dir=str(tmp_path / "held_out"),
               test_ann_dir=str(tmp_path / "held_out_annot"))
    ds = SegFolderDataset(cfg, "test", train=False)  # absolute folders: the root is not needed
    assert ds.img_dir == tmp_path / "held_out" and len(ds) == len(list((tmp_path / "held_out").iterdir()))
    assert ds[0]["image"].shape == (3, 90, 120)
    rel = SegFolderDataset(_cfg(tmp_path, test_img_dir="held_out", test_ann_dir="held_out_annot"), "test", train=False)
    assert rel.img_dir == tmp_path / "held_out" and len(rel) == len(ds)
    with pytest.raises(DataError, match="needs data.test_img_dir and data.test_ann_dir"):
        SegFolderDataset(_cfg(root), "test", train=False)
    with pytest.raises(DataError, match="unknown seg split 'tset'"):
        SegFolderDataset(_cfg(root), "tset", train=False)
