"""Console progress (rich), log.txt, metrics.jsonl and tracker logging for a run.

    log = RunLog(accelerator, run_dir, total_steps, start_step, log_interval)
    log.micro_batch({"loss_ce": l1, "loss_kd": l2})  # every backward, also while gradients accumulate
    log.train_step(step, lr=..., images=global_batch)  # every optimizer step: logs the micro-batches' mean
    log.train_step(step, {"loss": l}, lr=..., images=b)  # the same in one call, for a loop without accumulation
    log.eval(step, {"mIoU": 71.2, ...})                                             # each evaluation
    log.resumed(step, ckpt)       # after load_checkpoint: drops records after `step`, marks log.txt
    log.interrupted(step, path)   # after the Ctrl-C checkpoint: one line saying how to continue
A non-finite loss raises NonFiniteLossError naming the step and the loss. The notes of setup_run
(effective mixed precision, overrides, world-size warning) are printed first.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


from lib.errors import UserError


class NonFiniteLossError(UserError, FloatingPointError):
    """A NaN / inf loss: the message names the step and the loss term."""


def fmt(v: float) -> str:
    """A number that stays readable at any size: 0.1234, 12.35, 1.5e-05 (never 0.0000 for a small term)."""
    if v == 0 or not math.isfinite(v):
        return f"{v:.4g}"
    return f"{v:.4f}" if 1e-2 <= abs(v) < 1e4 else f"{v:.4g}"


def make_console() -> Console:
    """rich console; without a terminal (a file, a pipe, a job log) lines are never wrapped at 80 columns."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=200, soft_wrap=True)
    return console


def check_finite(losses: dict[str, torch.Tensor], step: int) -> None:
    """Raise NonFiniteLossError naming the first NaN/inf loss (one host sync)."""
    vals = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
    if not bool(torch.isfinite(vals).all()):
        for (name, v), x in zip(losses.items(), vals.tolist()):
            if not (x == x and abs(x) != float("inf")):
                raise NonFiniteLossError(f"non-finite loss at step {step}: {name} = {x}")


PLOT_EVERY_S = 60.0  # metrics.png / losses.png are redrawn at an evaluation at most this often, and at close()


