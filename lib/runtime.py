"""Run set-up shared by the training scripts: accelerator, run folder, seeds, SyncBN, clean errors."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch import nn

from lib.config import RunConfig, save_config, to_dict


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """Accelerator for 1 CPU / 1 GPU / N GPUs / N nodes, as `accelerate launch` configured it."""
    run_dir = Path(cfg.output_dir)
    tracker = None if cfg.tracker == "none" else cfg.tracker
    accelerator = Accelerator(
        # without a GPU, processes started by torchrun / accelerate launch form a gloo (MULTI_CPU) group
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb")),
        # our samplers are deterministic per (seed, epoch); accelerate only shards their batches
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False),
        step_scheduler_with_optimizer=False,  # schedules are functions of the optimizer step
    )
    if cfg.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg.seed, device_specific=True)  # seed + process index: different dropout/drop-path per process
    return accelerator


def setup_run(cfg: RunConfig, project: str) -> Accelerator:
    """Accelerator + run folder with config.yaml; trackers started on the main process."""
    accelerator = make_accelerator(cfg)
    run_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    if cfg.tracker != "none":
        flat = _flatten(to_dict(cfg))
        accelerator.init_trackers(project, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                   for k, v in flat.items()})
    return accelerator


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


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


class UserError(RuntimeError):
    """Bad input from the user (data, weights, config): shown as one line, no traceback."""


def cli_main(fn):
    """Run `fn()`; known input errors exit with a one-line message (set DEBUG=1 for the traceback)."""
    from lib.checkpoint import WeightFileError
    from lib.config import ConfigError
    from lib.logging import NonFiniteLossError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, ConfigError, WeightFileError, NonFiniteLossError, FileNotFoundError) as e:
            if os.environ.get("DEBUG"):
                raise
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper
