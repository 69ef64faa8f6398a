"""Helpers for bench/ scripts: timed training steps, JSON output. Not imported by training code.

    res = time_train_step(step_fn, batch_size, warmup=5, iters=20, device=device)
    print_json({"model": "...", "ours": res_ours, "reference": res_ref, "speedup": ...})
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: a shape/flow check that runs on CPU in seconds")
    p.add_argument("--batch-size", type=int, default=0, help="0 = script default")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_train_step(step_fn, batch_size: int, device: torch.device, warmup: int = 5, iters: int = 20,
                    flops_per_step: float | None = None, peak_tflops: float | None = None) -> dict:
    """Run `step_fn()` warmup + iters times; img/s, step time, peak memory, TFLOP/s and MFU if FLOPs known."""
    for _ in range(warmup):
        step_fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step_fn()
    sync(device)
    dt = (time.perf_counter() - t0) / iters
    out = {"img_per_s": round(batch_size / dt, 2), "step_ms": round(dt * 1000, 3)}
    if device.type == "cuda":
        out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    if flops_per_step:
        out["tflops"] = round(flops_per_step / dt / 1e12, 2)
        if peak_tflops:
            out["mfu"] = round(flops_per_step / dt / 1e12 / peak_tflops, 4)
    return out


def count_train_flops(step_fn) -> float:
    """FLOPs of one forward+backward (torch.utils.flop_counter), run once."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step_fn()
    return float(fc.get_total_flops())


def peak_bf16_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of known GPUs (for MFU); None if unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "4090": 165.0}.items():
        if key in name:
            return val
    return None


def environment(device: torch.device) -> dict:
    return {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def dataset_ips(ds, n: int) -> float:
    """Samples/s of ds[(i, epoch)] in one process (decode + augment): the data pipeline per worker."""
    t0 = time.perf_counter()
    for i in range(n):
        ds[(i % len(ds), i // len(ds))]
    return round(n / (time.perf_counter() - t0), 2)


def print_json(obj: dict) -> None:
    print(json.dumps(obj, indent=1))
