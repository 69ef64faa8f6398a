"""Run folders without Optuna: launching a training script as a watched subprocess, pools of
runs, reading their results (config.yaml + metrics.jsonl), report / mean-std / compare tables.

A run is always a normal run of a training script in its own folder:
    python train_X.py --config BASE.yaml key=value ... output_dir=RUN_DIR
whose RUN_DIR/metrics.jsonl (one JSON object per evaluation) is read while it runs. The key metric
and its direction of a run are its own train.best_metric / train.best_mode (RUN_DIR/config.yaml).
This module adds RUN_DIR/console.log (the script's stdout+stderr) and RUN_DIR/sweep_run.json
(command, exit code, status, error line, duration).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from lib.config import ConfigError, build_config, flatten, load_yaml

HOST = socket.gethostname()


def say(msg: str) -> None:
    print(msg, flush=True)


class SweepError(ValueError):
    """Bad sweep file / arguments / run folder: sweep.py prints it as one line (no torch import needed)."""


def override(key: str, value: Any) -> str:
    """key=value as the training scripts parse it (YAML): strings raw, the rest as JSON."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


# ----------------------------------------------------------------------------- commands
def launcher_cmd(launcher: str) -> list[str]:
    """`python` -> this interpreter; `accelerate launch ...` gets a free --main_process_port so that
    several multi-process trials can run side by side on one machine."""
    parts = shlex.split(launcher) if launcher else ["python"]
    if parts[0] in ("python", "python3"):
        parts[0] = sys.executable
    if parts[:2] == ["accelerate", "launch"] and not any(p.startswith("--main_process_port") for p in parts):
        with socket.socket() as s:
            s.bind(("", 0))
            parts += ["--main_process_port", str(s.getsockname()[1])]
    return parts


def script_cmd(launcher: str, script: str, config: str, overrides: list[str], run_dir: str | Path) -> list[str]:
    return [*launcher_cmd(launcher), script, "--config", config, *overrides, f"output_dir={run_dir}"]


def ensemble_overrides(checkpoints: list[str | Path]) -> list[str]:
    return ["eval_only=true", "ensemble=" + json.dumps([str(c) for c in checkpoints])]


def best_checkpoint(run_dir: str | Path) -> Path:
    path = Path(run_dir) / "checkpoints" / "best"
    if not (path / "model.safetensors").is_file():
        raise SweepError(f"no best checkpoint in {run_dir} (expected {path}/model.safetensors)")
    return path


