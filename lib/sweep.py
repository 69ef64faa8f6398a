"""Pieces of sweep.py that are not command-line handling: the sweep file and search space, the
Optuna study (storage, sampler, pruner, trials of dead workers), running a training script as a
watched subprocess, pools of runs, result tables, the sweep summary and ensemble evaluation.

A trial / job is always a normal run of a training script in its own folder:
    python train_X.py --config BASE.yaml key=value ... output_dir=RUN_DIR
whose RUN_DIR/metrics.jsonl (one JSON object per evaluation) is read while it runs.
sweep.py adds RUN_DIR/console.log (the script's stdout+stderr) and RUN_DIR/sweep_run.json
(command, exit code, status, error line, duration).
"""

from __future__ import annotations

import csv
import fcntl
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
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import optuna
import yaml
from optuna.trial import TrialState

from lib.config import ConfigError, build_config, load_yaml

HOST = socket.gethostname()
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.WARNING)


def say(msg: str) -> None:
    print(msg, flush=True)


class SweepError(ValueError):
    """Bad sweep file / arguments / run folder: sweep.py prints it as one line (no torch import needed)."""


# ----------------------------------------------------------------------------- the sweep file
@dataclass
class SamplerConfig:
    name: Literal["tpe", "random", "grid"] = "tpe"
    seed: int = 0  # worker i uses seed + i (different random start-up points per worker)
    n_startup_trials: int = 10  # tpe: random trials before the model takes over
    multivariate: bool = True  # tpe: model the parameters jointly
    constant_liar: bool = True  # tpe: running trials count as bad, so parallel workers spread out


@dataclass
class PrunerConfig:
    """The resource unit is one evaluation (one metrics.jsonl record with the metric)."""

    name: Literal["hyperband", "sha", "none"] = "hyperband"
    min_resource: int = 1  # evaluations a trial always gets before it can be stopped
    max_resource: int = 0  # hyperband: evaluations of a full trial; 0 = from the first finished trial
    reduction_factor: int = 3  # keep the best 1/reduction_factor at each rung


@dataclass
class SweepConfig:
    script: str = ""  # e.g. train_seg.py (path relative to where sweep.py runs)
    config: str = ""  # base config of the script
    overrides: list[str] = field(default_factory=list)  # key=value given to every trial
    metric: str = ""  # objective: a key of the metrics.jsonl records, e.g. mIoU
    direction: Literal["maximize", "minimize"] = "maximize"
    use: Literal["best", "last"] = "best"  # objective value: best evaluation or the last one
    trials: int = 20  # total over all workers and restarts (grid: 0 = whole grid)
    space: dict[str, Any] = field(default_factory=dict)  # dotted key -> {type, low, high, log, step, choices}
    enqueue: list[dict] = field(default_factory=list)  # parameter sets tried first, e.g. the current defaults
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    output_dir: str = ""  # "" = runs/sweeps/<sweep file name>
    study_name: str = ""  # "" = sweep file name
    storage: str = ""  # "" = journal file <output_dir>/study.journal; or postgresql://user:pw@host/db
    launcher: str = "python"  # or "accelerate launch --num_processes 2" (one multi-GPU run per trial)
    workers: int = 1  # parallel trials on this machine
    gpus: list[int] = field(default_factory=list)  # split between workers as CUDA_VISIBLE_DEVICES
    poll_s: float = 2.0  # how often a running trial's metrics.jsonl is read
    trial_timeout_s: float = 0.0  # 0 = no limit; a trial over the limit fails
    stale_after_s: float = 1800.0  # a RUNNING trial of a dead worker (no heartbeat this long) is failed and re-run
    folds: int = 0  # --apply-best: train the best parameters on k folds, then ensemble them
    seeds: list[int] = field(default_factory=list)  # --apply-best: ... or on these seeds


SPACE_TYPES = ("float", "uniform", "loguniform", "int", "categorical")


