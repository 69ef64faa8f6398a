"""Every bench/*_throughput.py runs in --tiny mode on CPU and prints JSON (shape/flow check, no speed asserts);
the interleaved comparison gives a ratio near 1 for two identical models even on this loaded box."""

import json
import subprocess
import sys

import pytest
import torch

from bench.common import compare, ratio
from tests.conftest import ROOT

SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*_throughput.py"))


def test_there_are_bench_scripts():
    assert "seg_throughput.py" in SCRIPTS


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_tiny_on_cpu(script):
    r = subprocess.run([sys.executable, f"bench/{script}", "--device", "cpu", "--tiny"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout[r.stdout.index("{"):])
    text = json.dumps(out)
    assert "img_per_s" in text
    assert all(v > 0 for v in _find(out, "img_per_s"))
    ratios = [v for row in out["results"] for k, v in row.items() if "_vs_" in k]
    assert ratios and all(r["min"] <= r["median"] <= r["max"] and r["min"] > 0 for r in ratios)


def _step(model, x):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def test_identical_models_compare_near_one():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    nn = torch.nn
    nets = [nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    res = compare({"a": _step(nets[0], x), "b": _step(nets[1], x)}, 8, torch.device("cpu"), rounds=15, warmup=3, iters=16)  # blocks of ~0.1 s: scheduler noise averages out
    r = ratio(res, "a", "b")
    assert 0.8 <= r["median"] <= 1.25, r
    a = res["a"]
    assert len(a["rounds"]) == 15 and a["img_per_s_min"] <= a["img_per_s"] <= a["img_per_s_max"]


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


@pytest.mark.slow
def test_report_tiny_writes_json_and_markdown(tmp_path):
    r = subprocess.run([sys.executable, "bench/report.py", "--device", "cpu", "--tiny", "--tasks", "seg", "--out",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (js,), (md,) = tmp_path.glob("*-cpu.json"), tmp_path.glob("*-cpu.md")
    rep = json.loads(js.read_text())
    row = rep["benches"]["seg"]["results"][0]
    assert row["ours_vs_hf"]["min"] <= row["ours_vs_hf"]["median"] <= row["ours_vs_hf"]["max"]
    assert rep["benches"]["seg"]["data_img_per_s"]["cpu_path"] > 0
    run = rep["recipes"]["seg"]
    assert "error" not in run and run["steps"] == 2 and run["best_metric"] in run["final_metrics"]
    text = md.read_text()
    assert "| seg | b0 (ours vs hf) |" in text and f"{row['ours_vs_hf']['median']:.2f}x" in text
