"""Face data: identity folders, P x K sampler (also sharded over 2 processes by accelerate), transforms,
pair lists (CSV, LFW pairs.txt), identity-disjoint folds."""

from collections import Counter

import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

from lib.data.common import DataError, kfold_indices
from lib.data.face import (AUG_PRESETS, FaceAugConfig, FaceDataConfig, IdentityFolder, PKSampler, build_mixup,
                           build_transform, lfw_identities, make_pairs, read_lfw_pairs, read_pairs, scan_identities)
from tests.conftest import ROOT, shared_path

FACE = ROOT / "tests" / "data" / "face"


class Keys(torch.utils.data.Dataset):
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        return {"index": key[0], "label": int(self.labels[key[0]]), "epoch": key[1]}


def uneven_labels():
    counts = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 3, 2, 1, 4, 4, 6, 9]
    return np.repeat(np.arange(len(counts)), counts)


def test_pk_batches_are_p_identities_by_k_images():
    labels = uneven_labels()
    s = PKSampler(labels, classes_per_batch=4, images_per_class=3, seed=1)
    dl = DataLoader(Keys(labels), batch_size=12, sampler=s, drop_last=True)
    batches = list(dl)
    assert len(batches) == len(dl) == len(s) // 12 > 5
    seen = Counter()
    for b in batches:
        per_id = Counter(b["label"].tolist())
        assert len(per_id) == 4 and set(per_id.values()) == {3}
        seen.update(i for i, lab in zip(b["index"].tolist(), b["label"].tolist()) if (labels == lab).sum() >= 3)
    assert max(seen.values()) == 1  # identities with >= K images: no image twice in an epoch
    s.set_epoch(1)
    again = [b["index"] for b in DataLoader(Keys(labels), batch_size=12, sampler=s, drop_last=True)]
    assert len(again) == len(batches) and not all(torch.equal(a, b["index"]) for a, b in zip(again, batches))
    assert all(int(b["epoch"][0]) == 0 for b in batches)


def test_pk_sampler_across_two_processes_without_overlap():
    labels = uneven_labels()
    per_proc = []
    for p in range(2):
        s = PKSampler(labels, 3, 2, num_processes=2, seed=0)
        dl = prepare_data_loader(DataLoader(Keys(labels), batch_size=6, sampler=s, drop_last=True),
                                 num_processes=2, process_index=p, put_on_device=False)
        per_proc.append(list(dl))
    assert len(per_proc[0]) == len(per_proc[1]) > 3
    for b0, b1 in zip(*per_proc):
        for b in (b0, b1):  # each process batch is one whole P x K block
            assert sorted(Counter(b["label"].tolist()).values()) == [2, 2, 2]
        assert not set(b0["label"].tolist()) & set(b1["label"].tolist())  # same step: different identities
    multi = {lab for lab, c in Counter(labels.tolist()).items() if c >= 2}
    keys = [i for proc in per_proc for b in proc for i, lab in zip(b["index"].tolist(), b["label"].tolist())
            if lab in multi]
    assert len(keys) == len(set(keys))  # no image in two processes (nor twice in one) within the epoch
    single = PKSampler(labels, 3, 2, num_processes=2, seed=0)
    union = [i for b in single.blocks(0) for i in b.tolist()]
    assert sorted(union) == sorted(i for proc in per_proc for b in proc for i in b["index"].tolist())
    with pytest.raises(DataError, match="needs 40 identities"):
        PKSampler(labels, 20, 2, num_processes=2)


def test_identity_folder_transforms_deterministic_per_key():
    samples, classes = scan_identities(FACE / "train")
    assert len(classes) == 8 and len(samples) == 48
    for aug in ("conservative", "medium", "aggressive"):
        cfg = FaceDataConfig(aug=AUG_PRESETS[aug], auto_augment="rand-m9-mstd0.5" if aug == "medium" else "")
        ds = IdentityFolder(FACE / "train", build_transform(cfg, train=True), seed=3)
        a, b, c = ds[(5, 0)], ds[(5, 0)], ds[(5, 1)]
        assert a["image"].shape == (3, 112, 112) and a["label"] == samples[5][1]
        assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], c["image"])
    big = build_transform(FaceDataConfig(image_size=224, center_crop=0.6, auto_augment="original"), train=True)
    ds = IdentityFolder(FACE / "train", big)
    assert ds[(0, 0)]["image"].shape == (3, 224, 224)
    with pytest.raises(DataError, match="auto_augment"):
        build_transform(FaceDataConfig(auto_augment="bogus-m9"), train=True)
    ev = IdentityFolder(FACE / "train", build_transform(FaceDataConfig(), train=False))
    x = ev[(0, 0)]["image"]
    assert torch.equal(x, ev[(0, 7)]["image"]) and -1.0 <= x.min() and x.max() <= 1.0  # mean = std = 0.5


