"""Hyper-parameter sweeps, k-fold and multi-seed runs, checkpoint ensembles and result tables for
any training script here (train_seg.py, train_face.py, train_pose.py, train_hand.py).

Every trial / run is a normal run of the script in its own folder; its metrics.jsonl is read while
it runs (pruning needs no change to the scripts). Paths are relative to the folder you run from.

Search (Optuna; TPE + Hyperband pruning by default; sweep file keys: lib/study.py SweepConfig):
  python sweep.py run configs/sweeps/seg_sample.yaml                    # writes runs/sweeps/seg_sample/
  python sweep.py run configs/sweeps/seg_sample.yaml trials=30          # key=value: sweep-file keys; resumes
  python sweep.py run configs/sweeps/seg_camvid.yaml --workers 4 --gpus 0,1,2,3   # 4 trials at a time
  python sweep.py run configs/sweeps/face_lfw.yaml --apply-best --folds 5         # then best params x 5 folds
  python sweep.py summary configs/sweeps/seg_sample.yaml                # rewrite summary.md / plots
Parallel workers share the study: `--workers N` starts N processes on a journal file
(<output_dir>/study.journal); starting `python sweep.py run SWEEP.yaml --worker i` by hand several
times does the same. Across machines, set `storage: postgresql://user:pw@host/db` in the sweep file
(`pip install psycopg2-binary`) and start `python sweep.py run SWEEP.yaml --worker i` on every machine
(different i: sampler seeds). Stopping and re-starting a sweep continues it; trials that were running
when a worker died are marked failed and re-run.

Folds, seeds, ensembles, tables:
  python sweep.py apply-best configs/sweeps/face_lfw.yaml --folds 5     # or --seeds 0 1 2
  python sweep.py folds --script train_face.py --config configs/face/lfw.yaml --k 5 [key=value ...]
  python sweep.py seeds --script train_seg.py --config configs/seg/sample.yaml --seeds 0 1 2 [key=value ...]
  python sweep.py ensemble --script train_seg.py --config configs/seg/sample.yaml runs/a runs/b [key=value ...]
  python sweep.py report runs/seg_* [--base configs/seg/camvid_b0.yaml] [--metric mIoU] [--out runs/table]
  python sweep.py batch experiments.txt [--workers 2] [key=value ...]    # one script command per line

Controlled comparisons (arms x seeds, paired by seed; experiment-file keys: lib/runs.py CompareConfig):
  python sweep.py compare configs/compare/toy.yaml [--workers 2]       # writes <out>/compare.md/.csv/.png
Running it again reuses the finished runs (same arguments) and re-runs failed or changed ones.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from optuna.trial import TrialState

from lib.config import ConfigError, load_yaml
from lib.runs import (HOST, SweepError, atomic_write, compare_jobs, ensemble_eval, find_runs, finished_with, group_table,
                      is_number, launcher_cmd, load_compare, markdown_table, mean_std_rows, override, report_table,
                      run_pool, run_status, run_watched, say, script_cmd, split_gpus, summarize_run, worker_env,
                      write_compare, write_table)
from lib.study import (SweepConfig, fail_stale, load_sweep, make_sampler, mark_interrupted, n_counted, n_target,
                       open_study, suggest, sweep_lock, write_summary)


# ----------------------------------------------------------------------------- the search
def worker_loop(cfg: SweepConfig, sweep_dir: Path, worker: int | None, plots: bool = True) -> None:
    """Ask for trials until the study has `trials` of them; each runs as a watched subprocess."""
    study = open_study(cfg, sweep_dir, None if worker is None else cfg.sampler.seed + worker)
    env = worker_env(None, cfg.workers)
    check_seed = worker is None
    while True:
        with sweep_lock(sweep_dir, cfg):  # (an RDB storage: also locked in the database, across machines)
            if "script" not in study.user_attrs:  # a new study
                for k in ("script", "config", "metric", "direction", "use"):
                    study.set_user_attr(k, getattr(cfg, k))
                for params in cfg.enqueue:
                    study.enqueue_trial(params)
            if check_seed and study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                study.sampler = make_sampler(cfg, cfg.sampler.seed + os.getpid())  # another worker runs: other draws
            check_seed = False
            fail_stale(study, cfg)
            if n_counted(study) >= n_target(cfg):
                break
            trial = study.ask()
            params = {name: suggest(trial, name, spec) for name, spec in cfg.space.items()}
            run_dir = sweep_dir / "trials" / f"trial_{trial.number:04d}"
            for k, v in {"run_dir": str(run_dir), "host": HOST, "pid": os.getpid(), "heartbeat": time.time()}.items():
                trial.set_user_attr(k, v)
        state, error = run_trial(study, trial, params, cfg, sweep_dir, run_dir, env)
        with sweep_lock(sweep_dir):
            write_summary(study, cfg, sweep_dir, plots=False)
        if state == TrialState.FAIL and error.startswith("config error"):
            raise SweepError(f"trial {trial.number}: {error} (check the sweep file's space/overrides)")
    if plots:
        with sweep_lock(sweep_dir):
            write_summary(study, cfg, sweep_dir, plots=True)


def run_trial(study, trial, params: dict, cfg: SweepConfig, sweep_dir: Path, run_dir: Path,
              env: dict) -> tuple[TrialState, str]:
    """One trial: the script in run_dir; each evaluation is reported to the pruner, which may stop it."""
    overrides = [*cfg.overrides, *[override(k, v) for k, v in params.items()]]
    cmd = script_cmd(cfg.launcher, cfg.script, cfg.config, overrides, run_dir)
    values: list[tuple[int, float]] = []  # (step, metric) of each evaluation
    bad: list = []  # steps with a NaN/inf metric
    beat = [time.time(), None]
    every, checks = cfg.pruner.check_every_epochs, [0]  # checks[0]: N-epoch blocks the pruner has seen

    def on_record(rec: dict, running: bool) -> str | None:
        if cfg.metric not in rec:
            return None
        v = rec[cfg.metric]
        if not is_number(v):
            bad.append(rec.get("step"))
            return "non-finite"
        step = rec.get("step", len(values) + 1)
        values.append((step, float(v)))
        if every:  # resource unit: N epochs, from the epoch the script logs with each evaluation
            if not is_number(rec.get("epoch")):
                return (f"config error: pruner.check_every_epochs needs an 'epoch' in each {cfg.metric} record "
                        f"of metrics.jsonl ({cfg.script} logs none); or count in evaluations")
            block = math.floor(rec["epoch"] / every + 1e-9)
            if block <= checks[0]:
                return None
            checks[0] = resource = block
        else:
            resource = len(values)  # resource unit: one evaluation
        trial.report(float(v), resource)
        prune = trial.should_prune()  # (also records the trial's rung)
        return "pruned" if prune and running and not at_end(run_dir, rec) else None  # not at the end

    def on_tick(proc) -> None:
        if beat[1] is None:
            beat[1] = proc.pid
            trial.set_user_attr("child_pid", proc.pid)
        if time.time() - beat[0] > 60:
            beat[0] = time.time()
            trial.set_user_attr("heartbeat", beat[0])

    try:
        info = run_watched(cmd, run_dir, env, on_record, on_tick, cfg.poll_s, cfg.trial_timeout_s)
    except BaseException:
        with sweep_lock(sweep_dir, cfg):
            mark_interrupted(study, trial.number, params)
        raise
    trial.set_user_attr("seconds", info["seconds"])
    error, shown = "", ""
    if info["status"] == "pruned":
        state = TrialState.PRUNED
        study.tell(trial, state=state)
        shown = f"at evaluation {len(values)}: {cfg.metric} {values[-1][1]:.5g}"
    elif info["status"] == "ok" and values and not bad:
        pick = max if cfg.direction == "maximize" else min
        step, value = values[-1] if cfg.use == "last" else pick(values, key=lambda sv: sv[1])
        trial.set_user_attr("best_step", step)
        state = TrialState.COMPLETE
        study.tell(trial, value)
        shown = f"{cfg.metric} {value:.5g} at step {step}"
    else:
        if bad:
            error = f"non-finite {cfg.metric} at step {bad[0]}"
        elif info["status"] == "ok":
            from lib.logging import read_metrics  # (imports torch: only here)

            keys = sorted({k for r in read_metrics(run_dir) for k in r})
            error = f"no '{cfg.metric}' in {run_dir}/metrics.jsonl (keys: {', '.join(keys) or 'no records'})"
        else:
            error = info["error"] or f"exit code {info['rc']}"
        trial.set_user_attr("error", error)
        state = TrialState.FAIL
        study.tell(trial, state=state)
    say(f"trial {trial.number} {state.name} {shown or error} ({info['seconds']:.0f}s)  "
        + " ".join(override(k, v) for k, v in params.items()))
    return state, error


def at_end(run_dir: Path, rec: dict) -> bool:
    """Is this evaluation the run's last? Compares its step (or epoch, when the run's train.unit is
    epoch) with train.total_steps of the config.yaml the script wrote (False if unknown)."""
    try:
        train = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
        pos = rec.get("epoch") if train.get("unit") == "epoch" else rec.get("step")
        return pos is not None and float(pos) >= float(train["total_steps"]) - 1e-9
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return False


def spawn_workers(args, overrides: list[str], n: int, gpus: list[int]) -> None:
    procs = []
    try:
        for i, g in enumerate(split_gpus(gpus, n)):
            cmd = [sys.executable, __file__, "run", args.sweep, "--worker", str(i), "--spawned", *overrides]
            procs.append(subprocess.Popen(cmd, env=worker_env(g, n)))
            time.sleep(0.5)  # stagger the first asks
        codes = [p.wait() for p in procs]
    except BaseException:  # stopped: each worker stops its trial and queues it again
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    if any(codes):
        say(f"workers exited with codes {codes}")


# ----------------------------------------------------------------------------- folds / seeds / ensembles
def run_group(launcher: str, script: str, config: str, overrides: list[str], out: Path, folds: int = 0,
              seeds: list[int] = (), workers: int = 1, gpus: list[int] = (), ensemble: bool = False,
              rerun: bool = False) -> tuple[str, int]:
    """k fold runs (data.folds=k data.fold=i) or one run per seed, then a mean +- std table of their
    final metrics, and (ensemble) an eval_only run averaging the members' best checkpoints.
    Returns (markdown, number of failed runs)."""
    if folds:
        variants = [(f"fold_{i}", [f"data.folds={folds}", f"data.fold={i}"]) for i in range(folds)]
    else:
        variants = [(f"seed_{s}", [f"seed={s}"]) for s in seeds]
    if not variants:
        raise SweepError("nothing to run: give --folds K (K >= 2) or --seeds S ...")
    jobs = [(script_cmd(launcher, script, config, [*overrides, *extra], out / name), out / name)
            for name, extra in variants]
    todo = [j for j in jobs if rerun or run_status(j[1]).get("status") != "ok"]
    if len(todo) < len(jobs):
        say(f"{len(jobs) - len(todo)} runs already finished in {out} (--rerun to repeat them)")
    run_pool(todo, workers, gpus, log=say)
    runs = [d for _, d in jobs]
    errors = [run_status(d).get("error", "") for d in runs]
    if folds and all("unknown config key 'data.fold" in e for e in errors):
        raise SweepError(f"{script} has no data.folds / data.fold config keys, which k-fold runs set ({errors[0]})")
    ok = [d for d in runs if run_status(d).get("status") == "ok"]
    kind = "folds" if folds else "seeds"
    cols, rows = group_table(ok)
    text = write_table(cols, rows + mean_std_rows(cols, rows), out / kind,
                       f"{script} {config}: {len(ok)}/{len(runs)} {kind}, final metrics (std: n-1)")
    if ensemble and len(ok) >= 2:
        text += "\n" + ensemble_eval(launcher, script, config, [*overrides, *(["data.folds=0"] if folds else [])],
                                     ok, out / "ensemble")
    atomic_write(out / f"{kind}.md", text)
    if len(ok) < len(runs):
        text += f"\nfailed: {', '.join(str(d) for d in runs if d not in ok)}\n"
    return text, len(runs) - len(ok)


# ----------------------------------------------------------------------------- commands
def cmd_run(args, overrides: list[str]) -> int:
    cfg, sweep_dir = load_sweep(args.sweep, overrides)
    n = args.workers or cfg.workers
    say(f"sweep {cfg.study_name}: {n_target(cfg)} trials of {cfg.script} -> {sweep_dir}")
    if n > 1 and args.worker is None:
        spawn_workers(args, overrides, n, _gpus(args.gpus) or cfg.gpus)
    else:
        if cfg.gpus and args.worker is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
            os.environ["CUDA_VISIBLE_DEVICES"] = split_gpus(cfg.gpus, max(n, 1))[args.worker % max(n, 1)]
        worker_loop(cfg, sweep_dir, args.worker, plots=not args.spawned)
        if args.spawned:
            return 0
    text = (sweep_dir / "summary.md").read_text() if (sweep_dir / "summary.md").is_file() else ""
    if n > 1 and args.worker is None:  # after all workers: the final summary
        with sweep_lock(sweep_dir):
            text = write_summary(open_study(cfg, sweep_dir), cfg, sweep_dir, plots=True)
    say(text.split("## Trials")[0] + f"table: {sweep_dir}/trials.md, summary: {sweep_dir}/summary.md")
    if args.apply_best:
        return cmd_apply_best(args, overrides, cfg, sweep_dir)
    return 0


def cmd_summary(args, overrides: list[str]) -> int:
    cfg, sweep_dir = load_sweep(args.sweep, overrides)
    with sweep_lock(sweep_dir):
        say(write_summary(open_study(cfg, sweep_dir), cfg, sweep_dir, plots=True))
    return 0


def cmd_apply_best(args, overrides: list[str], cfg: SweepConfig | None = None, sweep_dir: Path | None = None) -> int:
    if cfg is None:
        cfg, sweep_dir = load_sweep(args.sweep, overrides)
    study = open_study(cfg, sweep_dir)
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise SweepError(f"sweep {sweep_dir} has no completed trial yet")
    best = study.best_trial
    folds, seeds = (args.folds, args.seeds) if args.folds or args.seeds else (cfg.folds, cfg.seeds)
    say(f"best trial {best.number} ({cfg.metric} {best.value:.5g}): "
        + " ".join(override(k, v) for k, v in best.params.items()))
    text, failed = run_group(cfg.launcher, cfg.script, cfg.config,
                             [*cfg.overrides, *[override(k, v) for k, v in best.params.items()]],
                             sweep_dir / "best", folds, [] if folds else seeds, args.workers or cfg.workers,
                             _gpus(args.gpus) or cfg.gpus, ensemble=not args.no_ensemble)
    say(text)
    return int(failed > 0)


def cmd_folds(args, overrides: list[str]) -> int:
    out = Path(args.out or f"runs/folds/{Path(args.config).stem}")
    text, failed = run_group(args.launcher, args.script, args.config, overrides, out, folds=args.k,
                             workers=args.workers, gpus=_gpus(args.gpus), ensemble=not args.no_ensemble,
                             rerun=args.rerun)
    say(text)
    return int(failed > 0)


def cmd_seeds(args, overrides: list[str]) -> int:
    out = Path(args.out or f"runs/seeds/{Path(args.config).stem}")
    text, failed = run_group(args.launcher, args.script, args.config, overrides, out, seeds=args.seeds,
                             workers=args.workers, gpus=_gpus(args.gpus), ensemble=args.ensemble, rerun=args.rerun)
    say(text)
    return int(failed > 0)


def cmd_ensemble(args, overrides: list[str]) -> int:
    out = Path(args.out or f"runs/ensembles/{Path(args.config).stem}")
    say(ensemble_eval(args.launcher, args.script, args.config, overrides, [Path(m) for m in args.members], out))
    return 0


def cmd_report(args, overrides: list[str]) -> int:
    runs = find_runs(args.runs)
    base = None
    if args.base:
        b = Path(args.base)
        b = b / "config.yaml" if b.is_dir() else b
        base = load_yaml(b)
    cols, rows = report_table(runs, base, args.metric, args.mode, sort=args.sort)
    if args.out:
        say(write_table(cols, rows, Path(args.out), f"{len(rows)} runs"))
        say(f"written: {args.out}.md, {args.out}.csv")
    else:
        say(markdown_table(cols, rows))
    return 0


def cmd_compare(args, overrides: list[str]) -> int:
    """Arms x seeds (+ trivial rows) of an experiment file; finished runs with the same arguments are
    reused, failed / changed ones run again; then compare.md / .csv / .png in the output folder."""
    cfg, out = load_compare(args.experiment, overrides)
    jobs = compare_jobs(cfg, out)
    todo = [(cmd, d) for _, _, cmd, d in jobs if args.rerun or not finished_with(d, cmd, cfg.script)]
    say(f"compare {args.experiment}: {len(cfg.arms)} arms x {len(cfg.seeds)} seeds + {len(cfg.trivial)} trivial "
        f"-> {out}; {len(jobs) - len(todo)} of {len(jobs)} runs finished already")
    run_pool(todo, args.workers or cfg.workers, _gpus(args.gpus) or cfg.gpus, log=say)
    first = next((summarize_run(d) for _, _, _, d in jobs if run_status(d).get("status") == "ok"), None)
    if first is None:
        raise SweepError(f"no run of {args.experiment} finished; see the console.log files under {out}")
    metric = cfg.metric or first["metric"]
    mode = cfg.mode or first["mode"]
    if not metric:
        raise SweepError(f"no key metric: set 'metric' in {args.experiment} (the runs' train.best_metric is empty)")
    say(write_compare(cfg, out, jobs, metric, mode, title=f"{Path(args.experiment).stem}: {cfg.script}"))
    say(f"written: {out}/compare.md, compare.csv, compare_runs.csv, compare.png")
    return 0 if all(run_status(d).get("status") == "ok" for _, _, _, d in jobs) else 1


def cmd_batch(args, overrides: list[str]) -> int:
    """One script command per line (`[accelerate launch ...] train_X.py --config F key=value ...`;
    # comments); lines without output_dir= run in <out>/<nn>_<config name>; finished ones are skipped."""
    path = Path(args.list)
    if not path.is_file():
        raise SweepError(f"batch list not found: {path}")
    out = Path(args.out or f"runs/batch/{path.stem}")
    jobs = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = shlex.split(line, comments=True)
        k = next((i for i, p in enumerate(parts) if p.endswith(".py")), None)
        if k is None or "--config" not in parts:
            raise SweepError(f"{path}:{lineno}: expected '[launcher] train_X.py --config FILE [key=value ...]': {line}")
        rest = [*parts[k + 1:], *overrides]
        given = [p for p in rest if p.startswith("output_dir=")]
        run_dir = Path(given[-1].split("=", 1)[1]) if given else \
            out / f"{len(jobs):02d}_{Path(parts[parts.index('--config') + 1]).stem}"
        cmd = [*launcher_cmd(shlex.join(parts[:k]) or "python"), parts[k], *rest]
        jobs.append((cmd + ([] if given else [f"output_dir={run_dir}"]), run_dir))
    todo = [j for j in jobs if args.rerun or run_status(j[1]).get("status") != "ok"]
    say(f"batch {path}: {len(jobs)} runs, {len(jobs) - len(todo)} already finished")
    run_pool(todo, args.workers, _gpus(args.gpus), log=say)
    cols, rows = report_table([d for _, d in jobs])
    say(write_table(cols, rows, out / "report", f"batch {path}"))
    return 0 if all(run_status(d).get("status") == "ok" for _, d in jobs) else 1


def _gpus(text: str | None) -> list[int]:
    return [int(g) for g in text.split(",") if g.strip()] if text else []


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def pool_args(p):
        p.add_argument("--workers", type=int, default=0, help="runs at a time on this machine")
        p.add_argument("--gpus", help="e.g. 0,1,2,3: split between the workers (CUDA_VISIBLE_DEVICES)")

    def script_args(p):
        p.add_argument("--script", required=True, help="training script, e.g. train_seg.py")
        p.add_argument("--config", required=True, help="its config file")
        p.add_argument("--launcher", default="python", help='"python" or e.g. "accelerate launch --num_processes 2"')
        p.add_argument("--out", help="output folder")

    def best_args(p):
        p.add_argument("--folds", type=int, default=0, help="k folds of the best parameters (default: the sweep "
                                                              "file's folds)")
        p.add_argument("--seeds", type=int, nargs="+", default=[], help="or these seeds (default: the file's seeds)")
        p.add_argument("--no-ensemble", action="store_true", help="no ensemble evaluation of the fold models")

    p = sub.add_parser("run", help="run (or continue) a sweep; key=value overrides sweep-file keys")
    p.add_argument("sweep", help="sweep file (YAML), e.g. configs/sweeps/seg_sample.yaml")
    p.add_argument("--worker", type=int, help="index of this worker (sampler seed + i); set when started by hand")
    p.add_argument("--apply-best", action="store_true", help="then run the best parameters on --folds / --seeds")
    best_args(p)
    p.add_argument("--spawned", action="store_true", help=argparse.SUPPRESS)  # a worker started by --workers
    pool_args(p)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("summary", help="rewrite a sweep's summary.md, tables and plots")
    p.add_argument("sweep")
    p.set_defaults(fn=cmd_summary)
    p = sub.add_parser("apply-best", help="best parameters of a sweep on k folds (+ ensemble) or several seeds")
    p.add_argument("sweep")
    best_args(p)
    pool_args(p)
    p.set_defaults(fn=cmd_apply_best)
    p = sub.add_parser("folds", help="k-fold runs of a config, then an ensemble of the k best checkpoints")
    script_args(p)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--no-ensemble", action="store_true")
    p.add_argument("--rerun", action="store_true", help="repeat finished runs")
    pool_args(p)
    p.set_defaults(fn=cmd_folds)
    p = sub.add_parser("seeds", help="a config over several seeds: mean +- std of the final metrics")
    script_args(p)
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--ensemble", action="store_true", help="also evaluate the ensemble of the seeds' checkpoints")
    p.add_argument("--rerun", action="store_true", help="repeat finished runs")
    pool_args(p)
    p.set_defaults(fn=cmd_seeds)
    p = sub.add_parser("ensemble", help="evaluate the average prediction of run folders / checkpoints")
    script_args(p)
    p.add_argument("members", nargs="+", help="run folders (their checkpoints/best) or checkpoint folders/files")
    p.set_defaults(fn=cmd_ensemble)
    p = sub.add_parser("report", help="one table of best/final metrics and changed config keys of run folders")
    p.add_argument("runs", nargs="+", help="run folders, or folders to search for them")
    p.add_argument("--base", help="base config (YAML or run folder) to show changed keys against")
    p.add_argument("--metric", default="", help="key metric (default: each run's train.best_metric)")
    p.add_argument("--mode", default="", choices=["", "max", "min"])
    p.add_argument("--sort", action="store_true", help="best first (by the key metric)")
    p.add_argument("--out", help="write OUT.md and OUT.csv")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("compare", help="arms x seeds of an experiment file: mean +- std, paired difference to the "
                                       "baseline arm with a 95%% interval, curves")
    p.add_argument("experiment", help="experiment file (YAML), e.g. configs/compare/hand.yaml; keys: lib/runs.py "
                                      "CompareConfig")
    p.add_argument("--rerun", action="store_true", help="repeat finished runs")
    pool_args(p)
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("batch", help="run a list of script commands one after another (or --workers at a time)")
    p.add_argument("list", help="text file: one '[launcher] train_X.py --config F [key=value ...]' per line")
    p.add_argument("--out", help="folder of runs without output_dir= (default runs/batch/<list name>)")
    p.add_argument("--rerun", action="store_true", help="repeat finished runs")
    pool_args(p)
    p.set_defaults(fn=cmd_batch)
    return ap


def _stop(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # `kill` = Ctrl-C: the running trial is stopped and queued again


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = ["run", *argv]
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]  # key=value anywhere
    args = build_parser().parse_args([a for a in argv if a not in overrides])
    try:
        return args.fn(args, overrides)
    except (SweepError, ConfigError) as e:
        if os.environ.get("DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopped; the same command continues (a sweep re-runs the stopped trials)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    sys.exit(main())
