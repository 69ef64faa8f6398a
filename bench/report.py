"""One benchmark report: every bench/*_throughput.py plus a short real-data run of each task's recipe.

    python bench/report.py                      # GPU: benches at full size, eager + compiled, bf16;
                                                # 300 steps of each recipe on ../shared/data (< 8 min on one GPU)
    python bench/report.py --device cpu         # CPU-sized version (a few minutes on 2 cores)
    python bench/report.py --device cpu --tiny --tasks seg   # seconds-scale flow check (tests run this)
Writes bench/results/<date>-<device>.json (every bench's JSON, each run's wall time, img/s and final
metrics) and the same as a markdown table, <date>-<device>.md, for README's "Benchmarks" section.
Each bench runs in its own process; one that fails is recorded with its last error line and the
report goes on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("seg", "face", "pose", "hand")
# bench arguments per task: GPU (full size, the settings), CPU (small but real sizes), tiny (flow check)
BENCH_ARGS = {
    "gpu": {"seg": ["--variants", "b0", "b2", "--size", "512", "--batch-size", "16", "--compile"],
            "face": ["--models", "resnet18", "tinyvit11m", "--compile"],
            "pose": ["--compile"],
            "hand": ["--compile"]},
    "cpu": {"seg": ["--variants", "b0", "--size", "256", "--batch-size", "4"],
            "face": ["--models", "resnet18", "--batch-size", "8"],
            "pose": ["--preset", "t", "--batch-size", "4"],
            "hand": ["--backbone", "vit_small_patch14_dinov2", "--size", "112", "--batch-size", "4"]},
    "tiny": {t: ["--tiny"] for t in TASKS},
}
CPU_COMMON = ["--precision", "fp32", "--rounds", "5", "--iters", "2", "--warmup", "1"]  # CPU bf16 autocast is slow
# the real recipe of each task (config, overrides); GPU: 300 steps; CPU: a few steps of the same recipe
RECIPES = {
    "seg": ("configs/seg/camvid_b0.yaml", ["data.aug_device=device"]),
    "face": ("configs/face/lfw.yaml", []),
    "pose": ("configs/pose/coco_mini.yaml", []),
    "hand": ("configs/hand/hand3d_vits.yaml", []),
}
CPU_RECIPE = ["train.batch_size=2", "train.num_workers=1"]  # plus the step count below
CPU_RECIPE_TASK = {"seg": ["data.scale=[480,360]", "data.crop_size=[256,256]"]}  # CamVid eval at 960x720: minutes
TINY_RECIPES = {t: (f"configs/{t}/sample.yaml", []) for t in TASKS}


def run_bench(task: str, args: list[str], device: str, data: Path, timeout: int) -> dict:
    cmd = [sys.executable, f"bench/{task}_throughput.py", "--device", device, *args]
    if task == "seg" and (data / "camvid").is_dir():
        cmd += ["--data-root", str(data / "camvid")]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"cmd": " ".join(cmd[1:]), "error": f"timed out after {timeout} s"}
    out = {"cmd": " ".join(cmd[1:]), "wall_s": round(time.perf_counter() - t0, 1)}
    if r.returncode:
        return {**out, "error": (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1]}
    return {**out, **json.loads(r.stdout[r.stdout.index("{"):])}


def run_recipe(task: str, config: str, overrides: list[str], steps: int, out_dir: Path, timeout: int) -> dict:
    run_dir = out_dir / task
    cmd = [sys.executable, f"train_{task}.py", "--config", config, *overrides, f"train.total_steps={steps}",
           f"train.eval_interval={steps}", f"train.ckpt_interval={steps}", f"train.log_interval={max(steps // 10, 1)}",
           "train.unit=step", f"output_dir={run_dir}", "overwrite=true", "tracker=none"]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"cmd": " ".join(cmd[1:]), "error": f"timed out after {timeout} s"}
    out = {"cmd": " ".join(cmd[1:]), "steps": steps, "wall_s": round(time.perf_counter() - t0, 1)}
    if r.returncode:
        return {**out, "error": (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1]}
    logs = [json.loads(line) for line in (run_dir / "train.jsonl").read_text().splitlines() if line.strip()]
    ips = [rec["img/s"] for rec in logs[1:] or logs if "img/s" in rec]
    out["img_per_s_median"] = round(statistics.median(ips), 2) if ips else None
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out["final_metrics"] = metrics[-1] if metrics else {}
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    out["best_metric"] = (cfg.get("train") or {}).get("best_metric")
    return out


def _fmt_ratio(r: dict) -> str:
    return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"


def markdown(report: dict) -> str:
    lines = [f"Benchmarks: {report['device']}, torch {report['torch']}, {report['date']} "
             f"(`python bench/report.py {' '.join(report['argv'])}`, {report['wall_s']:.0f} s).", "",
             "Train-step speed, ours vs the reference at the same settings: median ratio over interleaved rounds "
             "(min-max), and ours' img/s (median).", "",
             "| task | model | batch x size | precision | ratio | ours img/s | reference img/s |",
             "|---|---|---|---|---|---|---|"]
    for task, res in report["benches"].items():
        if "error" in res:
            lines.append(f"| {task} | error: {res['error'][:80]} | | | | | |")
            continue
        for row in res["results"]:
            model = row.get("variant") or row.get("model") or row.get("preset") or row.get("backbone")
            for key, r in row.items():
                if "_vs_" not in key:
                    continue
                a, b = key.split("_vs_")
                lines.append(f"| {task} | {model} ({a} vs {b}) | {row['batch']} x {row['size']} | {row['precision']} | "
                             f"{_fmt_ratio(r)} | {row[a]['img_per_s']:.1f} | {row[b]['img_per_s']:.1f} |")
    lines += ["", "Data pipeline, img/s per loader worker (one process, decode + augment):", "",
              "| task | img/s per worker |", "|---|---|"]
    for task, res in report["benches"].items():
        d = res.get("data_img_per_s", res.get("data_pipeline_img_per_s_per_worker"))
        if isinstance(d, dict):
            d = ", ".join(f"{k} {v:.1f}" for k, v in d.items())
        lines.append(f"| {task} | {d if d is not None else 'n/a'} |")
    lines += ["", "Short real-data runs of each task's recipe:", "",
              "| task | command | steps | wall s | img/s (median) | final metric |", "|---|---|---|---|---|---|"]
    for task, res in report["recipes"].items():
        if "error" in res:
            lines.append(f"| {task} | `{res['cmd']}` | | | | error: {res['error'][:80]} |")
            continue
        m = res["final_metrics"]
        key = res["best_metric"]
        metric = f"{key} {m[key]:.4g}" if key in m and isinstance(m[key], (int, float)) else json.dumps(m)[:60]
        lines.append(f"| {task} | `{res['cmd']}` | {res['steps']} | {res['wall_s']:.0f} | {res['img_per_s_median']} | "
                     f"{metric} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="seconds-scale flow check: --tiny benches, 2 sample steps")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--steps", type=int, default=0, help="recipe steps (0 = 300 on GPU, 10 on CPU, 2 with --tiny)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--no-recipes", action="store_true", help="benches only")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    kind = "tiny" if args.tiny else ("gpu" if args.device.startswith("cuda") else "cpu")
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev).replace(" ", "_") if dev.type == "cuda" else "cpu"
    date = datetime.date.today().isoformat()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"date": date, "device": name, "torch": torch.__version__,
              "argv": argv if argv is not None else sys.argv[1:],
              "benches": {}, "recipes": {}}
    data = Path(args.data)
    for task in args.tasks:
        print(f"bench {task} ...", flush=True)
        extra = CPU_COMMON if kind == "cpu" else []
        report["benches"][task] = run_bench(task, BENCH_ARGS[kind][task] + extra, args.device, data, timeout=900)
    steps = args.steps or {"gpu": 300, "cpu": 10, "tiny": 2}[kind]
    for task in [] if args.no_recipes else args.tasks:
        config, overrides = (TINY_RECIPES if args.tiny else RECIPES)[task]
        if kind != "gpu":
            overrides = [o for o in overrides if not o.startswith("data.aug_device")] + \
                        ([] if args.tiny else CPU_RECIPE + CPU_RECIPE_TASK.get(task, []))
        print(f"recipe {task} ({steps} steps) ...", flush=True)
        report["recipes"][task] = run_recipe(task, config, overrides, steps, ROOT / "runs" / "bench_report" / name,
                                             timeout=1800)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    stem = out_dir / f"{date}-{name}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json and {stem}.md")
    return report


if __name__ == "__main__":
    main()
