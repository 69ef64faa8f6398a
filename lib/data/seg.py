"""Semantic segmentation data: image folder + label-PNG folder, mmseg-style augmentation.

    ds = SegFolderDataset(cfg, "train", train=True, seed=0)      # split: train | val | test
    ds[(index, epoch)] -> {"image": (3, H, W) float, "label": (H, W) int64 (255 = ignore), "name": str}
    # data.aug_device=device (train): {"image": (3, h, w) uint8 source, "label": crop, "aug": (15,) choices, ...};
    # collate with lib.data.device_aug.collate, finish with device_aug.seg_train_batch on the GPU

Labels: values in `void_labels` become `ignore_index` (CamVid's 11 = void); any other value
>= num_classes is an error naming the file. Train pipeline (mmseg): random rescale of `scale`
by a ratio in `ratio_range` keeping aspect, random crop with `cat_max_ratio`, flip, photometric
distortion, normalise, pad to the crop size; the image is resampled only inside the crop box
(PIL `resize(box=...)`), never at the full rescaled size. Validation: resize to `scale` keeping aspect; the
label stays at its original size (metrics at original resolution, as mmseg).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from lib.data.device_aug import AUG_FIELDS, NO_PHOTOMETRIC
from lib.config import Frac, NonNegInt, PathStr, PosFloat, PosInt, Range, SubPath
from lib.errors import DataError, UserError

from lib.data.common import (decode_image_bytes, denormalize, read_image, require_dir, sample_rng,  # noqa: F401
                             split_key, to_tensor_normalized)  # (denormalize re-exported)

IMG_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist"]
CAMVID_PALETTE = [[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
                  [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192]]


@dataclass
class SegDataConfig:
    root: PathStr = "tests/data/seg"
    train_img_dir: SubPath = "train"  # folders below `root`
    train_ann_dir: SubPath = "trainannot"
    val_img_dir: SubPath = "val"
    val_ann_dir: SubPath = "valannot"
    # labelled test set for eval_only (split "test"); relative to `root`, or absolute paths
    test_img_dir: SubPath = ""
    test_ann_dir: SubPath = ""
    num_classes: PosInt = 11
    class_names: list[str] = field(default_factory=lambda: list(CAMVID_CLASSES))
    ignore_index: NonNegInt = 255
    void_labels: list[int] = field(default_factory=lambda: [11])  # mapped to ignore_index
    scale: tuple[PosInt, PosInt] = (960, 720)  # (W, H) base scale; images are resized to fit it keeping aspect
    ratio_range: tuple[PosFloat, PosFloat] = (0.5, 2.0)
    crop_size: tuple[PosInt, PosInt] = (512, 512)  # (H, W)
    cat_max_ratio: Annotated[float, Range(gt=0, le=1)] = 0.75  # 1 = off
    flip_prob: Frac = 0.5
    photometric: bool = True
    # where the train augmentation runs: "cpu" = in the loader workers (PIL + OpenCV); "device" = workers
    # decode and crop the label only, lib.data.device_aug.seg_train_batch does the image on the GPU
    aug_device: Literal["cpu", "device"] = "cpu"
    folds: NonNegInt = 0  # k-fold cross-validation over the train folder (0 = off)
    fold: NonNegInt = 0


def list_pairs(root: Path, img_dir: str, ann_dir: str) -> list[tuple[Path, Path]]:
    """(image, label) pairs matched by file stem."""
    idir, adir = require_dir(root / img_dir, "image"), require_dir(root / ann_dir, "label")
    labels = {p.stem: p for p in adir.iterdir() if p.suffix.lower() in IMG_EXTS}
    pairs = []
    for p in sorted(idir.iterdir()):
        if p.suffix.lower() not in IMG_EXTS:
            continue
        if p.stem not in labels:
            raise DataError(f"no label for image {p} in {adir}")
        pairs.append((p, labels[p.stem]))
    if not pairs:
        raise DataError(f"no images in {idir}")
    return pairs


def rescale_size(w: int, h: int, scale: tuple[int, int], ratio: float) -> tuple[int, int]:
    """mmseg keep_ratio rescale: fit (long, short) edges into scale * ratio."""
    long_e, short_e = max(scale) * ratio, min(scale) * ratio
    f = min(long_e / max(w, h), short_e / min(w, h))
    return max(int(w * f + 0.5), 1), max(int(h * f + 0.5), 1)


_rescale_size = rescale_size  # old private name


def draw_photometric(rng: np.random.Generator) -> dict:
    """mmseg PhotoMetricDistortion parameters: brightness, contrast (before or after the HSV
    step), saturation, hue; each on with probability 1/2. Identity values when off."""
    p = dict(NO_PHOTOMETRIC)
    if rng.random() < 0.5:
        p["brightness"] = rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        p["contrast_before"] = rng.uniform(0.5, 1.5)
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    p["hsv"] = float(do_sat or do_hue)
    if do_sat:
        p["saturation"] = rng.uniform(0.5, 1.5)
    if do_hue:  # mmseg: +-18 of OpenCV's 180 hue levels
        p["hue"] = rng.uniform(-18, 18)
    if not contrast_first and rng.random() < 0.5:
        p["contrast_after"] = rng.uniform(0.5, 1.5)
    return p


def _lut(fn) -> np.ndarray:
    """A uint8 -> uint8 table of fn over float32 values 0..255 (what the float32 array ops give)."""
    return fn(np.arange(256, dtype=np.float32)).astype(np.uint8)


def hue_table(hue: float) -> np.ndarray:
    """OpenCV's 8-bit hue (0..179, period 180) shifted by `hue`: float32 (x + hue) mod 180,
    truncated (a float32 sum that rounds up to 180.0 wraps to 0). On integer hues this is a
    shift by floor(hue): uniform(-18, 18) gives mmseg's randint(-18, 18) shifts."""
    return (((np.arange(256, dtype=np.float32) + np.float32(hue)) % 180).astype(np.int64) % 180).astype(np.uint8)