def test_augmentation_keys_build_those_ops_and_presets_equal_the_former_pipelines():
    from PIL import Image
    from torchvision import transforms as T

    from lib.data.face import CenterCropFraction, FaceTransform

    a = FaceAugConfig(rotation=15.0, grayscale_p=0.3, blur_kernel=7, blur_p=0.4, erasing_p=0.5, jitter=0.2)
    ops = {type(t).__name__: t for t in build_transform(FaceDataConfig(aug=a), train=True).pipeline.transforms}
    assert ops["RandomRotation"].degrees == [-15.0, 15.0] and ops["RandomGrayscale"].p == 0.3
    applies = [t for t in build_transform(FaceDataConfig(aug=a), train=True).pipeline.transforms
               if isinstance(t, T.RandomApply)]
    jit, gb = applies[0], applies[1]
    assert jit.p == 0.8 and jit.transforms[0].brightness == (0.8, 1.2)
    assert gb.p == 0.4 and gb.transforms[0].kernel_size == (7, 7)
    assert ops["RandomErasing"].p == 0.5 and "RandomAffine" not in ops
    none = build_transform(FaceDataConfig(aug=AUG_PRESETS["none"]), train=True).pipeline.transforms
    assert [type(t).__name__ for t in none] == ["CenterCropFraction", "Resize", "ToTensor", "Normalize"]
    with pytest.raises(DataError, match="blur_kernel must be odd"):
        build_transform(FaceDataConfig(aug=FaceAugConfig(blur_kernel=4)), train=True)
    # the former hard-coded "aggressive" preset, op for op: same image for the same per-sample rng
    old = FaceTransform([CenterCropFraction(1.0), T.Resize((112, 112), antialias=True), T.RandomHorizontalFlip(),
                         T.RandomApply([T.ColorJitter(0.3, 0.3, 0.3, 0.05)], p=0.8), T.RandomRotation(10),
                         T.RandomAffine(0, translate=(0.08, 0.08), scale=(0.9, 1.1), shear=5), T.RandomGrayscale(0.2),
                         T.RandomApply([T.GaussianBlur(5, (0.1, 2.0))], p=0.2), T.ToTensor(),
                         T.Normalize((0.5,) * 3, (0.5,) * 3), T.RandomErasing(p=0.25, scale=(0.02, 0.2))], train=True)
    new = build_transform(FaceDataConfig(aug=AUG_PRESETS["aggressive"]), train=True)
    img = Image.open(FACE / "train" / "Tony_Blair" / sorted(p.name for p in (FACE / "train" / "Tony_Blair").iterdir())[0])
    for k in range(4):
        assert torch.equal(old(img, np.random.default_rng(k)), new(img, np.random.default_rng(k)))


def test_resize_then_crop_and_imagenet_normalisation():
    from PIL import Image
    from torchvision.transforms import functional as TF

    imagenet = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    cfg = FaceDataConfig(image_size=224, resize=256, aug=AUG_PRESETS["none"], **imagenet)
    img = Image.open(FACE / "train" / "Tony_Blair" / sorted(p.name for p in (FACE / "train" / "Tony_Blair").iterdir())[0])
    img = img.convert("RGB")
    ev = build_transform(cfg, train=False)(img, np.random.default_rng(0))
    ref = TF.normalize(TF.to_tensor(TF.center_crop(TF.resize(img, [256, 256], antialias=True), [224, 224])),
                       imagenet["mean"], imagenet["std"])
    assert ev.shape == (3, 224, 224) and torch.allclose(ev, ref, atol=1e-6)
    tr = build_transform(cfg, train=True)
    crops = [tr(img, np.random.default_rng(k)) for k in range(3)]
    assert all(c.shape == (3, 224, 224) for c in crops) and not torch.equal(crops[0], crops[1])  # random crop
    big = TF.normalize(TF.to_tensor(TF.resize(img, [256, 256], antialias=True)), imagenet["mean"], imagenet["std"])
    # each train crop is a 224 window of the 256 image (no flip / rotation here): found at some offset
    found = [any(torch.allclose(c, big[:, y:y + 224, x:x + 224], atol=1e-6) for y in range(33) for x in range(33))
             for c in crops]
    assert all(found)