def load_sweep(path: str | Path, overrides: list[str] = ()) -> tuple[SweepConfig, Path]:
    """Sweep file (+ key=value overrides of its keys) -> (config, sweep folder); SweepError names the problem."""
    try:
        cfg = build_config(SweepConfig, load_yaml(path), overrides)
    except ConfigError as e:
        raise SweepError(f"sweep file {path}: {e}") from None
    for key in ("script", "config", "metric"):
        if not getattr(cfg, key):
            raise SweepError(f"sweep file {path}: '{key}' is not set")
    if not cfg.space:
        raise SweepError(f"sweep file {path}: 'space' is empty")
    for name, spec in cfg.space.items():
        cfg.space[name] = check_param(name, spec)
    for p in (cfg.script, cfg.config):
        if not Path(p).is_file():
            raise SweepError(f"sweep file {path}: file not found: {p} (paths are relative to the current folder)")
    stem = Path(path).stem
    cfg.study_name = cfg.study_name or stem
    out = Path(cfg.output_dir or f"runs/sweeps/{stem}")
    cfg.output_dir = str(out)
    return cfg, out


def check_param(name: str, spec: Any) -> dict:
    """Normalise one search-space entry; a plain list means categorical."""
    if isinstance(spec, list):
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, dict) or spec.get("type") not in SPACE_TYPES:
        raise SweepError(f"space.{name}: needs type: one of {list(SPACE_TYPES)} (got {spec!r})")
    spec = dict(spec)
    kind = spec["type"]
    if kind == "categorical":
        if not spec.get("choices"):
            raise SweepError(f"space.{name}: categorical needs a non-empty 'choices' list")
        return spec
    unknown = set(spec) - {"type", "low", "high", "log", "step", "grid"}
    if unknown or "low" not in spec or "high" not in spec:
        raise SweepError(f"space.{name}: {kind} needs low and high (optional log, step, grid); got {sorted(spec)}")
    try:
        cast = int if kind == "int" else float
        spec["low"], spec["high"] = cast(spec["low"]), cast(spec["high"])
    except (TypeError, ValueError):
        raise SweepError(f"space.{name}: low/high must be numbers, got {spec['low']!r}, {spec['high']!r}") from None
    if spec["low"] > spec["high"] or (spec["low"] <= 0 and (kind == "loguniform" or spec.get("log"))):
        raise SweepError(f"space.{name}: bad range [{spec['low']}, {spec['high']}] (log needs low > 0)")
    spec["log"] = kind == "loguniform" or bool(spec.get("log", False))
    return spec


def _choice_key(c: Any) -> Any:
    """Optuna categorical choices must be scalars: lists/dicts become their JSON text."""
    return c if c is None or isinstance(c, (bool, int, float, str)) else json.dumps(c)


def suggest(trial, name: str, spec: dict) -> Any:
    kind = spec["type"]
    if kind == "categorical":
        return trial.suggest_categorical(name, [_choice_key(c) for c in spec["choices"]])
    if kind == "int":
        return trial.suggest_int(name, spec["low"], spec["high"], step=int(spec.get("step") or 1), log=spec["log"])
    step = spec.get("step")
    return trial.suggest_float(name, spec["low"], spec["high"], step=float(step) if step else None, log=spec["log"])


def grid_space(space: dict) -> dict[str, list]:
    """Values of each parameter for the grid sampler: choices, every int in range, or 'grid: [...]'."""
    out = {}
    for name, spec in space.items():
        if "grid" in spec:
            out[name] = list(spec["grid"])
        elif spec["type"] == "categorical":
            out[name] = [_choice_key(c) for c in spec["choices"]]
        elif spec["type"] == "int" and not spec["log"]:
            out[name] = list(range(spec["low"], spec["high"] + 1, int(spec.get("step") or 1)))
        else:
            raise SweepError(f"space.{name}: the grid sampler needs 'grid: [values]' for a float/log parameter")
    return out


def override(key: str, value: Any) -> str:
    """key=value as the training scripts parse it (YAML): strings raw, the rest as JSON."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


# ----------------------------------------------------------------------------- study
def open_study(cfg: SweepConfig, sweep_dir: Path, seed: int | None = None) -> optuna.Study:
    """The sweep's study (created on first use): journal file in the sweep folder, or cfg.storage."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "://" in cfg.storage:  # RDB (postgresql://, mysql://, sqlite:///): one study for many machines
        storage = cfg.storage
    else:
        path = cfg.storage or str(sweep_dir / "study.journal")
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    p = cfg.pruner
    if p.name == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(p.min_resource, p.max_resource or "auto", p.reduction_factor)
    elif p.name == "sha":
        pruner = optuna.pruners.SuccessiveHalvingPruner(p.min_resource, p.reduction_factor)
    else:
        pruner = optuna.pruners.NopPruner()
    return optuna.create_study(storage=storage, sampler=make_sampler(cfg, seed), pruner=pruner,
                               study_name=cfg.study_name, direction=cfg.direction, load_if_exists=True)