def photometric(img: np.ndarray, p: dict) -> np.ndarray:
    """Apply `draw_photometric` parameters to (H, W, 3) uint8. Each step is a uint8 table
    (cv2.LUT), equal to the float32 arithmetic (x + b) * c, clip, truncate; saturation and hue
    on OpenCV's 8-bit HSV (cv2.COLOR_RGB2HSV / COLOR_HSV2RGB, hue 0..179), as mmseg. The HSV
    round trip runs on the image as one row: OpenCV's HSV -> RGB truncates in its SIMD body and
    rounds in the scalar tail of each row, so one row keeps the tail to the last < 64 pixels
    (none for 512x512) and `device_aug.hsv_to_rgb_cv` (the SIMD body) matches it."""
    x = np.ascontiguousarray(img)
    if p["brightness"] != 0 or p["contrast_before"] != 1:
        x = cv2.LUT(x, _lut(lambda v: np.clip((v + np.float32(p["brightness"])) * np.float32(p["contrast_before"]),
                                              0, 255)))
    if p["hsv"]:
        sat = _lut(lambda v: np.clip(v * np.float32(p["saturation"]), 0, 255))
        table = np.stack([hue_table(p["hue"]), sat, np.arange(256, dtype=np.uint8)], -1)[None]  # (1, 256, 3)
        row = cv2.cvtColor(cv2.LUT(cv2.cvtColor(x.reshape(1, -1, 3), cv2.COLOR_RGB2HSV), table), cv2.COLOR_HSV2RGB)
        x = row.reshape(x.shape)
    if p["contrast_after"] != 1:
        x = cv2.LUT(x, _lut(lambda v: np.clip(v * np.float32(p["contrast_after"]), 0, 255)))
    return x


_NORM_LUT: list[np.ndarray] = []