def split_gpus(gpus: list[int], workers: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each worker: the GPU list cut into `workers` consecutive chunks."""
    if not gpus:
        return [None] * workers
    if len(gpus) < workers:
        raise SweepError(f"{workers} workers need at least as many GPUs, got {gpus}")
    k = len(gpus) // workers
    return [",".join(str(g) for g in gpus[i * k:(i + 1) * k]) for i in range(workers)]


def worker_env(gpus: str | None, workers: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:  # CPU runs side by side share the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    return env


# ----------------------------------------------------------------------------- one watched run
class MetricsTail:
    """New complete records of a growing metrics.jsonl (a half-written last line waits)."""

    def __init__(self, run_dir: str | Path):
        self.path, self.offset = Path(run_dir) / "metrics.jsonl", 0

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [json.loads(line) for line in data[:end].decode().splitlines() if line.strip()]


def error_line(log: Path) -> str:
    """The line that says why a run failed: the last `error:` line, else the last line."""
    if not log.is_file():
        return ""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "error" in ln.lower():
            return ln[:300]
    return lines[-1][:300] if lines else ""


def kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the run's process group (accelerate's children too), SIGKILL after `grace_s`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def run_watched(cmd: list[str], run_dir: str | Path, env: dict | None = None,
                on_record: Callable[[dict, bool], str | None] | None = None,
                on_tick: Callable[[subprocess.Popen], None] | None = None,
                poll_s: float = 2.0, timeout_s: float = 0.0) -> dict:
    """Run `cmd` (a training script writing into run_dir), feed each new metrics record to
    `on_record(record, running)`; a non-empty return while the run is alive stops it (the reason
    becomes the status). Returns and writes run_dir/sweep_run.json:
    {cmd, rc, status: ok|failed|<stop reason>|timeout|interrupted, error, seconds, host, pid}."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tail, t0, reason = MetricsTail(run_dir), time.time(), None
    with open(run_dir / "console.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while True:
                rc = proc.poll()
                for rec in tail.read():
                    r = on_record(rec, rc is None) if on_record else None
                    if r and rc is None and reason is None:
                        reason = r
                if reason is None and rc is None and timeout_s and time.time() - t0 > timeout_s:
                    reason = "timeout"
                if reason is not None or rc is not None:
                    break
                if on_tick:
                    on_tick(proc)
                time.sleep(poll_s)
        except BaseException:  # Ctrl-C / worker killed: never leave an orphan training run
            kill_group(proc)
            _write_run_json(run_dir, cmd, proc.returncode, "interrupted", "interrupted", t0, proc.pid)
            raise
        kill_group(proc)
    rc = proc.returncode
    status = reason or ("ok" if rc == 0 else "failed")
    err = "" if status == "ok" else status if status != "failed" else \
        f"killed by {signal.Signals(-rc).name}" + (" (out of memory?)" if rc == -9 else "") if rc < 0 else \
        error_line(run_dir / "console.log")
    return _write_run_json(run_dir, cmd, rc, status, err, t0, proc.pid)


def _write_run_json(run_dir: Path, cmd, rc, status, err, t0, pid) -> dict:
    info = {"cmd": cmd, "rc": rc, "status": status, "error": err, "seconds": round(time.time() - t0, 2),
            "host": HOST, "pid": pid}
    (run_dir / "sweep_run.json").write_text(json.dumps(info, indent=1))
    return info


def run_status(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "sweep_run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def keep_old_attempt(run_dir: Path) -> None:
    """A non-empty run folder from an earlier attempt moves to <run_dir>.attempt<N> (metrics.jsonl
    is appended to, so a fresh run must not start in it)."""
    run_dir = Path(run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        n = 1 + sum(1 for _ in run_dir.parent.glob(run_dir.name + ".attempt*"))
        os.replace(run_dir, run_dir.with_name(f"{run_dir.name}.attempt{n}"))


def run_pool(jobs: list[tuple[list[str], Path]], workers: int = 1, gpus: list[int] = (),
             log: Callable[[str], None] = print) -> list[dict]:
    """Run (cmd, run_dir) jobs, `workers` at a time, each worker on its own slice of `gpus`.
    A folder left by an earlier attempt is kept as <run_dir>.attempt<N>. Ctrl-C stops every run."""
    workers = max(1, min(workers, len(jobs)))
    slots = split_gpus(list(gpus), workers)
    free, lock, stop = list(range(workers)), threading.Lock(), threading.Event()

    def check_stop(_proc=None):
        if stop.is_set():
            raise KeyboardInterrupt("stopped")

    def one(job):
        check_stop()
        cmd, run_dir = job
        keep_old_attempt(run_dir)
        with lock:
            slot = free.pop()
        try:
            log(f"start {run_dir}: {shlex.join(cmd)}")
            info = run_watched(cmd, run_dir, worker_env(slots[slot], workers), on_tick=check_stop, poll_s=1.0)
            log(f"{info['status']:>6} {run_dir} ({info['seconds']:.0f}s)  {info['error']}")
            return info
        finally:
            with lock:
                free.append(slot)

    with ThreadPoolExecutor(workers) as ex:
        futures = [ex.submit(one, job) for job in jobs]
        try:
            return [f.result() for f in futures]
        except BaseException:
            stop.set()  # the other threads stop their runs at their next poll
            raise


# ----------------------------------------------------------------------------- results of run folders


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summarize_run(run_dir: str | Path, metric: str = "", mode: str = "") -> dict:
    """Best and final evaluation of a run. Key metric / mode default to the run's own
    train.best_metric / train.best_mode (its config.yaml); an empty best_metric means the first
    metric of the first evaluation, as in the scripts."""
    from lib.logging import read_metrics  # (lib.logging imports torch: only when results are read)

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    cfg = (yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.is_file() else {}
    train = cfg.get("train", {}) if isinstance(cfg.get("train"), dict) else {}
    recs = [r for r in read_metrics(run_dir) if isinstance(r, dict)]
    if not metric:
        metric = train.get("best_metric") or next(
            (k for r in recs[:1] for k, v in r.items() if is_number(v) and k not in ("step", "epoch")), "")
    mode = mode or train.get("best_mode") or "max"
    evals = [r for r in recs if is_number(r.get(metric))]
    out = {"run": str(run_dir), "config": cfg, "metric": metric, "mode": mode, "records": len(recs),
           "status": run_status(run_dir).get("status", ""), "best": {}, "final": {}, "curve": []}
    if evals:
        pick = max if mode == "max" else min
        best = pick(evals, key=lambda r: r[metric])  # first of equal values: the earliest step
        out["best"] = {k: v for k, v in best.items() if is_number(v)}
        out["final"] = {k: v for k, v in evals[-1].items() if is_number(v)}
        out["curve"] = [(r.get("step", i + 1), r[metric]) for i, r in enumerate(evals)]
    return out


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders (holding config.yaml or metrics.jsonl) given directly or found below the paths."""
    out = []
    for p in map(Path, paths):
        if (p / "config.yaml").is_file() or (p / "metrics.jsonl").is_file():
            out.append(p)
        elif p.is_dir():
            found = {q.parent for name in ("config.yaml", "metrics.jsonl") for q in p.rglob(name)}
            out += sorted(d for d in found if "checkpoints" not in d.parts)
        else:
            raise SweepError(f"not a run folder: {p}")
    if not out:
        raise SweepError(f"no run folders (with config.yaml / metrics.jsonl) in {', '.join(map(str, paths))}")
    return list(dict.fromkeys(out))


def changed_keys(configs: list[dict], base: dict | None = None, ignore=("output_dir",)) -> list[str]:
    """Dotted keys whose value differs between the configs, or from `base` (keys base has)."""
    flats = [flatten(c) for c in configs]
    keys = sorted({k for f in flats for k in f} - set(ignore))
    base_flat = flatten(base) if base else {}
    out = []
    for k in keys:
        vals = [json.dumps(f.get(k), sort_keys=True) for f in flats]
        if len(set(vals)) > 1 or (k in base_flat and vals[0] != json.dumps(base_flat[k], sort_keys=True)):
            out.append(k)
    return out


def report_table(run_dirs: list[str | Path], base: dict | None = None, metric: str = "",
                 mode: str = "", sort: bool = False) -> tuple[list[str], list[list]]:
    """One row per run: name, changed config keys, best key metric and its step, the other
    metrics at that evaluation, final key metric, last step. sort: best first (each run's own
    key metric and mode; runs without an evaluation last)."""
    runs = [summarize_run(d, metric, mode) for d in run_dirs]
    if sort:
        runs.sort(key=lambda r: (1 if r["mode"] == "max" else -1) * -r["best"][r["metric"]]
                  if r["best"] else math.inf)
    keys = changed_keys([r["config"] for r in runs], base)
    metrics = list(dict.fromkeys(r["metric"] for r in runs if r["metric"]))
    others = list(dict.fromkeys(k for r in runs for k in r["best"] if k != "step" and k not in metrics))
    cols = ["run", *keys, *[f"{m} (best)" for m in metrics], "step", *others,
            *[f"{m} (final)" for m in metrics], "final step", "status"]
    rows = []
    for r in runs:
        flat = flatten(r["config"])
        row = [_run_name(r["run"], run_dirs), *[flat.get(k, "") for k in keys]]
        row += [r["best"].get(m, "") if m == r["metric"] else "" for m in metrics]
        row += [r["best"].get("step", ""), *[r["best"].get(k, "") for k in others]]
        row += [r["final"].get(m, "") if m == r["metric"] else "" for m in metrics]
        row += [r["final"].get("step", ""), r["status"] or ("no evaluation" if not r["best"] else "")]
        rows.append(row)
    return cols, rows


def _run_name(run: str, all_runs) -> str:
    """Shortest readable name: the path below the runs' common parent."""
    paths = [Path(p).resolve() for p in all_runs]
    try:
        common = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
        return str(Path(run).resolve().relative_to(common)) or Path(run).name
    except ValueError:
        return str(run)


def mean_std_rows(cols: list[str], rows: list[list], skip: int = 1) -> list[list]:
    """Rows 'mean' and 'std' (sample std, n-1) of each numeric column after the first `skip`."""
    mean, std = ["mean"] + [""] * (skip - 1), ["std"] + [""] * (skip - 1)
    for j in range(skip, len(cols)):
        vals = [r[j] for r in rows if is_number(r[j])]
        m = sum(vals) / len(vals) if vals else ""
        s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else ("" if not vals else 0.0)
        mean.append(m)
        std.append(s)
    return [mean, std]


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.5g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def markdown_table(cols: list[str], rows: list[list]) -> str:
    esc = lambda s: fmt(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(esc(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_text(cols: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    w.writerows([[json.dumps(v) if isinstance(v, (list, dict)) else v for v in r] for r in rows])
    return buf.getvalue()


def write_table(cols: list[str], rows: list[list], stem: str | Path, title: str = "") -> str:
    """stem.md (markdown, 5 significant digits) + stem.csv (full precision); returns the markdown."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = (f"# {title}\n\n" if title else "") + markdown_table(cols, rows)
    atomic_write(stem.with_suffix(".md"), md)
    atomic_write(stem.with_suffix(".csv"), csv_text(cols, rows))
    return md


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- folds / seeds / ensembles
def group_table(run_dirs: list[Path]) -> tuple[list[str], list[list]]:
    """run | best <key metric> | its step | last step | every metric of the final evaluation."""
    runs = [summarize_run(d) for d in run_dirs]
    finals = list(dict.fromkeys(k for r in runs for k in r["final"] if k != "step"))
    metric = runs[0]["metric"] if runs else ""
    cols = ["run", f"{metric} (best)", "best step", "final step", *finals]
    rows = [[Path(r["run"]).name, r["best"].get(metric, ""), r["best"].get("step", ""), r["final"].get("step", ""),
             *[r["final"].get(k, "") for k in finals]] for r in runs]
    return cols, rows


def ensemble_eval(launcher: str, script: str, config: str, overrides: list[str], members: list[Path],
                  out: Path) -> str:
    """eval_only=true ensemble=[best checkpoints]: the script reports the ensemble's metrics and
    member<i>_<metric> of each member in one metrics.jsonl record."""
    ckpts = [best_checkpoint(d) if (Path(d) / "checkpoints").is_dir() else Path(d) for d in members]
    say(f"ensemble of {len(ckpts)} checkpoints -> {out}")
    keep_old_attempt(out)
    info = run_watched(script_cmd(launcher, script, config, [*overrides, *ensemble_overrides(ckpts)], out), out,
                       env=worker_env(None, 1), poll_s=1.0)
    from lib.logging import read_metrics

    recs = read_metrics(out)
    if info["status"] != "ok" or not recs:
        raise SweepError(f"ensemble evaluation failed ({out}/console.log): {info['error']}")
    rec = recs[-1]
    names = [k for k, v in rec.items() if is_number(v) and k != "step" and not k.startswith("member")]
    cols = ["model", *names]
    rows = [["ensemble", *[rec[k] for k in names]]]
    rows += [[f"member{i} {Path(members[i]).name}", *[rec.get(f"member{i}_{k}", "") for k in names]]
             for i in range(len(ckpts))]
    return write_table(cols, rows, out / "ensemble", f"ensemble of {len(ckpts)}")


# ----------------------------------------------------------------------------- controlled comparisons
@dataclass
class ArmConfig:
    name: str = ""  # folder name of the arm's runs: <out>/<name>/seed_<s>
    overrides: list[str] = field(default_factory=list)  # key=value on top of the common overrides


@dataclass
class CompareConfig:
    """An experiment file of `sweep.py compare`: arms x seeds of one script, plus trivial rows."""

    script: str = ""  # e.g. train_hand.py
    config: str = ""  # base config of the script
    overrides: list[str] = field(default_factory=list)  # key=value common to all arms
    metric: str = ""  # "" = train.best_metric of the runs' config.yaml
    mode: Literal["", "max", "min"] = ""  # "" = train.best_mode of the runs' config.yaml
    also: list[str] = field(default_factory=list)  # other metrics shown as mean +- std at the final evaluation
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # passed as seed=S (same seed = same data order)
    workers: int = 1  # runs at a time on this machine
    gpus: list[int] = field(default_factory=list)  # split between workers as CUDA_VISIBLE_DEVICES
    launcher: str = "python"  # or "accelerate launch --num_processes 2"
    out: str = ""  # "" = runs/compare/<experiment file name>
    baseline: str = ""  # the arm the others are compared with ("" = the first arm)
    arms: list[ArmConfig] = field(default_factory=list)
    trivial: list[ArmConfig] = field(default_factory=list)  # run once (seed = first seed), e.g. eval_only=true baseline=...


def load_compare(path: str | Path, overrides: list[str] = ()) -> tuple[CompareConfig, Path]:
    """Experiment file (+ key=value overrides of its keys) -> (config, output folder)."""
    try:
        cfg = build_config(CompareConfig, load_yaml(path), overrides)
    except ConfigError as e:
        raise SweepError(f"experiment file {path}: {e}") from None
    for key in ("script", "config"):
        if not getattr(cfg, key):
            raise SweepError(f"experiment file {path}: '{key}' is not set")
        if not Path(getattr(cfg, key)).is_file():
            raise SweepError(f"experiment file {path}: file not found: {getattr(cfg, key)} "
                             "(paths are relative to the current folder)")
    if not cfg.arms:
        raise SweepError(f"experiment file {path}: 'arms' is empty")
    names = [a.name for a in cfg.arms + cfg.trivial]
    for n in names:
        if not n or "/" in n or n.startswith("."):
            raise SweepError(f"experiment file {path}: arm name {n!r} must be a plain folder name")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SweepError(f"experiment file {path}: arm name {dup[0]!r} used twice")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise SweepError(f"experiment file {path}: 'seeds' must be a non-empty list of different seeds")
    cfg.baseline = cfg.baseline or cfg.arms[0].name
    if cfg.baseline not in [a.name for a in cfg.arms]:
        raise SweepError(f"experiment file {path}: baseline {cfg.baseline!r} is not one of the arms "
                         f"{[a.name for a in cfg.arms]}")
    out = Path(cfg.out or f"runs/compare/{Path(path).stem}")
    cfg.out = str(out)
    return cfg, out


def compare_jobs(cfg: CompareConfig, out: Path) -> list[tuple[str, int | None, list[str], Path]]:
    """(arm, seed or None for a trivial row, command, run folder): trivial rows first, then seed by seed."""
    jobs = [(t.name, None, script_cmd(cfg.launcher, cfg.script, cfg.config,
                                      [*cfg.overrides, *t.overrides, f"seed={cfg.seeds[0]}"], out / t.name),
             out / t.name) for t in cfg.trivial]
    for s in cfg.seeds:
        for a in cfg.arms:
            run_dir = out / a.name / f"seed_{s}"
            jobs.append((a.name, s, script_cmd(cfg.launcher, cfg.script, cfg.config,
                                               [*cfg.overrides, *a.overrides, f"seed={s}"], run_dir), run_dir))
    return jobs


def finished_with(run_dir: Path, cmd: list[str], script: str) -> bool:
    """Did run_dir finish (status ok) with the same script arguments? (The launcher part may differ:
    accelerate gets a fresh port each time.)"""
    info = run_status(run_dir)
    old = info.get("cmd") or []
    return info.get("status") == "ok" and script in old and old[old.index(script):] == cmd[cmd.index(script):]


def paired_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """Mean of paired differences and its t interval: mean +- t_{(1+level)/2, n-1} * sd / sqrt(n)
    (sd with n-1). (mean, None, None) for fewer than 2 pairs."""
    from scipy.stats import t as student_t

    n = len(diffs)
    mean = sum(diffs) / n if n else math.nan
    if n < 2:
        return mean, None, None
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = float(student_t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _mean_std(vals: list[float]) -> tuple[Any, Any]:
    if not vals:
        return "", ""
    m = sum(vals) / len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else ""


def _reading(lo, hi, mode: str) -> str:
    if lo is None:
        return "n < 2"
    if lo > 0 or hi < 0:
        return "better" if (lo > 0) == (mode == "max") else "worse"
    return "n.s."


def compare_tables(cfg: CompareConfig, jobs: list[tuple], metric: str, mode: str) -> dict:
    """Per-arm and per-run rows of a comparison (numbers at full precision) + the curves."""
    runs = {}
    for arm, seed, _, run_dir in jobs:
        r = summarize_run(run_dir, metric, mode)
        info = run_status(run_dir)
        r["status"] = info.get("status") or ("not run" if not run_dir.exists() else "unknown")
        if r["status"] == "ok" and not r["best"]:
            r["status"] = f"no '{metric}' in metrics.jsonl"
        r["error"] = info.get("error", "") if r["status"] != "ok" else ""
        runs[(arm, seed)] = r
    ok = {k: r for k, r in runs.items() if r["status"] == "ok"}
    base = {s: ok[(cfg.baseline, s)] for s in cfg.seeds if (cfg.baseline, s) in ok}
    arm_cols = ["arm", "kind", "seeds_ok", "seeds", "best_mean", "best_std", "final_mean", "final_std",
                "d_best", "d_best_lo", "d_best_hi", "d_final", "d_final_lo", "d_final_hi", "pairs",
                "reading_best", "reading_final", *[f"{k}_{x}" for k in cfg.also for x in ("mean", "std")],
                "status"]
    arm_rows = []
    for a in [*cfg.arms, *cfg.trivial]:
        trivial = a in cfg.trivial
        keys = [(a.name, None)] if trivial else [(a.name, s) for s in cfg.seeds]
        mine = [ok[k] for k in keys if k in ok]
        row = {"arm": a.name, "kind": "trivial" if trivial else "baseline" if a.name == cfg.baseline else "arm",
               "seeds_ok": len(mine), "seeds": len(keys)}
        for which in ("best", "final"):
            row[f"{which}_mean"], row[f"{which}_std"] = _mean_std([r[which][metric] for r in mine])
            if row["kind"] == "baseline" or not mine:
                row.update({f"d_{which}": "", f"d_{which}_lo": "", f"d_{which}_hi": "", f"reading_{which}": ""})
                continue
            # paired by seed; a trivial row is one number, compared with each baseline seed
            pairs = [(ok[(a.name, None)] if trivial else ok[(a.name, s)], b) for s, b in base.items()
                     if trivial or (a.name, s) in ok]
            d, lo, hi = paired_interval([r[which][metric] - b[which][metric] for r, b in pairs]) if pairs \
                else ("", None, None)
            row.update({f"d_{which}": d, f"d_{which}_lo": "" if lo is None else lo,
                        f"d_{which}_hi": "" if hi is None else hi,
                        f"reading_{which}": _reading(lo, hi, mode) if pairs else "no pairs"})
            row["pairs"] = len(pairs)
        row.setdefault("pairs", "")
        for k in cfg.also:
            row[f"{k}_mean"], row[f"{k}_std"] = _mean_std([r["final"][k] for r in mine if is_number(r["final"].get(k))])
        bad = [(k[1], runs[k]) for k in keys if k not in ok]
        row["status"] = "ok" if not bad else "; ".join(
            f"{'' if s is None else f'seed {s} '}{r['status']}" for s, r in bad)
        arm_rows.append([row[c] for c in arm_cols])
    run_cols = ["arm", "seed", "status", f"{metric} (best)", "best step", f"{metric} (final)", "final step",
                *cfg.also, "run", "error"]
    run_rows = [[arm, "" if seed is None else seed, r["status"], r["best"].get(metric, ""), r["best"].get("step", ""),
                 r["final"].get(metric, ""), r["final"].get("step", ""), *[r["final"].get(k, "") for k in cfg.also],
                 r["run"], r["error"]] for (arm, seed), r in runs.items()]
    return {"arm_cols": arm_cols, "arm_rows": arm_rows, "run_cols": run_cols, "run_rows": run_rows, "runs": runs}


def _pm(m, s) -> str:
    return "" if m == "" else fmt(m) if s == "" else f"{fmt(m)} ± {fmt(s)}"


def _ci(d, lo, hi) -> str:
    if d == "":
        return ""
    sign = lambda v: ("+" if v > 0 else "") + fmt(v)  # noqa: E731
    return sign(d) + ("" if lo == "" else f" [{sign(lo)}, {sign(hi)}]")


def write_compare(cfg: CompareConfig, out: Path, jobs: list[tuple], metric: str, mode: str,
                  title: str = "") -> str:
    """compare.md (arms table, failed runs, per-run table, plot), compare.csv (the arms table at full
    precision), compare_runs.csv and compare.png; returns the markdown."""
    t = compare_tables(cfg, jobs, metric, mode)
    cols = t["arm_cols"]
    arms = [dict(zip(cols, r)) for r in t["arm_rows"]]
    md_cols = ["arm", "seeds", f"{metric} best", f"{metric} final", "Δ best [95% CI]", "Δ final [95% CI]",
               "reading (best / final)", *cfg.also, "status"]
    md_rows = []
    for a in arms:
        name = a["arm"] + {"baseline": " (baseline)", "trivial": " (trivial)"}.get(a["kind"], "")
        reading = "" if a["kind"] == "baseline" or not a["seeds_ok"] else f"{a['reading_best']} / {a['reading_final']}"
        md_rows.append([name, f"{a['seeds_ok']}/{a['seeds']}", _pm(a["best_mean"], a["best_std"]),
                        _pm(a["final_mean"], a["final_std"]), _ci(a["d_best"], a["d_best_lo"], a["d_best_hi"]),
                        _ci(a["d_final"], a["d_final_lo"], a["d_final_hi"]), reading,
                        *[_pm(a[f"{k}_mean"], a[f"{k}_std"]) for k in cfg.also], a["status"]])
    n = len(cfg.seeds)
    lines = [f"# {title or 'Comparison'}", "",
             f"`{cfg.script} --config {cfg.config}` {' '.join(cfg.overrides)}  ",
             f"metric `{metric}` ({'higher' if mode == 'max' else 'lower'} is better), seeds {cfg.seeds}; "
             f"mean ± std (n-1) over seeds; Δ = arm − {cfg.baseline}, paired by seed, 95% t interval "
             f"(t_0.975,{n - 1}); better / worse: the interval excludes 0, n.s.: it does not.", "",
             markdown_table(md_cols, md_rows)]
    failed = [r for r in t["run_rows"] if r[2] != "ok"]
    if failed:
        lines += ["Runs not counted (not ok):", "",
                  *[f"- {r[0]}{'' if r[1] == '' else f' seed {r[1]}'}: {r[2]}" + (f": {r[-1]}" if r[-1] else "")
                    + f" (`{r[-2]}/console.log`)" for r in failed], ""]
    plot = write_compare_plot(cfg, t["runs"], metric, out / "compare.png")
    lines += ["![curves](compare.png)", ""] if plot else []
    lines += ["## Runs", "", markdown_table(t["run_cols"], t["run_rows"])]
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "compare.md", text)
    atomic_write(out / "compare.csv", csv_text(cols, t["arm_rows"]))
    atomic_write(out / "compare_runs.csv", csv_text(t["run_cols"], t["run_rows"]))
    return text


def write_compare_plot(cfg: CompareConfig, runs: dict, metric: str, path: Path) -> bool:
    """The metric against the step: per arm the mean over its seeds with a min-max band; trivial rows
    as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for i, a in enumerate(cfg.arms):
        curves = [dict(r["curve"]) for (arm, _), r in runs.items() if arm == a.name and r["status"] == "ok"]
        steps = sorted({s for c in curves for s in c})
        if not steps:
            continue
        vals = [[c[s] for c in curves if s in c] for s in steps]
        color = f"C{i % 10}"
        ax.plot(steps, [sum(v) / len(v) for v in vals], color=color, marker="." if len(steps) < 40 else None,
                label=f"{a.name} ({len(curves)} seeds)")
        ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=color, alpha=0.2, lw=0)
        drawn = True
    for j, a in enumerate(cfg.trivial):
        r = runs.get((a.name, None))
        if r and r["status"] == "ok" and r["final"]:
            ax.axhline(r["final"][metric], color=f"C{(len(cfg.arms) + j) % 10}", ls="--", lw=1, label=f"{a.name} (trivial)")
            drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}: mean over seeds, band = min..max", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.png")
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)
    plt.close(fig)
    return drawn

