"""Inputs of `predict=PATH` runs: one image, a folder of images, or a glob pattern."""

from __future__ import annotations

import glob
from pathlib import Path

from lib.errors import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_inputs(spec: str) -> list[Path]:
    """Sorted image paths named by `spec` (a file, a folder (not recursive) or a glob); an error if none."""
    if not spec:
        raise DataError("predict: empty path")
    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTS and q.is_file())
        if not found:
            raise DataError(f"predict: no images ({', '.join(IMAGE_EXTS)}) in folder {p}")
        return found
    if any(c in spec for c in "*?["):
        found = sorted(Path(q) for q in glob.glob(spec, recursive=True)
                       if Path(q).suffix.lower() in IMAGE_EXTS and Path(q).is_file())
        if not found:
            raise DataError(f"predict: no images match {spec}")
        return found
    raise DataError(f"predict: {spec} is not an image, a folder or a glob pattern")


def shard(items: list, rank: int, world: int) -> list:
    """This process's share of `items` (every world-th item from rank): N processes predict disjoint parts."""
    return items[rank::world]