def normalize(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, bit-identical to `to_tensor_normalized`: its own output
    on the 256 grey levels, as one float32 table per channel (cv2.LUT), instead of four passes."""
    if not _NORM_LUT:
        lut = to_tensor_normalized(np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 256, 3))  # (3, 1, 256)
        _NORM_LUT.extend(np.ascontiguousarray(lut[c, 0].numpy()) for c in range(3))
    chw = np.ascontiguousarray(img.transpose(2, 0, 1))
    out = np.empty(chw.shape, np.float32)
    for c in range(3):
        out[c] = cv2.LUT(chw[c], _NORM_LUT[c])
    return torch.from_numpy(out)


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_rgb(path: Path) -> np.ndarray:
    """`read_image(path)`, with 8-bit grey / RGB PNGs decoded by cv2.imdecode (libpng: the same
    pixels as PIL, faster than torchvision.io here); anything else, and any file cv2 cannot decode,
    goes through read_image (which words the errors)."""
    try:
        data = path.read_bytes()
    except OSError:
        return read_image(path)
    if data[:8] == _PNG_MAGIC and len(data) > 33 and data[24] == 8 and data[25] in (0, 2):
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
        if img is not None and img.ndim == 3:
            return img
    return decode_image_bytes(data, path)


class SegFolderDataset(torch.utils.data.Dataset):
    """split: "train" | "val" | "test" (data.test_img_dir / test_ann_dir, which must be set).
    `self.img_dir` / `self.ann_dir` are the folders actually read (for the run log)."""

    accepts_epoch_keys = True  # make_loader's EpochSampler hands (index, epoch) keys

    def __init__(self, cfg: SegDataConfig, split: str, train: bool, seed: int = 0, indices: list[int] | None = None):
        dirs = {"train": (cfg.train_img_dir, cfg.train_ann_dir), "val": (cfg.val_img_dir, cfg.val_ann_dir),
                "test": (cfg.test_img_dir, cfg.test_ann_dir)}
        if split not in dirs:
            raise DataError(f"unknown seg split {split!r} (train, val or test)")
        img_dir, ann_dir = dirs[split]
        if split == "test" and not (img_dir and ann_dir):
            raise DataError("split 'test' needs data.test_img_dir and data.test_ann_dir")
        # absolute folders do not need the root (e.g. eval_only on another machine's test set)
        root = Path(cfg.root) if Path(img_dir).is_absolute() and Path(ann_dir).is_absolute() \
            else require_dir(cfg.root, "dataset root")
        self.img_dir, self.ann_dir = root / img_dir, root / ann_dir
        self.pairs = list_pairs(root, img_dir, ann_dir)
        if indices is not None:
            self.pairs = [self.pairs[i] for i in indices]
        if cfg.aug_device not in ("cpu", "device"):
            raise UserError(f"data.aug_device must be cpu or device, got {cfg.aug_device!r}")
        self.cfg, self.train, self.seed = cfg, train, seed
        self.on_device = train and cfg.aug_device == "device"  # batch goes through device_aug.seg_train_batch
        lut = np.arange(256, dtype=np.int64)
        lut[cfg.num_classes:] = -1  # out of range -> error
        lut[cfg.ignore_index] = cfg.ignore_index
        for v in cfg.void_labels:
            lut[v] = cfg.ignore_index
        self.lut = lut

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        img_path, ann_path = self.pairs[i]
        img, raw = read_rgb(img_path), read_image(ann_path, "label")
        if raw.shape != img.shape[:2]:
            raise DataError(f"label {ann_path} is {raw.shape}, image {img_path} is {img.shape[:2]}")
        label = self.lut[raw.astype(np.int64)]
        if (label < 0).any():
            bad = int(raw[label < 0].max())
            raise DataError(f"label value {bad} out of range in {ann_path} "
                            f"(num_classes={self.cfg.num_classes}, void={self.cfg.void_labels})")
        return img, label

    def __getitem__(self, key) -> dict:
        i, epoch = split_key(key)
        img, label = self.load(i)
        name = self.pairs[i][0].stem
        if self.train:
            p, label = self.draw(img.shape[:2], label, sample_rng(self.seed, i, epoch))
            if self.on_device:  # image stays uint8 at its own size; lib.data.device_aug does the rest
                return {"image": torch.from_numpy(img).permute(2, 0, 1), "label": torch.from_numpy(label),
                        "aug": torch.tensor([p[k] for k in AUG_FIELDS], dtype=torch.float64), "name": name}
            return {"image": normalize(self.apply(img, p)), "label": torch.from_numpy(label), "name": name}
        else:
            h, w = img.shape[:2]
            img = np.array(Image.fromarray(img).resize(rescale_size(w, h, self.cfg.scale, 1.0), Image.BILINEAR))
        return {"image": to_tensor_normalized(img), "label": torch.from_numpy(label), "name": name}

    def augment(self, img: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        """The CPU train pipeline on one sample: (H, W, 3) uint8, (H, W) int -> crop-sized pair."""
        p, label = self.draw(img.shape[:2], label, rng)
        return self.apply(img, p), label

    def draw(self, hw: tuple[int, int], label: np.ndarray, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
        """All random choices of one train sample (AUG_FIELDS) and its final (crop_h, crop_w) int64 label.

        mmseg order: rescale ratio; crop corner, redrawn (up to 10 times) while one class covers
        more than cat_max_ratio of the crop; flip; photometric. Only the label is resampled
        here: nearest-neighbour straight into the crop box (PIL `resize(box=...)`), so the full
        rescaled map is never built."""
        cfg = self.cfg
        h, w = hw
        out_w, out_h = rescale_size(w, h, cfg.scale, rng.uniform(*cfg.ratio_range))
        ch, cw = cfg.crop_size
        crop_h, crop_w = min(ch, out_h), min(cw, out_w)
        sx, sy = w / out_w, h / out_h
        lab = Image.fromarray(label.astype(np.uint8))
        for _ in range(10):
            y0 = int(rng.integers(0, max(out_h - ch, 0) + 1))
            x0 = int(rng.integers(0, max(out_w - cw, 0) + 1))
            box = (x0 * sx, y0 * sy, (x0 + crop_w) * sx, (y0 + crop_h) * sy)
            crop = np.asarray(lab.resize((crop_w, crop_h), Image.NEAREST, box=box))
            if cfg.cat_max_ratio >= 1:
                break
            counts = np.bincount(crop.ravel(), minlength=256)
            counts[cfg.ignore_index] = 0
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cfg.cat_max_ratio:
                break
        flip = rng.random() < cfg.flip_prob
        p = {"in_w": w, "in_h": h, "out_w": out_w, "out_h": out_h, "x0": x0, "y0": y0, "crop_w": crop_w,
             "crop_h": crop_h, "flip": float(flip), **(draw_photometric(rng) if cfg.photometric else NO_PHOTOMETRIC)}
        label = crop.astype(np.int64)
        if flip:
            label = label[:, ::-1]
        if crop_h < ch or crop_w < cw:  # pad to crop size with ignore
            label = np.pad(label, ((0, ch - crop_h), (0, cw - crop_w)), constant_values=cfg.ignore_index)
        return p, np.ascontiguousarray(label)

    def apply(self, img: np.ndarray, p: dict) -> np.ndarray:
        """`draw`'s choices on the image: bilinear (antialiased, PIL) resample of just the crop box,
        flip, photometric, pad with 0 to the crop size -> (crop_h, crop_w, 3) uint8."""
        sx, sy = p["in_w"] / p["out_w"], p["in_h"] / p["out_h"]
        x0, y0, crop_w, crop_h = p["x0"], p["y0"], p["crop_w"], p["crop_h"]
        if (crop_w, crop_h) != (img.shape[1], img.shape[0]) or (x0, y0) != (0, 0) or sx != 1 or sy != 1:
            img = np.asarray(Image.fromarray(img).resize((crop_w, crop_h), Image.BILINEAR, box=(
                x0 * sx, y0 * sy, (x0 + crop_w) * sx, (y0 + crop_h) * sy)))
        if p["flip"]:
            img = cv2.flip(img, 1)
        img = photometric(img, p)
        ch, cw = self.cfg.crop_size
        if crop_h < ch or crop_w < cw:
            img = np.pad(img, ((0, ch - crop_h), (0, cw - crop_w), (0, 0)))
        return np.ascontiguousarray(img)


def colorize(label: np.ndarray, palette=CAMVID_PALETTE, ignore_index: int = 255) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours (ignore = black)."""
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(palette)] = palette
    out = pal[np.clip(label, 0, 255)]
    out[label == ignore_index] = 0
    return out


