"""Run set-up shared by the training scripts: accelerator, run folder, seeds, Ctrl-C stop, SyncBN, clean errors.

    accelerator = setup_run(cfg, "seg")   # run-folder rule, config.yaml, trackers, SIGINT/SIGTERM handlers
    while step < total and not stop_requested(accelerator): ...   # all processes stop at the same step
    cli_main(main)()                      # UserError family / ConfigError / FileNotFoundError -> one line
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration, set_seed
from torch import nn

from lib.config import RunConfig, flatten, save_config, to_dict
from lib.errors import UserError  # noqa: F401  (also importable from here, as before)


TRACKER_PACKAGES = {"wandb": "wandb", "aim": "aim", "mlflow": "mlflow"}  # tracker -> module (pip: mlflow-skinny suffices)
RUN_FILES = ("config.yaml", "checkpoints", "metrics.jsonl")  # any of these = the folder holds a run
START_FILES = {"config.yaml", "log.txt", "tb", "mlruns", "wandb", ".aim"}  # all a failed start may leave

_state = {"created": None, "started": False}  # run folder this process created; a train step was logged
_stop = {"signals": 0, "first": 0.0, "agreed": False, "previous": {}}


def _launcher_value(name: str) -> str:
    return os.environ.get(f"ACCELERATE_{name.upper()}", "")


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """Accelerator for 1 CPU / 1 GPU / N GPUs / N nodes, as `accelerate launch` / `accelerate config` set it.

    `mixed_precision` and `train.grad_accum_steps` pass to accelerate only when the config sets them
    (mixed_precision "" and grad_accum_steps 0 = unset: the launcher's value applies); a config value
    that differs from the launcher's is noted in the log.
    """
    run_dir = Path(cfg.output_dir)
    notes: list[str] = []
    kwargs: dict = {}
    mp = cfg.mixed_precision or ""
    if mp:
        launcher = _launcher_value("mixed_precision")
        if launcher and launcher != mp:
            notes.append(f"config mixed_precision={mp} overrides the launcher's {launcher}")
        kwargs["mixed_precision"] = mp
    accum = int(getattr(cfg.train, "grad_accum_steps", 0) or 0)
    if accum > 0:
        launcher = _launcher_value("gradient_accumulation_steps")
        if launcher and int(launcher) != accum:
            notes.append(f"config train.grad_accum_steps={accum} overrides the launcher's {launcher}")
        # a plugin, not gradient_accumulation_steps=: accelerate lets its env var win over that argument
        kwargs["gradient_accumulation_plugin"] = GradientAccumulationPlugin(num_steps=accum)
    tracker = None if cfg.tracker == "none" else cfg.tracker
    if tracker in TRACKER_PACKAGES and importlib.util.find_spec(TRACKER_PACKAGES[tracker]) is None:
        pkg = "mlflow-skinny" if tracker == "mlflow" else tracker
        raise UserError(f"tracker={tracker} needs the {tracker} package: pip install {pkg}")
    logging_dir = run_dir / {"tensorboard": "tb", "mlflow": "mlruns"}.get(cfg.tracker, "")
    accelerator = Accelerator(
        # without a GPU, processes started by torchrun / accelerate launch form a gloo (MULTI_CPU) group
        cpu=not torch.cuda.is_available(),
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(logging_dir)),
        # our samplers are deterministic per (seed, epoch); accelerate only shards their batches
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False),
        step_scheduler_with_optimizer=False,  # schedules are functions of the optimizer step
        **kwargs,
    )
    notes.append(f"mixed precision: {accelerator.mixed_precision}"
                 + (f"; gradient accumulation: {accelerator.gradient_accumulation_steps} steps"
                    if accelerator.gradient_accumulation_steps > 1 else ""))
    warn = world_size_warning(accelerator.num_processes)
    if warn:
        notes.append(warn)
    accelerator.run_notes = notes  # printed by RunLog at start
    if cfg.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg.seed, device_specific=True)  # seed + process index: different dropout/drop-path per process
    return accelerator


def world_size_warning(num_processes: int, env=None, launcher_cmdline: list[str] | None = None) -> str:
    """A warning when the launcher asked for more processes than the run got ("" if none).

    `accelerate launch --cpu --num_processes N` (without MPI) starts ONE process: it only sets
    MASTER_ADDR / ACCELERATE_USE_CPU. torchrun starts N gloo processes that accelerate joins.
    """
    env = os.environ if env is None else env
    requested = int(env.get("ACCELERATE_NUM_PROCESSES", "0") or 0)
    if not requested and "MASTER_ADDR" in env and "WORLD_SIZE" not in env and env.get("ACCELERATE_USE_CPU"):
        cmd = _parent_cmdline() if launcher_cmdline is None else launcher_cmdline
        requested = 2  # unknown N (e.g. from `accelerate config`): MASTER_ADDR is only set for N > 1
        for i, a in enumerate(cmd):
            if a.startswith("--num_processes="):
                requested = int(a.split("=", 1)[1])
            elif a in ("--num_processes", "--num-processes") and i + 1 < len(cmd) and cmd[i + 1].isdigit():
                requested = int(cmd[i + 1])
    if requested <= num_processes:
        return ""
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "train_x.py"
    return (f"warning: {requested} processes were requested but this run has {num_processes} (accelerate's multi-CPU "
            f"launch needs MPI); for {requested} CPU processes use: torchrun --nproc_per_node {requested} {script} ...")


def _parent_cmdline() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def holds_run(run_dir: str | Path) -> bool:
    """True when `run_dir` holds (part of) a training run: config.yaml, checkpoints/ or metrics.jsonl."""
    return any((Path(run_dir) / name).exists() for name in RUN_FILES)


def setup_run(cfg: RunConfig, project: str) -> Accelerator:
    """Accelerator + run folder with config.yaml; trackers started on the main process; Ctrl-C handlers.

    Run-folder rule: a new training run (no `resume`) into a folder that holds a run is refused,
    unless `overwrite=true` (which empties the folder first). `resume=auto|PATH` continues there;
    eval_only / predict / export runs never refuse and never delete (their config goes to
    config_<mode>.yaml when the folder already holds the run's config.yaml).
    """
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.\w+ is deprecated",
                            category=FutureWarning)
    accelerator = make_accelerator(cfg)
    # the calling script's file name (also when its main() is called in-process): checkpoint metadata
    accelerator.script_name = Path(sys._getframe(1).f_code.co_filename).name
    run_dir = Path(cfg.output_dir)
    mode = next((m for m in ("eval_only", "predict", "export") if getattr(cfg, m, "")), "")
    existed, held = run_dir.exists(), holds_run(run_dir)
    accelerator.wait_for_everyone()  # every process looked before the main one writes
    if held and not mode and not cfg.resume:
        if not getattr(cfg, "overwrite", False):
            raise UserError(f"output_dir {run_dir} already holds a run: continue it with resume=auto, "
                            f"or start afresh with overwrite=true (deletes its contents)")
        if accelerator.is_main_process:
            for child in run_dir.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    if cfg.resume == "auto" and not mode and accelerator.is_main_process:
        from lib.checkpoint import step_checkpoints

        if held and not step_checkpoints(run_dir):  # nothing to continue from: records restart at step 0
            truncate_records(run_dir, 0)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg_name = f"config_{mode}.yaml" if mode and (run_dir / "config.yaml").is_file() else "config.yaml"
        save_config(cfg, run_dir / cfg_name)
    _state["created"] = None if existed else run_dir
    _state["started"] = False
    accelerator.wait_for_everyone()
    install_stop_handlers()
    if cfg.tracker != "none":
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(to_dict(cfg)).items()}
        name = getattr(cfg, "project", "") or project
        run_name = getattr(cfg, "run_name", "") or run_dir.resolve().name
        kwargs = {"wandb": {"wandb": {"name": run_name, "dir": str(run_dir)}},
                  "mlflow": {"mlflow": {"run_name": run_name}},
                  "aim": {"aim": {"experiment": name}}}.get(cfg.tracker, {})
        if cfg.tracker == "mlflow" and accelerator.is_main_process:
            import mlflow

            uri = os.environ.get("MLFLOW_TRACKING_URI", "")
            if not uri:  # default: a local file store in the run folder
                uri = (run_dir / "mlruns").resolve().as_uri()
                mlflow.set_tracking_uri(uri)
            if uri.startswith("file:") or "://" not in uri:
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow >= 3.x refuses it otherwise
        accelerator.init_trackers(run_name if cfg.tracker == "aim" else name, config=flat, init_kwargs=kwargs)
    return accelerator


def truncate_records(run_dir: str | Path, step: int) -> None:
    """Drop the records after `step` from train.jsonl and metrics.jsonl (a resume redoes those steps)."""
    for name in ("train.jsonl", "metrics.jsonl"):
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except (json.JSONDecodeError, AttributeError):
                continue  # a line cut by a kill
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(x + "\n" for x in keep))
        os.replace(tmp, path)


# ----------------------------------------------------------------------------- Ctrl-C / SIGTERM
def install_stop_handlers(signals=(signal.SIGINT, signal.SIGTERM)) -> None:
    """First SIGINT/SIGTERM: ask the loop to stop after this step (see `stop_requested`); a second one,
    more than a second later, exits at once with code 130. (A launcher that forwards the terminal's
    Ctrl-C sends the same signal again within milliseconds: that copy is ignored.)"""
    _stop.update(signals=0, first=0.0, agreed=False)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in signals:
        previous = signal.signal(sig, _on_signal)
        if previous is not _on_signal:
            _stop["previous"][sig] = previous


def restore_stop_handlers() -> None:
    """Put back the handlers that were there before `install_stop_handlers` (RunLog.close calls it)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, previous in _stop["previous"].items():
        signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    _stop["previous"] = {}


def _on_signal(signum, frame) -> None:
    now = time.monotonic()
    if _stop["signals"] and now - _stop["first"] > 1.0:
        print(f"\n{signal.Signals(signum).name} again: exiting now without saving", file=sys.stderr, flush=True)
        os._exit(130)
    if not _stop["signals"]:
        _stop.update(signals=1, first=now)
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)


def stop_requested(accelerator=None) -> bool:
    """True once SIGINT/SIGTERM arrived on any process (OR over processes, so all stop at the same step).

    Call it at the same points on every process (once per optimizer step); it costs one tiny
    all-reduce when several processes run, nothing on one. Once True it stays True.
    """
    if _stop["agreed"]:
        return True
    flag = bool(_stop["signals"])
    if accelerator is not None and accelerator.num_processes > 1:
        t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
        flag = bool(accelerator.reduce(t, reduction="sum").item() > 0)
    _stop["agreed"] = flag
    return flag




class _AllReduceSyncBN(nn.BatchNorm2d):
    """BatchNorm2d whose batch statistics are all-reduced over processes on any backend (gloo too).

    torch's SyncBatchNorm runs on GPUs only; this one makes an N-process CPU run compute the
    same normalisation (and so the same result) as one process with the global batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        n = torch.tensor([x.shape[0] * x.shape[2] * x.shape[3]], dtype=x.dtype, device=x.device)
        stats = all_reduce(torch.cat([x.sum(dim=(0, 2, 3)), n]))  # autograd-aware sum over processes
        count = stats[-1]
        mean = stats[:c] / count
        # second pass on centred values: E[x^2] - E[x]^2 loses precision when |mean| >> std
        var = all_reduce((x - mean[None, :, None, None]).pow(2).sum(dim=(0, 2, 3))) / count
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * count / (count - 1))
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Synchronised BatchNorm when several processes train: torch's on GPUs, an all-reduce one on CPU."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = _AllReduceSyncBN(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return model


def peak_memory_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def cli_main(fn):
    """Run `fn()`; user errors (lib.errors.UserError and subclasses, ConfigError, FileNotFoundError) exit
    with one line "error: ..." and code 1 (set DEBUG=1 for the traceback). A start that failed before
    the first training step removes the run folder it created (when it holds only config/log files)."""
    from lib.config import ConfigError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, ConfigError, FileNotFoundError) as e:
            if os.environ.get("DEBUG"):
                raise
            _remove_failed_start()
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper


def _remove_failed_start() -> None:
    run_dir = _state["created"]
    if run_dir is None or _state["started"] or not run_dir.is_dir():
        return
    if {p.name for p in run_dir.iterdir()} <= START_FILES:
        shutil.rmtree(run_dir, ignore_errors=True)
    _state["created"] = None
