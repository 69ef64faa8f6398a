"""Exponential moving average of a model's weights (fp32 copy), resumed exactly through accelerate.

    ema = ModelEMA(model, cfg.ema.decay, cfg.ema.start_step) if cfg.ema.decay else None  # after prepare
    if ema is not None:
        accelerator.register_for_checkpointing(ema)       # before load_checkpoint: resume restores it
    ...
    ema.update(model, step)                                # after each optimizer step (step is 1-based)
    evaluate([ema.module], ...)                            # a plain nn.Module in eval mode, on the device

Rule (timm ModelEmaV2 / YOLOv5): up to `start_step` the EMA copies the raw weights; after it, every
floating-point entry of the state dict (parameters and buffers such as BN running stats) becomes
    ema = decay * ema + (1 - decay) * raw
and integer buffers (num_batches_tracked) are copied.
"""

from __future__ import annotations

import copy

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    return extract_model_from_parallel(model, keep_torch_compile=False)


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float, start_step: int = 0):
        if not 0.0 <= decay < 1.0:
            from lib.errors import UserError

            raise UserError(f"ema.decay: {decay} is not in [0, 1)")
        self.decay, self.start_step, self.updates = float(decay), int(start_step), 0
        module = copy.deepcopy(_unwrap(model))
        for attr in ("forward", "_original_forward", "_converted_to_transformer_engine"):
            module.__dict__.pop(attr, None)  # accelerate's mixed-precision forward wrapper: use the class's forward
        self.module = module.float().eval().requires_grad_(False)

    def _pairs(self, model: nn.Module):
        src = _unwrap(model).state_dict()
        own = self.module.state_dict()
        if src.keys() != own.keys():
            raise ValueError("ModelEMA.update: the model's state dict keys differ from the EMA copy's")
        return [(own[k], src[k].detach()) for k in own]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Average the weights of `model` after optimizer step `step` into the EMA copy."""
        pairs = self._pairs(model)
        self.updates += 1
        if step <= self.start_step:
            for e, p in pairs:
                e.copy_(p)
            return
        avg = [(e, p) for e, p in pairs if e.is_floating_point()]
        if avg:
            ema_t = [e for e, _ in avg]
            # lerp(e, p, 1 - d) = e + (1 - d) * (p - e) = d * e + (1 - d) * p
            torch._foreach_lerp_(ema_t, [p.to(e.dtype) for e, p in avg], 1.0 - self.decay)
        for e, p in pairs:
            if not e.is_floating_point():
                e.copy_(p)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "start_step": self.start_step, "updates": self.updates,
                "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.start_step, self.updates = state["decay"], state["start_step"], state["updates"]
        self.module.load_state_dict(state["module"])
