"""Schedules as pure functions of the (optimizer) step.

`schedule_factor(step, total_steps, cfg)` returns a factor of a base value. It drives the lr
(through `lr_scheduler`, a LambdaLR so per-group multipliers are kept) and equally dropout
rates or loss weights: `value = base * schedule_factor(step, total, cfg)`.

Decay kinds (t = step / total_steps, clamped to [0, 1]; m = cfg.min_factor):
  constant   1
  step       gamma ** (step // step_size)
  multistep  gamma ** (number of milestones <= step)
  cosine     m + (1 - m) * (1 + cos(pi t)) / 2
  linear     m + (1 - m) * (1 - t)
  poly       m + (1 - m) * (1 - t) ** power                       (mmseg's PolyLR)
  sgdr       cosine restarted every period, periods T_0, T_0*T_mult, ...  (Loshchilov & Hutter)
Warm-up multiplies the decay factor during the first `warmup_steps` (mmcv style):
  linear     w = s + (1 - s) * step / warmup_steps
  hold       w = s            (s = warmup_start_factor; e.g. dropout 0 until a step, then on)
"""

from __future__ import annotations

import math

import torch

from lib.config import ScheduleConfig


def _sgdr_position(step: int, period: int, mult: float) -> tuple[int, int]:
    """(steps into the current period, its length) for warm restarts."""
    if mult == 1.0:
        return step % period, period
    t, length = step, period
    while t >= length:
        t -= length
        length = int(round(length * mult))
    return t, length


def decay_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    t = min(max(step / max(total_steps, 1), 0.0), 1.0)
    m = cfg.min_factor
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** (step // max(cfg.step_size, 1))
    if cfg.name == "multistep":
        return cfg.gamma ** sum(step >= s for s in cfg.milestones)
    if cfg.name == "cosine":
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.name == "linear":
        return m + (1 - m) * (1 - t)
    if cfg.name == "poly":
        return m + (1 - m) * (1 - t) ** cfg.power
    if cfg.name == "sgdr":
        pos, length = _sgdr_position(step, max(cfg.restart_period, 1), cfg.restart_mult)
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * pos / length))
    raise ValueError(f"unknown schedule '{cfg.name}'")


def warmup_factor(step: int, cfg: ScheduleConfig) -> float:
    if step >= cfg.warmup_steps:
        return 1.0
    s = cfg.warmup_start_factor
    if cfg.warmup_mode == "hold":
        return s
    return s + (1 - s) * step / cfg.warmup_steps


def schedule_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    return warmup_factor(step, cfg) * decay_factor(step, total_steps, cfg)


def lr_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int):
    """LambdaLR over `schedule_factor`; call `.step()` once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule_factor(s, total_steps, cfg))
