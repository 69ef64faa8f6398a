"""Schedules as pure functions of the (optimizer) step.

`schedule_factor(step, total_steps, cfg, base)` returns a factor of a base value. It drives the lr
(through `lr_scheduler`, a LambdaLR so per-group multipliers are kept) and equally dropout
rates or loss weights: `value = base * schedule_factor(step, total, cfg, base)`.

Decay kinds (T = cfg.t_max or total_steps, t = step / T clamped to [0, 1]; floor m = cfg.min_factor,
or eta_min / base when cfg.eta_min is set, so that lr = eta_min + (base - eta_min) * ... as torch):
  constant   1
  step       gamma ** (step // step_size)                                   (torch StepLR)
  multistep  gamma ** (number of milestones <= step)                        (torch MultiStepLR)
  cosine     m + (1 - m) * (1 + cos(pi x)) / 2, x = step / t_max not clamped (past t_max it rises
             again, as torch's CosineAnnealingLR), or x = t when t_max = 0 (the floor after total_steps)
  linear     m + (1 - m) * (1 - t)                                          (torch LinearLR)
  poly       m + (1 - m) * (1 - t) ** power                       (mmseg's PolyLR, torch PolynomialLR)
  sgdr       cosine restarted every period, periods T_0, T_0*T_mult, ...  (Loshchilov & Hutter)
All count from step 0. Warm-up multiplies the decay factor during the first `warmup_steps` (mmcv style):
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


def _floor(cfg: ScheduleConfig, base: float | None) -> float:
    """The decay floor as a fraction of `base`: eta_min / base when eta_min is set, else min_factor."""
    if cfg.eta_min is None:
        return cfg.min_factor
    if base is None:
        raise ValueError("sched.eta_min is an absolute value: schedule_factor needs the base value (base=...)")
    return cfg.eta_min / base if base > 0 else 0.0  # a group at lr 0 (frozen) stays at 0


def decay_factor(step: int, total_steps: int, cfg: ScheduleConfig, base: float | None = None) -> float:
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        return cfg.gamma ** (step // max(cfg.step_size, 1))
    if cfg.name == "multistep":
        return cfg.gamma ** sum(step >= s for s in cfg.milestones)
    period = max(cfg.t_max or total_steps, 1)
    t = min(max(step / period, 0.0), 1.0)
    m = _floor(cfg, base)
    if cfg.name == "cosine":  # an explicit t_max continues past T like torch; T = total_steps stays at the floor
        x = step / period if cfg.t_max else t
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * x))
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


def schedule_factor(step: int, total_steps: int, cfg: ScheduleConfig, base: float | None = None) -> float:
    """Factor of `base` at optimizer step `step`; `base` is needed only when cfg.eta_min is set."""
    return warmup_factor(step, cfg) * decay_factor(step, total_steps, cfg, base)


def lr_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int):
    """LambdaLR over `schedule_factor`, one lambda per param group (its base lr sets the eta_min
    fraction); call `.step()` once per optimizer step."""
    bases = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda s, b=b: schedule_factor(s, total_steps, cfg, b) for b in bases])