def test_mixup_soft_targets():
    mix = build_mixup(FaceDataConfig(mixup_alpha=0.2, cutmix_alpha=1.0), num_classes=5, label_smoothing=0.1)
    x, t = mix(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    assert x.shape == (4, 3, 16, 16) and t.shape == (4, 5)
    assert torch.allclose(t.sum(1), torch.ones(4)) and t.min() >= 0.1 / 5 - 1e-6
    assert build_mixup(FaceDataConfig(), 5, 0.0) is None


def test_csv_and_lfw_pair_lists(tmp_path):
    pairs = read_pairs(FACE / "val_pairs.csv")
    assert len(pairs) == 24 and sum(p[0] for p in pairs) == 12
    assert all(p[1].is_file() and p[2].is_file() for p in pairs)
    test = read_pairs(FACE / "test_pairs.csv")
    assert len(test) == 8 and {p[0] for p in test} == {-1}
    lfw = read_lfw_pairs(FACE / "pairs.txt", FACE / "val", folds=[2])
    assert [p[0] for p in lfw] == [1, 1, 1, 0, 0, 0] and {p[3] for p in lfw} == {2}
    assert lfw[0][1].name == "Vicente_Fox_0001.jpg" and lfw[3][2].name == "David_Beckham_0004.jpg"
    assert len(read_pairs(FACE / "pairs.txt", FACE / "val")) == 12
    assert lfw_identities(FACE / "pairs.txt", [1]) == {"Tom_Ridge", "Silvio_Berlusconi", "Megawati_Sukarnoputri"}
    bad = tmp_path / "bad.csv"
    bad.write_text("1,a.jpg,b.jpg\n2,a.jpg,b.jpg\n")
    with pytest.raises(DataError, match="bad.csv:2: label must be 0 or 1"):
        read_pairs(bad)
    missing = tmp_path / "missing.csv"
    missing.write_text("path_a,path_b\nx.jpg,y.jpg\n")
    with pytest.raises(DataError, match="image not found"):
        read_pairs(missing)
    short = tmp_path / "pairs.txt"
    short.write_text("2\t3\nA\t1\t2\n")
    with pytest.raises(DataError, match="header says 2 folds x 6 pairs, found 1"):
        read_pairs(short)


def test_identity_disjoint_folds_and_generated_pairs():
    samples, _ = scan_identities(FACE / "train")
    labels = [lab for _, lab in samples]
    tr, va = kfold_indices(len(samples), 4, 1, seed=0, groups=labels)
    assert not {labels[i] for i in tr} & {labels[i] for i in va} and len(tr) + len(va) == 48
    ds = IdentityFolder(FACE / "train", build_transform(FaceDataConfig(), False), indices=tr)
    assert sorted(set(ds.labels.tolist())) == list(range(len(ds.classes))) == list(range(6))
    pairs = make_pairs([labels[i] for i in va], 20, seed=0)
    vl = [labels[i] for i in va]
    assert len(pairs) == 20 and 8 <= sum(p[0] for p in pairs) <= 12
    assert all(p[0] == int(vl[p[1]] == vl[p[2]]) and p[1] != p[2] for p in pairs)


def test_real_lfw_folds_are_identity_disjoint():
    path = shared_path("lfw", "pairs_dev.txt")
    all_pairs = read_lfw_pairs(path, path.parent / "images")
    assert len(all_pairs) == 3000 and sum(p[0] for p in all_pairs) == 1500
    train, val = lfw_identities(path, [1, 2, 3]), lfw_identities(path, [4, 5])
    assert len(train) == 1241 and len(val) == 845 and not train & val
    assert len(read_pairs(path, path.parent / "images", [4, 5])) == 1200