def make_sampler(cfg: SweepConfig, seed: int | None = None) -> optuna.samplers.BaseSampler:
    s = cfg.sampler
    seed = s.seed if seed is None else seed
    if s.name == "grid":
        return optuna.samplers.GridSampler(grid_space(cfg.space), seed=seed)
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(n_startup_trials=s.n_startup_trials, multivariate=s.multivariate,
                                      constant_liar=s.constant_liar, seed=seed)


@contextmanager
def sweep_lock(sweep_dir: Path):
    """Serialises count + ask + suggest (exact trial count, constant liar sees every running trial)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def n_target(cfg: SweepConfig) -> int:
    if cfg.sampler.name != "grid":
        return cfg.trials
    size = math.prod(len(v) for v in grid_space(cfg.space).values())
    return min(cfg.trials, size) if cfg.trials else size


def n_counted(study: optuna.Study) -> int:
    """Trials that count towards `trials`: all but queued ones and interrupted (re-queued) ones."""
    interrupted = set(study.user_attrs.get("interrupted", []))
    return sum(t.state != TrialState.WAITING and t.number not in interrupted for t in study.get_trials(deepcopy=False))


def mark_interrupted(study: optuna.Study, number: int, params: dict) -> None:
    """Fail a trial that did not finish (worker killed / Ctrl-C) and queue its parameters again."""
    study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    study.set_user_attr("interrupted", sorted({*study.user_attrs.get("interrupted", []), number}))
    study.enqueue_trial(params, user_attrs={"retry_of": number})


def fail_stale(study: optuna.Study, cfg: SweepConfig) -> None:
    """RUNNING trials whose worker is gone (dead pid on this host, or no heartbeat for stale_after_s)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        a = t.user_attrs
        dead = a.get("host") == HOST and (a.get("pid") == os.getpid() or not _pid_alive(a.get("pid")))
        if dead or time.time() - a.get("heartbeat", time.time()) > cfg.stale_after_s:
            child = a.get("child_pid")
            try:
                if dead and _pid_alive(child) and a.get("run_dir", "?") in Path(f"/proc/{child}/cmdline").read_text():
                    os.killpg(child, signal.SIGTERM)  # the orphaned training run of that trial
            except OSError:
                pass
            say(f"trial {t.number}: its worker is gone; marked failed, parameters queued again")
            mark_interrupted(study, t.number, t.params)


def _pid_alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


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


def read_metrics(run_dir: str | Path) -> list[dict]:
    return MetricsTail(run_dir).read()


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
def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


DEFAULT_METRICS = ("mIoU", "AP", "EER", "mpjpe")  # what the scripts keep the best checkpoint by, by default


def lower_is_better(metric: str) -> bool:
    m = metric.lower()
    return m == "eer" or any(w in m for w in ("loss", "mpjpe", "err"))


