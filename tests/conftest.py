"""Shared test helpers: paths, the shared real data (tests skip when absent), tiny seg overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
os.environ.setdefault("OMP_NUM_THREADS", "2")


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data; skips the calling test when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not available: {p}")
    return p


@pytest.fixture
def root() -> Path:
    return ROOT
