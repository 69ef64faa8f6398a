"""Face data: identity folders, a P x K identity sampler, augmentation presets, verification pair lists.

    ds = IdentityFolder(root, build_transform(cfg, train=True), seed=0)   # root/<identity>/<image>.jpg
    ds[(index, epoch)] -> {"image": (3, S, S) float, "label": int}       # label = identity folder index
    PKSampler(ds.labels, P, K, num_processes, seed)                       # DataLoader(batch_size=P * K)
    pairs = read_pairs("val.csv" | "pairs.txt", image_root, folds)       # [(label or -1, path_a, path_b)]

Pair lists: CSV `label,path_a,path_b` (1 = same person; without the label column for a test
list; an optional header line naming path_a), or LFW `pairs.txt` (first line `folds n`, then
per fold n same-person lines `name i j` and n different-person lines `name1 i name2 j`,
image `<root>/<name>/<name>_<i:04d>.jpg`).

Geometry: optional central crop (`center_crop`), then resize to `image_size`, or, with `resize`
> `image_size`, resize to `resize` and crop `image_size` (random when training, central for eval:
the ImageNet-style "resize 256 + random crop 224").
Augmentation (train), each a key of `data.aug` (FaceAugConfig; 0 = off), applied in this order:
flip, colour jitter, rotation, affine, grayscale, Gaussian blur, [timm auto-augment], then random
erasing on the tensor. The former presets are values of these keys (AUG_PRESETS, also what
`build_transform` takes for a preset name): conservative = flip + rotation 5 (the defaults);
medium = + colour jitter 0.3 (p 0.8), rotation 10; aggressive = medium + affine, grayscale 0.2,
blur kernel 5 (p 0.2), erasing 0.25. Optional timm RandAugment ("rand-m9-mstd0.5") / AutoAugment
("original", "v0") / AugMix ("augmix-m5") strings. Every random draw of a sample depends on
(seed, epoch, index) only (lib.data.common).
"""

from __future__ import annotations

import csv
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from lib.config import Frac, NonNegFloat, NonNegInt, PathStr, PosFloat, PosInt, Range
from lib.data.common import read_image, require_dir, sample_rng, split_key
from lib.errors import DataError

IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class FaceAugConfig:
    """Train-time augmentation; every parameter is a key (0 = that step off)."""

    flip_p: Frac = 0.5  # horizontal flip probability
    jitter: NonNegFloat = 0.0  # colour jitter: brightness, contrast, saturation factors in [1 - j, 1 + j]
    jitter_hue: Annotated[float, Range(ge=0, le=0.5)] = 0.05  # ... and hue shift in [-h, h] (when jitter > 0)
    jitter_p: Frac = 0.8  # probability of the colour jitter
    rotation: Annotated[float, Range(ge=0, le=180)] = 5.0  # degrees, U[-rotation, rotation]
    translate: Frac = 0.0  # affine: shift up to this fraction of the side
    scale: Annotated[float, Range(ge=0, lt=1)] = 0.0  # affine: zoom U[1 - scale, 1 + scale]
    shear: NonNegFloat = 0.0  # affine: shear degrees
    grayscale_p: Frac = 0.0
    blur_kernel: NonNegInt = 0  # Gaussian blur kernel side (odd; 0 = off)
    blur_sigma: tuple[PosFloat, PosFloat] = (0.1, 2.0)
    blur_p: Frac = 0.2  # probability of the blur (when blur_kernel > 0)
    erasing_p: Frac = 0.0  # random erasing probability (on the normalised tensor)
    erasing_scale: tuple[Frac, Frac] = (0.02, 0.2)  # erased area fraction


AUG_PRESETS = {
    "none": FaceAugConfig(flip_p=0.0, rotation=0.0),
    "conservative": FaceAugConfig(),
    "medium": FaceAugConfig(jitter=0.3, rotation=10.0),
    "aggressive": FaceAugConfig(jitter=0.3, rotation=10.0, translate=0.08, scale=0.1, shear=5.0, grayscale_p=0.2,
                                blur_kernel=5, erasing_p=0.25),
}