def summarize_run(run_dir: str | Path, metric: str = "", mode: str = "") -> dict:
    """Best and final evaluation of a run. Key metric/mode default to the run's own
    train.best_metric / train.best_mode (config.yaml), else the scripts' defaults (mIoU, AP, EER,
    mpjpe) or the first metric logged; EER, errors, MPJPE and losses are minimised."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    cfg = (yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.is_file() else {}
    train = cfg.get("train", {}) if isinstance(cfg.get("train"), dict) else {}
    recs = [r for r in read_metrics(run_dir) if isinstance(r, dict)]
    logged = [k for r in recs for k, v in r.items() if is_number(v) and k not in ("step", "epoch")]
    if not metric:
        metric = train.get("best_metric") or next((m for m in DEFAULT_METRICS if m in logged),
                                                  next((k for k in logged if "loss" not in k), ""))
    if not mode:  # the script's own rule: EER / errors / losses are minimised whatever best_mode says
        mode = "min" if train.get("best_mode") == "min" or lower_is_better(metric) else "max"
    evals = [r for r in recs if is_number(r.get(metric))]
    out = {"run": str(run_dir), "config": cfg, "metric": metric, "mode": mode, "records": len(recs),
           "status": run_status(run_dir).get("status", ""), "best": {}, "final": {}}
    if evals:
        pick = max if mode == "max" else min
        best = pick(evals, key=lambda r: r[metric])  # first of equal values: the earliest step
        out["best"] = {k: v for k, v in best.items() if is_number(v)}
        out["final"] = {k: v for k, v in evals[-1].items() if is_number(v)}
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
                 mode: str = "") -> tuple[list[str], list[list]]:
    """One row per run: name, changed config keys, best key metric and its step, the other
    metrics at that evaluation, final key metric, last step."""
    runs = [summarize_run(d, metric, mode) for d in run_dirs]
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


# ----------------------------------------------------------------------------- summary
def write_summary(study: optuna.Study, cfg: SweepConfig, sweep_dir: Path, plots: bool) -> str:
    """summary.md, trials.csv/.md, best.yaml and (plots=True) history/importance/intermediate.png."""
    interrupted = set(study.user_attrs.get("interrupted", []))
    trials = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
    names = list(cfg.space)
    cols = ["trial", "state", cfg.metric, "at step", "evals", "seconds", *names, "run", "error"]
    rows = []
    for t in trials:
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else ""
        state = "INTERRUPTED" if t.number in interrupted else t.state.name
        rows.append([t.number, state, t.value if t.value is not None else last, t.user_attrs.get("best_step", ""),
                     len(t.intermediate_values), t.user_attrs.get("seconds", ""),
                     *[t.params.get(n, "") for n in names], t.user_attrs.get("run_dir", ""),
                     t.user_attrs.get("error", "")])
    sign = -1 if cfg.direction == "maximize" else 1
    order = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2}
    ranked = sorted(rows, key=lambda r: (order.get(r[1], 3), sign * r[2] if is_number(r[2]) else 0, r[0]))
    table = markdown_table(cols, ranked)
    atomic_write(sweep_dir / "trials.md", table)
    atomic_write(sweep_dir / "trials.csv", csv_text(cols, rows))  # by trial number
    counts = {s: sum(r[1] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "INTERRUPTED")}
    lines = [f"# Sweep {cfg.study_name}", "",
             f"`{cfg.script} --config {cfg.config}` {' '.join(cfg.overrides)}  ",
             f"objective: {cfg.use} `{cfg.metric}` ({cfg.direction}); sampler {cfg.sampler.name}, "
             f"pruner {cfg.pruner.name}; {len(rows)} trials: "
             + ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v), ""]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if done:
        best = study.best_trial
        best_overrides = [*cfg.overrides, *[override(k, v) for k, v in best.params.items()]]
        reproduce = shlex.join(["python", cfg.script, "--config", cfg.config, *best_overrides])
        lines += [f"## Best: trial {best.number}, {cfg.metric} = {best.value:.5g} at step "
                  f"{best.user_attrs.get('best_step', '?')}", "", "| parameter | value |", "|---|---|",
                  *[f"| {k} | {v} |" for k, v in best.params.items()], "",
                  f"run folder: `{best.user_attrs.get('run_dir')}`  ", f"reproduce: `{reproduce}`", ""]
        atomic_write(sweep_dir / "best.yaml", yaml.safe_dump(
            {"trial": best.number, "metric": cfg.metric, "value": best.value, "params": best.params,
             "run_dir": best.user_attrs.get("run_dir"), "overrides": best_overrides}, sort_keys=False))
        if plots and len(done) > 1:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    imp = optuna.importance.get_param_importances(study)
                lines += ["## Parameter importance", "",
                          *[f"- {k}: {v:.3f}" for k, v in imp.items()], ""]
            except (RuntimeError, ValueError) as e:
                lines += [f"(no parameter importance: {e})", ""]
    if plots:
        lines += [f"![{n}]({n}.png)" for n in write_plots(study, sweep_dir)] + [""]
    lines += ["## Trials (best first)", "", table]
    text = "\n".join(lines)
    atomic_write(sweep_dir / "summary.md", text)
    return text


def write_plots(study: optuna.Study, sweep_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    written = []
    for name, fn in (("history", ovm.plot_optimization_history), ("importance", ovm.plot_param_importances),
                     ("intermediate", ovm.plot_intermediate_values)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental API / too few trials for importances
                ax = fn(study)
        except (ValueError, RuntimeError, ZeroDivisionError):  # too few finished trials for this plot
            continue
        fig = getattr(ax, "figure", None) or ax.flat[0].figure
        fig.set_size_inches(8, 4.5)
        fig.tight_layout()
        tmp = sweep_dir / f".{name}.{os.getpid()}.png"
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        os.replace(tmp, sweep_dir / f"{name}.png")
        written.append(name)
    return written


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
