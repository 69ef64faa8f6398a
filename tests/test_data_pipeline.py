"""Fast decode (read_image), the seg CPU augmentation path and the batched device path
(lib.data.device_aug): exactness where they should be exact, agreement in distribution,
and make_loader's (index, epoch) key contract."""

import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from lib.config import build_config
from lib.data import device_aug
from lib.data.common import DataError, make_loader, read_image, sample_rng, to_tensor_normalized
from lib.data.seg import SegDataConfig, SegFolderDataset, draw_photometric, normalize, photometric, read_rgb
from lib.errors import UserError
from tests.conftest import ROOT

SEG = ROOT / "tests" / "data" / "seg"
STD255 = torch.tensor([0.229, 0.224, 0.225])[:, None, None] * 255


def _cfg(root=SEG, **kw):
    return build_config(SegDataConfig, {"root": str(root), "scale": [120, 90], "crop_size": [64, 64], **kw})


def _grey_levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of two normalised images in 0..255 grey levels."""
    return ((a - b).abs() * STD255).round()


def _photometric_float(img, rng):  # mmseg's PhotoMetricDistortion on float32 arrays (cv2 HSV), the reference
    x = img.astype(np.float32)
    if rng.random() < 0.5:
        x = x + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        x = x * rng.uniform(0.5, 1.5)
    x = np.clip(x, 0, 255).astype(np.uint8)
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    if do_sat or do_hue:
        hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV).astype(np.float32)
        if do_sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 255)
        if do_hue:
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-18, 18)) % 180
        x = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    if not contrast_first and rng.random() < 0.5:
        x = np.clip(x.astype(np.float32) * rng.uniform(0.5, 1.5), 0, 255).astype(np.uint8)
    return x


# ---- decode


def test_read_image_fast_path_equals_pil():
    data = ROOT / "tests" / "data"
    files = sorted(data.rglob("*.jpg"))[:20] + sorted(data.rglob("*.png"))[:20]
    assert len(files) >= 10
    for f in files:
        assert np.array_equal(read_image(f), np.array(Image.open(f).convert("RGB"))), f
    lab = sorted((SEG / "trainannot").iterdir())[0]
    assert np.array_equal(read_image(lab, "label"), np.array(Image.open(lab)))


def test_read_image_palette_label_keeps_indices_and_errors_name_the_file(tmp_path):
    idx = (np.arange(48).reshape(6, 8) % 7).astype(np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette([v for i in range(256) for v in (i, 255 - i, 3 * i % 256)])
    im.save(tmp_path / "pal.png")
    assert np.array_equal(read_image(tmp_path / "pal.png", "label"), idx)
    assert read_image(tmp_path / "pal.png").shape == (6, 8, 3)  # RGB of the palette
    Image.fromarray(idx).save(tmp_path / "grey.bmp")  # not JPEG/PNG: PIL path
    assert np.array_equal(read_image(tmp_path / "grey.bmp", "label"), idx)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match="corrupt or unreadable image .*bad.jpg"):
        read_image(tmp_path / "bad.jpg")
    with pytest.raises(DataError, match="image not found: .*nope.png"):
        read_image(tmp_path / "nope.png")


# ---- CPU path pieces


def test_seg_cv2_decode_and_normalize_equal_pil_and_to_tensor_normalized():
    for f in sorted((SEG / "train").iterdir()):
        img = read_rgb(f)
        assert np.array_equal(img, np.array(Image.open(f).convert("RGB"))), f
        assert torch.equal(normalize(img), to_tensor_normalized(img))


def test_photometric_tables_equal_the_float_arithmetic():
    img = np.array(Image.open(sorted((SEG / "train").iterdir())[0]).convert("RGB"))[:96, :128]
    for seed in range(24):
        ref = _photometric_float(img, np.random.default_rng(seed))
        out = photometric(img, draw_photometric(np.random.default_rng(seed)))
        assert np.array_equal(out, ref), seed


def test_hsv_ports_equal_opencv():
    # random pixels, a grey ramp, pure red; widths 512 (whole SIMD blocks) and 100 as one row
    rng = np.random.default_rng(0)
    rgb = np.concatenate([rng.integers(0, 256, (200, 512, 3)), np.repeat(np.arange(512) // 2, 3).reshape(1, 512, 3),
                          np.zeros((1, 512, 3), int) + [255, 0, 0]]).astype(np.uint8)
    hsv = rgb.copy()
    hsv[..., 0] %= 180  # OpenCV's 8-bit hue is 0..179

    def port(fn, a):
        return fn(torch.from_numpy(a).permute(2, 0, 1).float()).permute(1, 2, 0).numpy().astype(np.uint8)

    assert np.array_equal(port(device_aug.rgb_to_hsv_cv, rgb), cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV))  # integer: exact
    # float32 steps with OpenCV's FMA (x86 SIMD builds): exact here; a build without FMA would
    # differ by 1 level on a few pixels, OpenCV's scalar row tail (rounds) likewise
    out, ref = port(device_aug.hsv_to_rgb_cv, hsv), cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    d = np.abs(out.astype(int) - ref)
    assert (d > 0).any(-1).mean() < 1e-3 and d.max() <= 1, ((d > 0).any(-1).mean(), d.max())
    row = hsv[:150, :100].reshape(1, -1, 3)  # 15000 pixels: a scalar tail of 15000 mod 64 = 24 or less
    d = np.abs(port(device_aug.hsv_to_rgb_cv, row).astype(int) - cv2.cvtColor(row, cv2.COLOR_HSV2RGB))
    assert (d > 0).any(-1).sum() <= 24 and (d > 0)[0, :-24].sum() == 0 and d.max() <= 1


def test_photometric_as_one_row_equals_per_row_hsv():
    # photometric converts the image as one row; per row (cv2 on the (H, W, 3) image) differs at most
    # by OpenCV's tail rounding: 1 level
    img = np.random.default_rng(1).integers(0, 256, (60, 100, 3)).astype(np.uint8)
    p = dict(device_aug.NO_PHOTOMETRIC, hsv=1.0, saturation=1.2, hue=5.5)
    out = photometric(img, p)
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + np.float32(5.5)) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] * np.float32(1.2), 0, 255)
    ref = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    assert np.abs(out.astype(int) - ref).max() <= 1 and (out != ref).any(-1).mean() < 0.5


# ---- the two paths


def _identity_cfg(**kw):
    # scale = image size and ratio 1: no rescale; crop = image: no crop; no flip, no photometric
    return _cfg(scale=[480, 360], ratio_range=[1.0, 1.0], crop_size=[360, 480], flip_prob=0.0, photometric=False,
                cat_max_ratio=1.0, **kw)


def test_identity_transform_is_exact_on_both_paths():
    cpu = SegFolderDataset(_identity_cfg(), "train", train=True)
    dev = SegFolderDataset(_identity_cfg(aug_device="device"), "train", train=True)
    items = [dev[(i, 0)] for i in range(3)]
    batch = device_aug.seg_train_batch(device_aug.collate(items), (360, 480))
    for i in range(3):
        img, lab = cpu.load(i)
        ref = to_tensor_normalized(img)
        assert torch.equal(cpu[(i, 0)]["image"], ref) and torch.equal(cpu[(i, 0)]["label"], torch.from_numpy(lab))
        assert torch.equal(batch["image"][i], ref) and torch.equal(batch["label"][i], torch.from_numpy(lab))


def test_device_path_matches_cpu_path_sample_by_sample():
    cpu = SegFolderDataset(_cfg(), "train", train=True, seed=5)
    dev = SegFolderDataset(_cfg(aug_device="device"), "train", train=True, seed=5)
    keys = [(i, e) for e in range(4) for i in range(len(cpu))]
    batch = device_aug.seg_train_batch(device_aug.collate([dev[k] for k in keys]), (64, 64))
    ref = torch.stack([cpu[k]["image"] for k in keys])
    assert torch.equal(batch["label"], torch.stack([cpu[k]["label"] for k in keys]))
    d = _grey_levels(batch["image"], ref)
    assert (d > 0).float().mean() < 0.01 and d.max() <= 8  # rounding of PIL's fixed-point resample only


def test_device_path_statistics_agree_with_cpu_path_over_many_samples():
    # same seed = same draws; the statistics must agree to a fraction of a grey level, while
    # one missing step (photometric off on the device path) moves them by 10x the tolerance
    def stats(image):  # per-channel mean, std, and mean within-image contrast
        return torch.cat([image.mean((0, 2, 3)), image.std((0, 2, 3)), image.flatten(2).std(2).mean(0)])

    cpu = SegFolderDataset(_cfg(crop_size=[48, 48]), "train", train=True, seed=1)
    keys = [(i, e) for e in range(24) for i in range(len(cpu))]  # 144 samples
    a = torch.stack([cpu[k]["image"] for k in keys])
    la = torch.stack([cpu[k]["label"] for k in keys])
    gaps = {}
    for photo in (True, False):
        dev = SegFolderDataset(_cfg(crop_size=[48, 48], aug_device="device", photometric=photo), "train", train=True,
                               seed=1)
        b = device_aug.seg_train_batch(device_aug.collate([dev[k] for k in keys]), (48, 48))
        gaps[photo] = (stats(a) - stats(b["image"])).abs().max().item()
        fa, fb = (torch.bincount(x.flatten(), minlength=256).float() / x.numel() for x in (la, b["label"]))
        assert torch.equal(fa, fb) and fa[255] > 0  # class frequencies (and ignore) agree
    assert gaps[True] < 2e-3 < 2e-2 < gaps[False], gaps


def test_device_collate_pads_mixed_sizes(tmp_path):
    root = tmp_path / "seg"
    shutil.copytree(SEG, root)
    f, a = sorted((root / "train").iterdir())[1], sorted((root / "trainannot").iterdir())[1]
    Image.open(f).resize((300, 200)).save(f)
    Image.open(a).resize((300, 200), Image.NEAREST).save(a)
    cfg = dict(scale=[96, 72], crop_size=[80, 80])  # smaller than the rescaled image on some draws: padding
    cpu = SegFolderDataset(_cfg(root, **cfg), "train", train=True, seed=3)
    dev = SegFolderDataset(_cfg(root, aug_device="device", **cfg), "train", train=True, seed=3)
    keys = [(i, e) for e in range(3) for i in range(3)]
    batch = device_aug.collate([dev[k] for k in keys])
    assert batch["image"].shape[2:] == (360, 480) and batch["image"].dtype == torch.uint8
    out = device_aug.seg_train_batch(batch, (80, 80))
    ref = torch.stack([cpu[k]["image"] for k in keys])
    assert torch.equal(out["label"], torch.stack([cpu[k]["label"] for k in keys]))
    d = _grey_levels(out["image"], ref)
    assert (d > 0).float().mean() < 0.01 and d.max() <= 8


def test_augmentation_is_a_function_of_seed_epoch_index_on_both_paths():
    for mode in ("cpu", "device"):
        ds = SegFolderDataset(_cfg(aug_device=mode), "train", train=True, seed=3)
        k = "image" if mode == "cpu" else "aug"  # the device path's image is the decoded source
        assert torch.equal(ds[(2, 1)][k], ds[(2, 1)][k]) and torch.equal(ds[(2, 1)]["label"], ds[(2, 1)]["label"])
        assert not torch.equal(ds[(2, 1)][k], ds[(2, 2)][k])
    p1, _ = ds.draw((360, 480), ds.load(0)[1], sample_rng(3, 0, 0))
    p2, _ = ds.draw((360, 480), ds.load(0)[1], sample_rng(3, 0, 0))
    assert p1 == p2 and set(p1) == set(device_aug.AUG_FIELDS)


def test_bad_aug_device_names_the_key():
    with pytest.raises(UserError, match=r"aug_device: 'gpu' is not one of \['cpu', 'device'\]|data.aug_device must be cpu or device, got 'gpu'"):
        SegFolderDataset(_cfg(aug_device="gpu"), "train", train=True)


# ---- loader contract


class PlainIndex(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return [10, 11, 12, 13][i]


def test_make_loader_refuses_a_plain_index_dataset_and_hands_epoch_keys():
    with pytest.raises(DataError, match="PlainIndex takes plain indices, .*\\(index, epoch\\) keys: set "
                                        "`accepts_epoch_keys = True`"):
        make_loader(PlainIndex(), 2, shuffle=False)

    class Keys(PlainIndex):
        accepts_epoch_keys = True

        def __getitem__(self, key):
            return torch.tensor(key)

    loader = make_loader(Keys(), 2, shuffle=False)
    loader.sampler.set_epoch(3)
    assert torch.cat(list(loader)).tolist() == [[0, 3], [1, 3], [2, 3], [3, 3]]
    assert len(make_loader(SegFolderDataset(_cfg(), "val", train=False), 1, shuffle=False)) == 2