class RunLog:
    def __init__(self, accelerator, run_dir: str | Path, total_steps: int, start_step: int = 0,
                 log_interval: int = 10, check_losses: bool = True):
        self.acc = accelerator
        self.main = accelerator.is_main_process
        self.run_dir = Path(run_dir)
        self.total, self.log_interval, self.check_losses = total_steps, max(log_interval, 1), check_losses
        self.console = make_console()
        self._sums: dict[str, torch.Tensor] = {}
        self._n, self._images, self._t = 0, 0, time.perf_counter()
        self._micro: dict[str, torch.Tensor] = {}  # loss sums over the micro-batches of the current step
        self._micro_n = 0
        self.progress = None
        self._last_plot = time.perf_counter()
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.run_dir / "log.txt", "a")
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.description}"),
                                     console=self.console, transient=False, disable=not self.console.is_terminal)
            self.progress.start()
            self.task = self.progress.add_task("", total=total_steps, completed=start_step)
        for note in getattr(accelerator, "run_notes", []):
            self.info(note)

    def resumed(self, step: int, path: str | Path) -> None:
        """After a resume from checkpoint `path` at `step`: train.jsonl / metrics.jsonl keep only records up
        to `step` (the steps after it are redone) and log.txt gets a "resumed at step N" mark."""
        from lib.runtime import truncate_records

        if self.main:
            truncate_records(self.run_dir, step)
            if self.progress is not None:
                self.progress.update(self.task, completed=step)
        self.info(f"---- resumed at step {step} from {path} (records after step {step} dropped)")

    def interrupted(self, step: int, path: str | Path) -> None:
        """The one line after a Ctrl-C / SIGTERM stop (the checkpoint at `path` is already written)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.info(f"interrupted at step {step}; checkpoint saved to {path}; continue with resume=auto")

    def info(self, msg: str) -> None:
        if self.main:
            self.console.print(msg, markup=False)
            self._log_file.write(msg + "\n")
            self._log_file.flush()

    def micro_batch(self, losses: dict[str, torch.Tensor]) -> None:
        """Record the losses of one micro-batch (call it for every backward, also while gradients
        accumulate); the next `train_step` logs their mean, i.e. the loss of the whole optimizer step."""
        for k, v in losses.items():
            self._micro[k] = self._micro.get(k, 0) + v.detach().float()
        self._micro_n += 1

    def train_step(self, step: int, losses: dict[str, torch.Tensor] | None = None, *, lr: float, images: int,
                   extra: dict[str, float] | None = None) -> None:
        """Record optimizer step `step` (1-based): the mean of its `micro_batch` losses (or `losses`, for
        a loop without accumulation); print/log every log_interval steps."""
        from lib.runtime import _state

        _state["started"] = True
        if losses is not None:
            self.micro_batch(losses)
        if not self._micro_n:
            raise ValueError("RunLog.train_step: no losses (call micro_batch for each micro-batch, or pass losses)")
        means = {k: v / self._micro_n for k, v in self._micro.items()}
        self._micro, self._micro_n = {}, 0
        if self.check_losses:  # one host sync per step; a NaN in any micro-batch makes the mean NaN
            check_finite(means, step)
        for k, v in means.items():
            self._sums[k] = self._sums.get(k, 0) + v
        self._n += 1
        self._images += images
        if self.progress is not None:
            self.progress.update(self.task, completed=step)
        if step % self.log_interval and step != self.total:
            return
        dt = time.perf_counter() - self._t
        means = {k: float(v) / self._n for k, v in self._sums.items()}
        ips = self._images / max(dt, 1e-9)
        device = self.acc.device
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        eta = (self.total - step) * dt / self._n
        fields = {"lr": lr, **means, **(extra or {}), "img/s": ips}
        line = (f"step {step}/{self.total}  lr {lr:.3e}  " + "  ".join(f"{k} {fmt(v)}" for k, v in means.items())
                + "".join(f"  {k} {fmt(v)}" for k, v in (extra or {}).items())
                + f"  img/s {ips:.1f}" + (f"  mem {mem:.2f}GB" if mem else "") + f"  eta {_fmt_time(eta)}")
        if self.progress is not None and self.progress.console.is_terminal:
            self.progress.update(self.task, description=f"lr {lr:.2e} " + " ".join(f"{k} {v:.3g}" for k, v in means.items()) + f" {ips:.0f} img/s")
            self._log_file.write(line + "\n")
            self._log_file.flush()
        else:
            self.info(line)
        if self.main:
            with open(self.run_dir / "train.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **fields}) + "\n")
        self.acc.log({f"train/{k}": v for k, v in fields.items()}, step=step)
        self._sums, self._n, self._images, self._t = {}, 0, 0, time.perf_counter()

    def eval(self, step: int, metrics: dict[str, float], prefix: str = "val") -> None:
        """Append {"step": step, **metrics} to metrics.jsonl, print it and send it to the tracker."""
        if self.main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            self.info(f"eval @ step {step}: " + "  ".join(f"{k} {fmt(v)}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in metrics.items() if isinstance(v, (int, float))))
            # redraw the pictures at most once a minute while training (matplotlib costs seconds per
            # call on a CPU box); close() always draws the final ones
            if time.perf_counter() - self._last_plot >= PLOT_EVERY_S:
                plot_curves(self.run_dir)
                self._last_plot = time.perf_counter()
        self.acc.log({f"{prefix}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        from lib.runtime import restore_stop_handlers

        if self.progress is not None:
            self.progress.stop()
        if self.main:
            self._log_file.close()
            plot_curves(self.run_dir)
        self.acc.end_training()
        # last: a second Ctrl-C while the pictures are drawn or the trackers finish still exits at once (130)
        restore_stop_handlers()


def _fmt_time(sec: float) -> str:
    sec = int(sec)
    return f"{sec // 3600}:{sec % 3600 // 60:02d}:{sec % 60:02d}"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl (empty list if none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(run_dir: str | Path) -> None:
    """metrics.png (every scalar of metrics.jsonl) and losses.png (train.jsonl) in the run folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    for src, dst in (("metrics.jsonl", "metrics.png"), ("train.jsonl", "losses.png")):
        path = run_dir / src
        if not path.is_file():
            continue
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        keys = [k for k in rows[-1] if k != "step" and isinstance(rows[-1][k], (int, float)) and k != "img/s"]
        if not keys:
            continue
        ncols = min(len(keys), 4)  # a grid, at most 4 panels per row
        nrows = math.ceil(len(keys) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
        for ax in axes.flat[len(keys):]:
            ax.axis("off")
        for ax, k in zip(axes.flat, keys):
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None)
            ax.set_title(k, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
        fig.subplots_adjust(left=0.25 / ncols, right=1 - 0.05 / ncols, bottom=0.18 / nrows, top=1 - 0.12 / nrows,
                            wspace=0.45, hspace=0.55)
        fig.savefig(run_dir / dst, dpi=72)
        plt.close(fig)
