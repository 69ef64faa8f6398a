"""Data pieces shared by the tasks: deterministic epoch sampler, per-sample RNG, safe image reading.

Reproducibility contract: a training sample's augmentation depends only on (seed, epoch, index),
never on worker count, process count or resume point. `EpochSampler` yields `(index, epoch)`
keys; datasets call `sample_rng(seed, key)` in `__getitem__`. Resuming at step k then sees
exactly the batches (and augmentations) an uninterrupted run sees.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image  # at import: forked loader workers inherit it

from lib.errors import DataError  # noqa: F401  (re-exported: lib.data.common.DataError)


class EpochSampler(torch.utils.data.Sampler):
    """Yields (index, epoch): a permutation seeded by (seed, epoch) when shuffling, else 0..n-1.

    accelerate shards its batches over processes (process p takes batches p, p+N, ...), so an
    N-process run sees the same global batches as one process with an N times larger batch.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle else range(self.n)
        return iter([(int(i), self.epoch) for i in order])


def split_key(key) -> tuple[int, int]:
    """(index, epoch) from a sampler key; a plain int index means epoch 0."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), 0


def sample_rng(seed: int, index: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def require_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{what} folder not found: {path}")
    return path


_PNG_MAGIC, _JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


def _fast_decode(data: bytes, mode: str) -> np.ndarray | None:
    """torchvision.io (libjpeg-turbo / libpng) decode of 8-bit JPEG / PNG; None = let PIL do it
    (other formats, palette or 16-bit label PNGs, grey 'L' conversion, decoder errors)."""
    is_png, is_jpeg = data[:8] == _PNG_MAGIC, data[:3] == _JPEG_MAGIC
    if not (is_png or is_jpeg) or mode not in ("RGB", "label") or len(data) < 33:
        return None
    if mode == "label" and not (is_png and data[24] == 8 and data[25] in (0, 2)):
        return None  # labels: only 8-bit grey / RGB PNG (palette PNGs must keep their indices)
    try:
        t = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                         ImageReadMode.RGB if mode == "RGB" else ImageReadMode.UNCHANGED)
    except RuntimeError:
        return None  # PIL decides whether it is corrupt (and words the error)
    if t.dtype != torch.uint8:
        return None
    if mode == "label":
        return t[0].numpy()  # grey, or RGB with equal channels
    return t.permute(1, 2, 0).contiguous().numpy()


def decode_image_bytes(data: bytes, name: str | Path, mode: str = "RGB") -> np.ndarray:
    """Like `read_image` on a file's bytes (e.g. a tar shard member); `name` is used in errors."""
    arr = _fast_decode(data, mode)
    if arr is not None:
        return arr
    try:
        with Image.open(io.BytesIO(data)) as im:
            if mode == "label":
                arr = np.array(im)
                if arr.ndim == 3:  # label saved as RGB with equal channels
                    arr = arr[..., 0]
                return arr
            return np.array(im.convert(mode))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt or unreadable image {name}: {e}") from None


def read_image(path: str | Path, mode: str = "RGB") -> np.ndarray:
    """(H, W, 3) uint8 for RGB, (H, W) for 'L'/'label' maps; DataError names a missing/corrupt file.

    JPEG / PNG go through torchvision.io's decoders (libjpeg-turbo, libpng: about 2x PIL's speed);
    other formats, palette / 16-bit label PNGs and 'L' conversion through PIL, with the same result."""
    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise DataError(f"image not found: {path}") from None
    return decode_image_bytes(data, path, mode)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def denormalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) uint8 image (for overlays)."""
    x = image.float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def to_tensor_normalized(img: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float normalised."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous().float().div_(255)  # (3, H, W)
    return x.sub_(torch.tensor(mean)[:, None, None]).div_(torch.tensor(std)[:, None, None])


def kfold_indices(n: int, k: int, fold: int, seed: int = 0, groups: list | None = None) -> tuple[list[int], list[int]]:
    """(train, val) indices of fold `fold` of `k`. With `groups` (e.g. identities), folds are
    group-disjoint: every sample of a group falls in the same fold. Folds cover all samples once."""
    if not 0 <= fold < k:
        raise ValueError(f"fold {fold} out of range for k={k}")
    rng = np.random.default_rng(seed)
    if groups is None:
        order = rng.permutation(n)
        val = set(order[fold::k].tolist())
    else:
        uniq = sorted(set(groups), key=str)
        perm = rng.permutation(len(uniq))
        val_groups = {uniq[i] for i in perm[fold::k]}
        val = {i for i, g in enumerate(groups) if g in val_groups}
    return [i for i in range(n) if i not in val], sorted(val)


def make_loader(dataset, batch_size: int, *, shuffle: bool, seed: int = 0, num_workers: int = 0,
                pin_memory: bool = False, drop_last: bool = False, sampler=None, collate_fn=None):
    """DataLoader over an EpochSampler (or `sampler`), with its own torch.Generator: iterating it
    never draws from the global RNG, so a resumed run's dropout / drop-path draws match.

    Dataset contract: the sampler hands `dataset[key]` an `(index, epoch)` tuple, not an int.
    A dataset declares it takes such keys with the class attribute `accepts_epoch_keys = True`
    and calls `split_key(key)` / `sample_rng(seed, index, epoch)` in `__getitem__`; any other
    dataset is refused here with a DataError (it would otherwise index with a tuple).
    """
    if not getattr(dataset, "accepts_epoch_keys", False):
        raise DataError(f"{type(dataset).__name__} takes plain indices, but make_loader's sampler hands "
                        f"(index, epoch) keys: set `accepts_epoch_keys = True` on it and read the key "
                        f"with lib.data.common.split_key")
    return torch.utils.data.DataLoader(
        dataset, batch_size, sampler=sampler or EpochSampler(len(dataset), shuffle, seed), drop_last=drop_last,
        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
        generator=torch.Generator(), collate_fn=collate_fn)
