"""Parameter groups (no weight decay on norms/biases/tokens, head lr multiplier, optional layer-wise
lr decay) and optimizers."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lib.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig, head_prefixes: tuple[str, ...] = (),
                 lr: float | None = None, layer_id: Callable[[str], int] | None = None, layer_decay: float = 1.0,
                 num_layers: int = 0) -> list[dict]:
    """Split trainable params into (head|backbone) x (decay|no_decay) groups with their lr.

    No decay: 1-d params (norms, biases), and names the model lists in `no_weight_decay()`
    (timm's interface: position embeddings, tokens). Head: names starting with a prefix in
    `head_prefixes`; its lr is `lr * head_lr_mult`, the rest `lr * backbone_lr_mult`
    (`lr` defaults to cfg.lr; pass `scaled_lr(cfg, global_batch)` for the linear scaling rule).

    Layer-wise lr decay (BEiT / MAE fine-tuning): with `layer_id` (parameter name -> 0..num_layers,
    supplied by the model) and `layer_decay` != 1, each non-head group is split per layer and its lr
    multiplied by layer_decay ** (num_layers - layer_id); the head keeps its lr.
    """
    lr = cfg.lr if lr is None else lr
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = cfg.no_decay_norm_bias and (p.ndim <= 1 or name.endswith(".bias") or any(s in name for s in skip))
        head = any(name.startswith(h) for h in head_prefixes)
        groups.setdefault((head, no_decay), []).append(p)
    out = []
    for (head, no_decay), params in sorted(groups.items()):
        mult = cfg.head_lr_mult if head else cfg.backbone_lr_mult
        out.append({
            "params": params,
            "lr": lr * mult,
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            "name": f"{'head' if head else 'backbone'}{'_no_decay' if no_decay else ''}",
        })
    if layer_id is None or layer_decay == 1.0:
        return out
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = []
    for g in out:
        if g["name"].startswith("head"):
            decayed.append(g)
            continue
        by_layer: dict[int, list] = {}
        for p in g["params"]:
            by_layer.setdefault(layer_id(names[id(p)]), []).append(p)
        for i, params in sorted(by_layer.items()):
            decayed.append({**g, "params": params, "lr": g["lr"] * layer_decay ** (num_layers - i),
                            "name": f"{g['name']}_layer{i}"})
    return decayed


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): lr * global_batch / base_batch_size, if enabled."""
    return cfg.lr * global_batch / cfg.base_batch_size if cfg.scale_lr_with_batch else cfg.lr


def build_optimizer(groups: list[dict], cfg: OptimConfig, device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """Optimizer over `groups` (each carries its own lr / weight decay); fused kernels on CUDA."""
    fused = {"fused": True} if cfg.fused and torch.device(device).type == "cuda" else {}
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **fused)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **fused)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, **fused)
    if cfg.name == "radam":
        return torch.optim.RAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 decoupled_weight_decay=True)
    raise ValueError(f"unknown optimizer '{cfg.name}'")
