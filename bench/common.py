"""Helpers for bench/ scripts: interleaved timing of the compared models, JSON output.
Not imported by training code.

    res = compare({"ours": step_ours, "hf": step_hf}, batch_size, device, rounds=5, iters=10)
    res["ours"]["img_per_s"]            # median over rounds (+ _min / _max)
    ratio(res, "ours", "hf")            # {"median", "min", "max"} of the per-round ratios
    print_json({"model": "...", **res, "ours_vs_hf": ratio(res, "ours", "hf")})

Why interleaved: on a shared machine (2 CPU cores, or a GPU other jobs touch) the speed drifts
over seconds. Each round times every model back to back (A B, then B A, ...), so a round's ratio
compares neighbours in time; the median over rounds, with its min-max, holds under load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: a shape/flow check that runs on CPU in seconds")
    p.add_argument("--batch-size", type=int, default=0, help="0 = script default")
    p.add_argument("--iters", type=int, default=10, help="steps per model per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (A B, B A, ...); ratios are medians")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(steps: dict, batch_size: int, device: torch.device, rounds: int = 5, warmup: int = 3, iters: int = 10,
            flops: dict | None = None, peak_tflops: float | None = None) -> dict:
    """Time each `steps[name]()` (one training step) for `iters` steps per round, the models
    interleaved and the order reversed every other round. Per model: img/s and step ms as the
    median over rounds with min / max, per-round img/s, peak memory of its steps (GPU), TFLOP/s and
    MFU when `flops[name]` (FLOPs per step) is given."""
    names = list(steps)
    out = {n: {} for n in names}
    for n in names:  # warm up (and compile) each, and measure its step memory
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            steps[n]()
        sync(device)
        if device.type == "cuda":
            out[n]["peak_mem_gb"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**30, 3)
    per_round = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                steps[n]()
            sync(device)
            per_round[n].append(batch_size * iters / (time.perf_counter() - t0))
    for n in names:
        ips = sorted(per_round[n])
        med = statistics.median(ips)
        out[n].update(img_per_s=round(med, 2), img_per_s_min=round(ips[0], 2), img_per_s_max=round(ips[-1], 2),
                      step_ms=round(1000 * batch_size / med, 3), rounds=[round(v, 2) for v in per_round[n]])
        if flops and flops.get(n):
            out[n]["tflops"] = round(flops[n] * med / batch_size / 1e12, 2)
            if peak_tflops:
                out[n]["mfu"] = round(flops[n] * med / batch_size / 1e12 / peak_tflops, 4)
    return out


def ratio(res: dict, a: str, b: str) -> dict:
    """Speed of `a` over `b` (img/s ratio): median, min, max over the rounds of `compare`."""
    rs = sorted(x / y for x, y in zip(res[a]["rounds"], res[b]["rounds"]))
    return {"median": round(statistics.median(rs), 3), "min": round(rs[0], 3), "max": round(rs[-1], 3)}


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


def dataset_step(ds):
    """A `compare` step that reads the next sample ds[(i, epoch)] (i = 0, 1, ... over epochs): datasets
    timed against each other read the same key sequence."""
    keys = iter((i % len(ds), i // len(ds)) for i in range(10**9))
    return lambda: ds[next(keys)]


def aug_paths_ips(paths: dict, collate, batch_fn, batch: int, device: torch.device, rounds: int, n: int) -> dict:
    """Data pipeline of a task with `data.aug_device`: img/s per worker of the train dataset in "cpu" and
    "device" mode (interleaved rounds, the same (index, epoch) keys for both), and img/s of the batched
    device half `batch_fn(collated batch)` on `device`. paths: {"cpu": dataset, "device": dataset}."""

    names = {"cpu_path": "cpu", "device_path_worker": "device"}
    res = compare({k: dataset_step(paths[m]) for k, m in names.items()}, 1, torch.device("cpu"), rounds, 2, n)
    keep = ("img_per_s", "img_per_s_min", "img_per_s_max")
    detail = {k: {x: res[k][x] for x in keep} for k in names}
    detail["device_path_worker_vs_cpu_path"] = ratio(res, "device_path_worker", "cpu_path")
    dev = paths["device"]
    items = collate([dev[(i % len(dev), i // len(dev))] for i in range(batch)])
    items = {k: v.to(device) for k, v in items.items()}
    res = compare({"crop": lambda: batch_fn(items)}, batch, device, rounds=rounds, warmup=1, iters=2)
    detail[f"device_aug_on_{device.type}"] = {"batch": batch, **{x: res["crop"][x] for x in keep}}
    return detail