@dataclass
class FaceDataConfig:
    root: PathStr = "tests/data/face/train"  # identity folders: root/<identity>/<image>.jpg
    min_images: PosInt = 1  # train only on identities with at least this many images
    identities_from: PathStr = ""  # LFW pairs.txt: train only on identities of its folds `train_folds`
    train_folds: list[PosInt] = field(default_factory=list)  # 1-based folds of identities_from
    val_pairs: PathStr = "tests/data/face/val_pairs.csv"  # .csv or LFW pairs.txt ("" = no validation)
    val_root: PathStr = ""  # image root of the val pair paths ("" = the pair file's folder)
    val_folds: list[PosInt] = field(default_factory=list)  # LFW pairs.txt folds to validate on ([] = all)
    test_pairs: PathStr = ""  # eval_only: pairs to score -> predictions.csv (labelled: + test EER / TAR@FAR / acc at the
    # validation threshold); predict: -> predict/scores.csv
    test_root: PathStr = ""  # "" = the pair file's folder
    folds: NonNegInt = 0  # identity-disjoint k-fold over root: validate on pairs made from fold `fold`'s identities
    fold: NonNegInt = 0  # the held-out fold, 0..folds-1
    fold_pairs: PosInt = 600  # pairs per k-fold validation set (half same, half different person)
    image_size: PosInt = 112  # square input side (112 or 224 typical)
    resize: NonNegInt = 0  # > image_size: resize to this side, then crop image_size (random for train, centre for eval)
    center_crop: Annotated[float, Range(gt=0, le=1)] = 1.0  # keep this central fraction of the image before resizing (LFW 250 px: ~0.6)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # face convention: (x - 127.5) / 127.5
    std: tuple[PosFloat, PosFloat, PosFloat] = (0.5, 0.5, 0.5)
    sampler: Literal["shuffle", "pk"] = "shuffle"  # pk: P identities x K images per batch
    classes_per_batch: PosInt = 16  # P
    images_per_class: PosInt = 4  # K
    aug: FaceAugConfig = field(default_factory=FaceAugConfig)  # train augmentation (module docstring)
    auto_augment: str = ""  # timm: rand-m9-mstd0.5 | original | v0 | augmix-m5 ("" = off)
    mixup_alpha: NonNegFloat = 0.0  # timm MixUp (softmax loss only)
    cutmix_alpha: NonNegFloat = 0.0  # timm CutMix (softmax loss only)
    mix_prob: Frac = 1.0


# ----------------------------------------------------------------------------- identity folders
def scan_identities(root: str | Path, identities: set[str] | None = None,
                    min_images: int = 1) -> tuple[list[tuple[Path, int]], list[str]]:
    """[(image path, label)] and the sorted identity names (label = index) under root/<identity>/
    (only `identities` if given, and only those with >= `min_images` images)."""
    root = require_dir(root, "identity")
    names = sorted(d.name for d in root.iterdir() if d.is_dir())
    if identities is not None:
        missing = sorted(identities - set(names))
        if missing:
            raise DataError(f"{len(missing)} identities have no folder under {root} (e.g. {missing[0]})")
        names = [n for n in names if n in identities]
    samples, classes = [], []
    for name in names:
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMG_EXTS)
        if files and len(files) >= min_images:
            samples += [(p, len(classes)) for p in files]
            classes.append(name)
    if not samples:
        raise DataError(f"no images in identity folders under {root} (expected root/<identity>/<image>.jpg)")
    return samples, classes


