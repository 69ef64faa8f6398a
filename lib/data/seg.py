"""Semantic segmentation data: image folder + label-PNG folder, mmseg-style augmentation.

    ds = SegFolderDataset(root, "train", "trainannot", cfg, train=True)
    ds[(index, epoch)] -> {"image": (3, H, W) float, "label": (H, W) int64 (255 = ignore), "name": str}

Labels: values in `void_labels` become `ignore_index` (CamVid's 11 = void); any other value
>= num_classes is an error naming the file. Train pipeline (mmseg): random rescale of `scale`
by a ratio in `ratio_range` keeping aspect, random crop with `cat_max_ratio`, flip, photometric
distortion, normalise, pad to the crop size. Validation: resize to `scale` keeping aspect; the
label stays at its original size (metrics at original resolution, as mmseg).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lib.data.common import DataError, read_image, require_dir, sample_rng, split_key, to_tensor_normalized

IMG_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist"]
CAMVID_PALETTE = [[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
                  [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192]]


@dataclass
class SegDataConfig:
    root: str = "tests/data/seg"
    train_img_dir: str = "train"
    train_ann_dir: str = "trainannot"
    val_img_dir: str = "val"
    val_ann_dir: str = "valannot"
    num_classes: int = 11
    class_names: list[str] = field(default_factory=lambda: list(CAMVID_CLASSES))
    ignore_index: int = 255
    void_labels: list[int] = field(default_factory=lambda: [11])  # mapped to ignore_index
    scale: tuple[int, int] = (960, 720)  # (W, H) base scale; images are resized to fit it keeping aspect
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: tuple[int, int] = (512, 512)  # (H, W)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    folds: int = 0  # k-fold cross-validation over the train folder (0 = off)
    fold: int = 0


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


def _rescale_size(w: int, h: int, scale: tuple[int, int], ratio: float) -> tuple[int, int]:
    """mmseg keep_ratio rescale: fit (long, short) edges into scale * ratio."""
    long_e, short_e = max(scale) * ratio, min(scale) * ratio
    f = min(long_e / max(w, h), short_e / min(w, h))
    return max(int(w * f + 0.5), 1), max(int(h * f + 0.5), 1)


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg PhotoMetricDistortion: brightness, contrast (before or after), saturation, hue."""
    x = img.astype(np.float32)
    if rng.random() < 0.5:
        x = x + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        x = x * rng.uniform(0.5, 1.5)
    x = np.clip(x, 0, 255).astype(np.uint8)
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    if do_sat or do_hue:
        hsv = np.array(Image.fromarray(x).convert("HSV")).astype(np.float32)
        if do_sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 255)
        if do_hue:  # mmseg: +-18 of 180 degrees -> +-25.5 of 255
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-18, 18) * 255 / 180) % 255
        x = np.array(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))
    if not contrast_first and rng.random() < 0.5:
        x = np.clip(x.astype(np.float32) * rng.uniform(0.5, 1.5), 0, 255).astype(np.uint8)
    return x


class SegFolderDataset(torch.utils.data.Dataset):
    def __init__(self, cfg: SegDataConfig, split: str, train: bool, seed: int = 0, indices: list[int] | None = None):
        root = require_dir(cfg.root, "dataset root")
        img_dir, ann_dir = ((cfg.train_img_dir, cfg.train_ann_dir) if split == "train"
                            else (cfg.val_img_dir, cfg.val_ann_dir))
        self.pairs = list_pairs(root, img_dir, ann_dir)
        if indices is not None:
            self.pairs = [self.pairs[i] for i in indices]
        self.cfg, self.train, self.seed = cfg, train, seed
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
        img, raw = read_image(img_path), read_image(ann_path, "label")
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
        if self.train:
            img, label = self.augment(img, label, sample_rng(self.seed, i, epoch))
        else:
            h, w = img.shape[:2]
            img = np.array(Image.fromarray(img).resize(_rescale_size(w, h, self.cfg.scale, 1.0), Image.BILINEAR))
        return {"image": to_tensor_normalized(img), "label": torch.from_numpy(label), "name": self.pairs[i][0].stem}

    def augment(self, img: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        cfg = self.cfg
        h, w = img.shape[:2]
        size = _rescale_size(w, h, cfg.scale, rng.uniform(*cfg.ratio_range))
        img = np.array(Image.fromarray(img).resize(size, Image.BILINEAR))
        label = np.array(Image.fromarray(label.astype(np.uint8)).resize(size, Image.NEAREST)).astype(np.int64)
        ch, cw = cfg.crop_size
        for _ in range(10):  # random crop; retry while one class covers more than cat_max_ratio
            y0 = int(rng.integers(0, max(label.shape[0] - ch, 0) + 1))
            x0 = int(rng.integers(0, max(label.shape[1] - cw, 0) + 1))
            crop = label[y0:y0 + ch, x0:x0 + cw]
            if cfg.cat_max_ratio >= 1:
                break
            _, counts = np.unique(crop[crop != cfg.ignore_index], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < cfg.cat_max_ratio:
                break
        img, label = img[y0:y0 + ch, x0:x0 + cw], crop
        if rng.random() < cfg.flip_prob:
            img, label = img[:, ::-1], label[:, ::-1]
        if cfg.photometric:
            img = _photometric(np.ascontiguousarray(img), rng)
        ph, pw = ch - img.shape[0], cw - img.shape[1]
        if ph > 0 or pw > 0:  # pad to crop size: image 0, label ignore
            img = np.pad(img, ((0, ph), (0, pw), (0, 0)))
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=cfg.ignore_index)
        return np.ascontiguousarray(img), np.ascontiguousarray(label)


def colorize(label: np.ndarray, palette=CAMVID_PALETTE, ignore_index: int = 255) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours (ignore = black)."""
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(palette)] = palette
    out = pal[np.clip(label, 0, 255)]
    out[label == ignore_index] = 0
    return out


def denormalize(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) uint8."""
    from lib.data.common import IMAGENET_MEAN, IMAGENET_STD

    x = image.float().cpu() * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
