"""The Optuna side of sweep.py: the sweep file and its search space, the study (journal file or
RDB storage such as PostgreSQL, sampler, pruner), the cross-process / cross-host lock around
count + ask, trials of dead workers, and the sweep summary. Running trials as subprocesses and
result tables live in lib/runs.py (no Optuna there).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shlex
import signal
import time
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from optuna.trial import TrialState

from lib.config import ConfigError, build_config, load_yaml
from lib.runs import HOST, SweepError, atomic_write, csv_text, is_number, markdown_table, override, say

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.WARNING)


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
    """The resource unit is one evaluation (one metrics.jsonl record with the metric), or, with
    check_every_epochs: N, N epochs: the pruner sees the evaluation at which the run's `epoch`
    (logged in each record) passes a multiple of N, and min/max_resource count N-epoch blocks."""

    name: Literal["hyperband", "sha", "none"] = "hyperband"
    min_resource: int = 1  # resource units a trial always gets before it can be stopped
    max_resource: int = 0  # hyperband: resource units of a full trial; 0 = from the first finished trial
    reduction_factor: int = 3  # keep the best 1/reduction_factor at each rung
    check_every_epochs: float = 0  # 0 = the pruner sees every evaluation; N = every N epochs


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
    storage: str = ""  # "" = journal file <output_dir>/study.journal (one machine); postgresql://user:pw@host:port/db
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


# ----------------------------------------------------------------------------- study
def open_study(cfg: SweepConfig, sweep_dir: Path, seed: int | None = None) -> optuna.Study:
    """The sweep's study (created on first use): journal file in the sweep folder, or cfg.storage
    (an RDB URL such as postgresql://user@host:5432/db: one study for workers on many machines)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    p = cfg.pruner
    if p.name == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(p.min_resource, p.max_resource or "auto", p.reduction_factor)
    elif p.name == "sha":
        pruner = optuna.pruners.SuccessiveHalvingPruner(p.min_resource, p.reduction_factor)
    else:
        pruner = optuna.pruners.NopPruner()
    if "://" not in cfg.storage:
        path = cfg.storage or str(sweep_dir / "study.journal")
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
        return optuna.create_study(storage=storage, sampler=make_sampler(cfg, seed), pruner=pruner,
                                   study_name=cfg.study_name, direction=cfg.direction, load_if_exists=True)
    try:  # the first workers of a new database would race creating optuna's tables: one at a time
        with db_lock(cfg.storage, f"{cfg.study_name}:create"):
            storage = optuna.storages.RDBStorage(rdb_url(cfg.storage), engine_kwargs={"pool_pre_ping": True})
            return optuna.create_study(storage=storage, sampler=make_sampler(cfg, seed), pruner=pruner,
                                       study_name=cfg.study_name, direction=cfg.direction, load_if_exists=True)
    except ImportError as e:  # sqlalchemy is optuna's dependency; the driver is not
        raise SweepError(f"storage {_safe_url(cfg.storage)}: {e} (PostgreSQL: pip install psycopg2-binary)") from None
    except Exception as e:
        if type(e).__module__.startswith(("sqlalchemy", "psycopg2")):  # no server, bad user / database
            raise SweepError(f"storage {_safe_url(cfg.storage)}: {str(e).splitlines()[0]}") from None
        raise


def rdb_url(url: str) -> str:
    """A bare postgresql:// URL means SQLAlchemy's default driver (psycopg 3 in SQLAlchemy 2.1);
    where only psycopg2 is installed, use that one (postgresql+psycopg2://)."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def _safe_url(url: str) -> str:
    """The URL without its password (for error lines)."""
    head, sep, tail = url.rpartition("@")
    if not sep or ":" not in head.split("://", 1)[-1]:
        return url
    scheme, user = head.split("://", 1)
    return f"{scheme}://{user.split(':', 1)[0]}:***@{tail}"


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
def sweep_lock(sweep_dir: Path, cfg: SweepConfig | None = None):
    """Serialises count + ask + suggest (an exact trial count; the constant liar sees every running
    trial) and the study's read-modify-writes (its `interrupted` list). A file lock in the sweep
    folder serves the workers of one machine; with an RDB storage shared by several machines the
    lock is also held in the database itself (see db_lock), so that no two hosts ask at once."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if cfg is not None and "://" in cfg.storage:
                with db_lock(cfg.storage, cfg.study_name):
                    yield
            else:
                yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_ENGINES: dict = {}


@contextmanager
def db_lock(url: str, name: str):
    """A lock named `name` held by the database of `url` for the duration of the block:
    PostgreSQL's session advisory lock (pg_advisory_lock) or MySQL's GET_LOCK. The server
    releases it when the holder's connection drops, so a killed worker never leaves it taken.
    SQLite (one machine) has none: the file lock of sweep_lock covers it."""
    import sqlalchemy as sa

    if url not in _ENGINES:
        _ENGINES[url] = sa.create_engine(rdb_url(url), poolclass=sa.pool.NullPool)
    engine = _ENGINES[url]
    dialect = engine.dialect.name
    if dialect not in ("postgresql", "mysql"):
        yield
        return
    key = zlib.crc32(name.encode())  # 32-bit key: fits PostgreSQL's bigint
    lock, unlock = (("SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)") if dialect == "postgresql"
                    else ("SELECT GET_LOCK(:n, -1)", "SELECT RELEASE_LOCK(:n)"))
    params = {"k": key, "n": f"optuna-{key}"}
    with engine.connect() as conn:
        conn.execute(sa.text(lock), params)
        conn.commit()
        try:
            yield
        finally:
            conn.execute(sa.text(unlock), params)
            conn.commit()


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