class IdentityFolder(torch.utils.data.Dataset):
    accepts_epoch_keys = True  # make_loader's samplers hand (index, epoch) keys

    def __init__(self, root: str | Path, transform, identities: set[str] | None = None, seed: int = 0,
                 indices: list[int] | None = None, min_images: int = 1):
        samples, classes = scan_identities(root, identities, min_images)
        if indices is not None:  # subset (k-fold), labels re-numbered 0..K'-1
            samples = [samples[i] for i in indices]
            keep = sorted({lab for _, lab in samples})
            remap = {old: new for new, old in enumerate(keep)}
            classes = [classes[i] for i in keep]
            samples = [(p, remap[lab]) for p, lab in samples]
        self.samples, self.classes, self.transform, self.seed = samples, classes, transform, seed
        self.labels = np.array([lab for _, lab in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> dict:
        index, epoch = split_key(key)
        path, label = self.samples[index]
        img = Image.fromarray(read_image(path))
        return {"image": self.transform(img, sample_rng(self.seed, index, epoch)), "label": label}


class ImageList(torch.utils.data.Dataset):
    """Evaluation images (the unique images of a pair list), deterministic transform."""

    accepts_epoch_keys = True

    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key) -> dict:
        index, _ = split_key(key)
        img = Image.fromarray(read_image(self.paths[index]))
        return {"image": self.transform(img, np.random.default_rng(0)), "index": index}


# ----------------------------------------------------------------------------- P x K sampler
class PKSampler(torch.utils.data.Sampler):
    """(index, epoch) keys in blocks of P * K: P distinct identities x K images each.

    Use with DataLoader(batch_size=P * K, drop_last=True) and no batch_sampler: every batch is one
    whole P x K block. With `num_processes` = N, blocks come in groups of N that share no identity;
    accelerate gives process p the batches p, p + N, ..., i.e. the p-th block of each group, so the
    processes of one step see N * P different identities and never the same image.
    Per epoch (seeded by (seed, epoch)): each identity's images are shuffled and cut into chunks of
    K (an identity with fewer than K images is padded by re-drawing its own images; the incomplete
    last chunk of the others is dropped); each group takes one chunk from the N * P identities with
    the most chunks left (ties broken at random), so the number of batches is the same every epoch;
    groups are then shuffled.
    """

    def __init__(self, labels, classes_per_batch: int, images_per_class: int, num_processes: int = 1,
                 seed: int = 0):
        labels = np.asarray(labels)
        self.p, self.k, self.n_proc, self.seed, self.epoch = classes_per_batch, images_per_class, num_processes, seed, 0
        self.by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        group = self.p * self.n_proc
        if len(self.by_class) < group:
            raise DataError(f"P x K sampler needs {group} identities per step (data.classes_per_batch="
                            f"{self.p} x {self.n_proc} processes), the train set has {len(self.by_class)}")
        counts = np.array([max(len(ix) // self.k, 1) for ix in self.by_class])
        self.num_groups = 0
        while (counts > 0).sum() >= group:  # the same greedy as __iter__, on counts only
            counts[np.argsort(-counts, kind="stable")[:group]] -= 1
            self.num_groups += 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_groups * self.n_proc * self.p * self.k

    def blocks(self, epoch: int) -> list[np.ndarray]:
        """The epoch's batches: list of (P * K,) sample indices."""
        rng = np.random.default_rng([self.seed, epoch, 7])
        chunks = []
        for ix in self.by_class:
            perm = rng.permutation(ix)
            if len(perm) < self.k:
                perm = np.concatenate([perm, rng.choice(ix, self.k - len(perm))])
            chunks.append([perm[i:i + self.k] for i in range(0, len(perm) - self.k + 1, self.k)])
        left = np.array([len(c) for c in chunks])
        group, groups = self.p * self.n_proc, []
        for _ in range(self.num_groups):
            pick = np.lexsort((rng.random(len(left)), -left))[:group]  # most chunks left, random ties
            rng.shuffle(pick)
            left[pick] -= 1
            rows = [chunks[c][left[c]] for c in pick]  # (group, K)
            groups.append([np.concatenate(rows[i * self.p:(i + 1) * self.p]) for i in range(self.n_proc)])
        return [b for g in rng.permutation(len(groups)) for b in groups[g]]

    def __iter__(self):
        return iter([(int(i), self.epoch) for b in self.blocks(self.epoch) for i in b])


# ----------------------------------------------------------------------------- augmentation
@contextmanager
def _seeded(rng: np.random.Generator):
    """Seed python / numpy / torch-CPU global RNGs (what torchvision and timm transforms draw from) from
    `rng`, and restore them afterwards."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.random.default_generator.get_state()
    s = rng.integers(2**32, size=3)
    random.seed(int(s[0]))
    np.random.seed(int(s[1]))
    torch.random.default_generator.manual_seed(int(s[2]))
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.default_generator.set_state(th)


class CenterCropFraction:
    def __init__(self, frac: float):
        self.frac = frac

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.frac >= 1.0:
            return img
        w, h = img.size
        side = max(int(round(min(w, h) * self.frac)), 1)
        left, top = (w - side) // 2, (h - side) // 2
        return img.crop((left, top, left + side, top + side))


class FaceTransform:
    """PIL image + per-sample rng -> (3, S, S) normalised tensor."""

    def __init__(self, ops: list, train: bool):
        self.pipeline, self.train = T.Compose(ops), train

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        if not self.train:
            return self.pipeline(img)
        with _seeded(rng):
            return self.pipeline(img)


def build_transform(cfg: FaceDataConfig, train: bool) -> FaceTransform:
    s, a = cfg.image_size, cfg.aug
    if isinstance(a, str):  # a preset name (Python callers, e.g. bench/)
        a = AUG_PRESETS[a]
    ops: list = [CenterCropFraction(cfg.center_crop)]
    if cfg.resize > s:
        ops += [T.Resize((cfg.resize, cfg.resize), antialias=True), T.RandomCrop(s) if train else T.CenterCrop(s)]
    else:
        ops.append(T.Resize((s, s), antialias=True))
    post: list = []
    if train:
        if a.flip_p > 0:
            ops.append(T.RandomHorizontalFlip(a.flip_p))
        if a.jitter > 0:
            ops.append(T.RandomApply([T.ColorJitter(a.jitter, a.jitter, a.jitter, a.jitter_hue)], p=a.jitter_p))
        if a.rotation > 0:
            ops.append(T.RandomRotation(a.rotation))
        if a.translate > 0 or a.scale > 0 or a.shear > 0:
            ops.append(T.RandomAffine(0, translate=(a.translate, a.translate) if a.translate > 0 else None,
                                      scale=(1 - a.scale, 1 + a.scale) if a.scale > 0 else None,
                                      shear=a.shear if a.shear > 0 else None))
        if a.grayscale_p > 0:
            ops.append(T.RandomGrayscale(a.grayscale_p))
        if a.blur_kernel > 0:
            if a.blur_kernel % 2 == 0:
                raise DataError(f"data.aug.blur_kernel must be odd, got {a.blur_kernel}")
            ops.append(T.RandomApply([T.GaussianBlur(a.blur_kernel, a.blur_sigma)], p=a.blur_p))
        if a.erasing_p > 0:
            post.append(T.RandomErasing(p=a.erasing_p, scale=a.erasing_scale))
    if train and cfg.auto_augment:
        ops.append(_timm_auto_augment(cfg.auto_augment, s, cfg.mean))
    ops += [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)] + post
    return FaceTransform(ops, train)


def _timm_auto_augment(spec: str, size: int, mean) -> object:
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    hp = {"translate_const": int(size * 0.45), "img_mean": tuple(int(round(255 * m)) for m in mean)}
    try:
        if spec.startswith("rand"):
            return rand_augment_transform(spec, hp)
        if spec.startswith("augmix"):
            return augment_and_mix_transform(spec, hp)
        return auto_augment_transform(spec, hp)
    except (AssertionError, KeyError, ValueError) as e:
        raise DataError(f"data.auto_augment: bad timm augment string '{spec}' ({e})") from None


def build_mixup(cfg: FaceDataConfig, num_classes: int, label_smoothing: float):
    """timm Mixup/CutMix on (images, labels) -> (mixed images, soft targets), or None when off."""
    if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mix_prob,
                 label_smoothing=label_smoothing, num_classes=num_classes)


# ----------------------------------------------------------------------------- pair lists
Pair = tuple[int, Path, Path]  # (1 same / 0 different / -1 unknown, path_a, path_b)


def read_pairs(path: str | Path, root: str | Path = "", folds: list[int] | tuple = ()) -> list[Pair]:
    """Pairs from a CSV (`label,path_a,path_b` or `path_a,path_b`) or an LFW pairs.txt (`folds`: 1-based
    folds to keep, () = all). Relative paths are under `root` ("" = the pair file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pair list not found: {path}")
    root = Path(root) if root else path.parent
    if path.suffix.lower() == ".csv":
        if folds:
            raise DataError(f"{path}: folds select LFW pairs.txt folds; a CSV pair list has none")
        pairs = _read_csv_pairs(path, root)
    else:
        pairs = [(lab, a, b) for lab, a, b, _ in read_lfw_pairs(path, root, folds)]
    if not pairs:
        raise DataError(f"no pairs in {path}" + (f" for folds {list(folds)}" if folds else ""))
    missing = next((p for pair in pairs for p in pair[1:] if not p.is_file()), None)
    if missing is not None:
        raise DataError(f"{path}: image not found: {missing}")
    return pairs


def _read_csv_pairs(path: Path, root: Path) -> list[Pair]:
    pairs = []
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            row = [c.strip() for c in row]
            if not row or not any(row) or row[0].startswith("#"):
                continue
            if n == 1 and any(c.lower() in ("path_a", "path1", "image_a") for c in row):
                continue  # header
            if len(row) == 3:
                if row[0] not in ("0", "1"):
                    raise DataError(f"{path}:{n}: label must be 0 or 1, got '{row[0]}'")
                lab, a, b = int(row[0]), row[1], row[2]
            elif len(row) == 2:
                lab, a, b = -1, row[0], row[1]
            else:
                raise DataError(f"{path}:{n}: expected 'label,path_a,path_b' or 'path_a,path_b', got {len(row)} fields")
            pairs.append((lab, root / a, root / b))
    return pairs


def read_lfw_pairs(path: str | Path, root: str | Path,
                   folds: list[int] | tuple = ()) -> list[tuple[int, Path, Path, int]]:
    """LFW pairs.txt -> [(label, path_a, path_b, fold)] (fold 1-based)."""
    path, root = Path(path), Path(root)
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    if not lines or not all(x.isdigit() for x in lines[0]) or len(lines[0]) > 2:
        raise DataError(f"{path}: first line must be 'folds pairs_per_half' (LFW pairs.txt format)")
    n_folds, n = (int(lines[0][0]), int(lines[0][1])) if len(lines[0]) == 2 else (1, int(lines[0][0]))
    body = lines[1:]
    if len(body) != 2 * n * n_folds:
        raise DataError(f"{path}: header says {n_folds} folds x {2 * n} pairs, found {len(body)} pair lines")
    bad = [f for f in folds if not 1 <= f <= n_folds]
    if bad:
        raise DataError(f"{path}: fold {bad[0]} out of range 1..{n_folds}")
    img = lambda name, i: root / name / f"{name}_{int(i):04d}.jpg"  # noqa: E731
    out = []
    for k, fields in enumerate(body):
        fold = k // (2 * n) + 1
        if folds and fold not in folds:
            continue
        try:
            if len(fields) == 3:
                out.append((1, img(fields[0], fields[1]), img(fields[0], fields[2]), fold))
            elif len(fields) == 4:
                out.append((0, img(fields[0], fields[1]), img(fields[2], fields[3]), fold))
            else:
                raise ValueError
        except ValueError:
            raise DataError(f"{path}:{k + 2}: expected 'name i j' or 'name1 i name2 j'") from None
    return out


def lfw_identities(path: str | Path, folds: list[int] | tuple = ()) -> set[str]:
    """Identity names appearing in the given folds of an LFW pairs.txt."""
    return {p.parent.name for _, a, b, _ in read_lfw_pairs(path, "", folds) for p in (a, b)}


def make_pairs(labels, n_pairs: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """Deterministic verification pairs (label, i, j) over sample indices: about half same-identity
    (identities with >= 2 images), half different-identity."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 99])
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    multi = [ix for ix in by_class if len(ix) >= 2]
    if not multi or len(by_class) < 2:
        raise DataError("validation identities need >= 2 identities and one with >= 2 images to make pairs")
    pairs = set()
    for _ in range(20 * n_pairs):
        if len(pairs) >= n_pairs:
            break
        if len(pairs) % 2 == 0:
            i, j = rng.choice(multi[rng.integers(len(multi))], 2, replace=False)
        else:
            a, b = rng.choice(len(by_class), 2, replace=False)
            i, j = rng.choice(by_class[a]), rng.choice(by_class[b])
        pairs.add((int(labels[i] == labels[j]), int(min(i, j)), int(max(i, j))))
    return sorted(pairs, key=lambda p: (p[1], p[2]))
