"""Every bench/*_throughput.py runs in --tiny mode on CPU and prints JSON (shape/flow check, no timing asserts)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*_throughput.py"))


def test_there_are_bench_scripts():
    assert "seg_throughput.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_tiny_on_cpu(script):
    r = subprocess.run([sys.executable, f"bench/{script}", "--device", "cpu", "--tiny"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout[r.stdout.index("{"):])
    text = json.dumps(out)
    assert "img_per_s" in text
    assert all(v > 0 for v in _find(out, "img_per_s"))


def _find(obj, key):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            else:
                yield from _find(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _find(v, key)
