r"""3D hand pose: DINOv2 ViT backbone + "handec" transformer regressor head, progressive dropout.

Run (1 CPU, 1 GPU, N GPUs or N nodes: whatever `accelerate config` / the launch flags say):
  accelerate launch train_hand.py --config configs/hand/sample.yaml                     # bundled sample, CPU < 2 min
  accelerate launch train_hand.py --config configs/hand/hand3d_vits.yaml                # real hand3d set, CPU minutes
  accelerate launch --num_processes 8 train_hand.py --config configs/hand/dinov2_l_recipe.yaml \
      data.root=/data/freihand model.backbone_weights=dinov2_vitl14_pretrain.pth        # the seed's recipe
  python -m lib.data.make_shards --root /data/freihand --split training --out /data/freihand_wds
  accelerate launch train_hand.py --config configs/hand/dinov2_l_recipe.yaml data.format=webdataset \
      data.root=/data/freihand_wds                                                       # tar shards
  accelerate launch train_hand.py --config configs/hand/hand3d_vits.yaml eval_only=true \
      load_from=runs/hand3d_vits/checkpoints/best                                       # evaluate + overlays
  accelerate launch train_hand.py --config configs/hand/hand3d_vits.yaml resume=auto    # continue a run
  python train_hand.py --help                                                            # every config key

`model.backbone_weights` takes a local DINOv2 file in timm, facebookresearch hub or HF transformers
`Dinov2Model` layout (key mapping in lib/models/hand.py); `model.mano_path` an optional MANO model
file (without it the head regresses the 21 joints directly). Metrics: root-relative MPJPE and
PA-MPJPE in mm (mean and std over the validation set) next to `mpjpe_mean_pose`, the error of
predicting the training set's mean pose for every image.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lib.checkpoint import find_resume, load_checkpoint, load_weights, save_checkpoint, save_weights
from lib.config import RunConfig, TrainConfig, parse_config
from lib.data.common import make_loader
from lib.data.hand import HandDataConfig, HandDataset, label_stats, make_source, train_val_indices
from lib.logging import RunLog
from lib.losses.hand import LossWeights, hand_losses, project
from lib.metrics.hand import mpjpe, pa_mpjpe, save_overlay, summarize
from lib.models.hand import HandRegressor, convert_state_dict, dropout_at, layer_decay_groups
from lib.optim import build_optimizer, scaled_lr
from lib.runtime import UserError, cli_main, setup_run
from lib.schedules import lr_scheduler


@dataclass
class HandecConfig:
    dim: int = 1024
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    mlp_dim: int = 1024
    num_queries: int = 1
    ief_iters: int = 1  # 1 = direct regression; > 1 = iterative error feedback
    pose_repr: Literal["6d", "aa"] = "6d"
    dropout: float = 0.1  # reached after the warm-up (progressive dropout)
    dropout_warmup_step: int = 10000  # p = 0 before this optimizer step
    dropout_ramp: Literal["step", "linear"] = "step"  # jump to p, or rise linearly during the warm-up


@dataclass
class ModelConfig:
    backbone: Literal["vit_small_patch14_dinov2", "vit_base_patch14_dinov2", "vit_large_patch14_dinov2",
                      "vit_giant_patch14_dinov2"] = "vit_large_patch14_dinov2"
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    backbone_weights: str = ""  # local DINOv2 weights (timm / hub / HF layout); "" = random init
    mano_path: str = ""  # MANO_RIGHT .npz/.pkl; "" = regress joints directly
    layer_decay: float = 1.0  # layer-wise lr decay of the backbone (1 = off; optim.backbone_lr_mult still applies)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # timm overrides, e.g. {depth: 4} (not DINOv2 then)
    handec: HandecConfig = field(default_factory=HandecConfig)


@dataclass
class HandConfig(RunConfig):
    data: HandDataConfig = field(default_factory=HandDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(best_metric="mpjpe", best_mode="min"))
    save_vis: int = 8  # keypoint overlay PNG of this many validation crops per evaluation (0 = off)


def build_model(cfg: HandConfig) -> HandRegressor:
    m, h = cfg.model, cfg.model.handec
    return HandRegressor(m.backbone, cfg.data.img_size, m.drop_path_rate, h.dim, h.depth, h.heads, h.dim_head,
                         h.mlp_dim, 0.0, h.num_queries, h.ief_iters, h.pose_repr, m.mano_path, m.backbone_kwargs)


@torch.no_grad()
def evaluate(models: list, loader, accelerator, vis_path: Path | None = None, n_vis: int = 0) -> dict:
    """Root-relative MPJPE / PA-MPJPE (mm); several models = ensemble (mean joints and camera)."""
    for m in models:
        m.eval()
    errs: dict[str, list] = {"mpjpe": [], "pa_mpjpe": []}
    shown: list = []
    for batch in loader:
        outs = []
        for m in models:
            with accelerator.autocast():
                outs.append(m(batch["image"], batch["is_right"]))
        joints = torch.stack([o["joints"].float() for o in outs]).mean(0)  # (B, 21, 3) metres
        cam = torch.stack([o["cam"].float() for o in outs]).mean(0)  # (B, 3)
        gt = batch["joints3d"]
        e = accelerator.gather_for_metrics({"mpjpe": mpjpe(joints, gt) * 1000, "pa_mpjpe": pa_mpjpe(joints, gt) * 1000})
        for k in errs:
            errs[k].append(e[k].cpu())
        if vis_path is not None and sum(len(s[0]) for s in shown) < n_vis:
            kp = project(joints - joints[:, :1], cam)
            shown.append((batch["image"].cpu(), batch["joints2d"].cpu(), kp.cpu()))
    for m in models:
        m.train()
    if vis_path is not None and shown and accelerator.is_main_process:
        imgs, gt2d, pred2d = (torch.cat(t)[:n_vis] for t in zip(*shown))
        save_overlay(vis_path, imgs, gt2d, pred2d)
    return summarize({k: torch.cat(v) for k, v in errs.items()})


def mean_pose_mpjpe(train_ds: HandDataset, val_ds: HandDataset, max_train: int = 20000) -> float:
    """MPJPE (mm) of predicting the mean root-relative training pose (over <= max_train samples) for every
    validation sample."""
    idx = np.unique(np.linspace(0, len(train_ds) - 1, min(len(train_ds), max_train)).round().astype(int))
    mean = np.mean([train_ds.joints(int(i)) for i in idx], 0)
    val = torch.tensor(np.stack([val_ds.joints(i) for i in range(len(val_ds))]))
    return float(mpjpe(torch.tensor(mean).expand_as(val), val).mean()) * 1000


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(HandConfig, argv, __doc__)
    accelerator = setup_run(cfg, "hand")
    run_dir = Path(cfg.output_dir)
    log = RunLog(accelerator, run_dir, cfg.train.total_steps, log_interval=cfg.train.log_interval,
                 check_losses=cfg.train.check_finite)

    # ---- data
    train_src = make_source(cfg.data, cfg.data.train_split)
    if cfg.data.format == "hand3d" and not cfg.data.val_count:
        raise UserError("data.format=hand3d is one set: set data.val_count (e.g. 103) to hold out validation images")
    if cfg.data.val_count:  # hold out part of the train split (e.g. hand3d: 480 train / 103 val)
        train_idx, val_idx = train_val_indices(len(train_src), cfg.data)
        val_src = train_src
    else:
        train_idx = val_idx = None
        val_src = make_source(cfg.data, cfg.data.val_split)
    train_ds = HandDataset(train_src, cfg.data, train=True, seed=cfg.seed, indices=train_idx)
    val_ds = HandDataset(val_src, cfg.data, train=False, indices=val_idx)
    if len(train_ds) < cfg.train.batch_size * accelerator.num_processes:
        raise UserError(f"train set has {len(train_ds)} images, fewer than one global batch "
                        f"({cfg.train.batch_size} x {accelerator.num_processes} processes)")
    loader_kw = dict(num_workers=cfg.train.num_workers, pin_memory=accelerator.device.type == "cuda")
    train_loader = make_loader(train_ds, cfg.train.batch_size, shuffle=True, seed=cfg.seed, drop_last=True, **loader_kw)
    val_loader = make_loader(val_ds, cfg.train.batch_size, shuffle=False, **loader_kw)
    baseline = mean_pose_mpjpe(train_ds, val_ds)
    log.info(f"data: {len(train_ds)} train / {len(val_ds)} val images ({cfg.data.format}, {cfg.data.root}); "
             f"mean-pose baseline MPJPE {baseline:.2f} mm")

    # ---- model: initial state from the training labels, then optional weights
    model = build_model(cfg)
    model.set_init(**label_stats(train_ds))
    convert = functools.partial(convert_state_dict, model=model)
    if cfg.model.backbone_weights:
        load_weights(model, cfg.model.backbone_weights, convert, log=log.info)
    if cfg.load_from:
        load_weights(model, cfg.load_from, convert, strict=cfg.eval_only, log=log.info)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    log.info(f"model: {cfg.model.backbone} @ {cfg.data.img_size} + handec depth {cfg.model.handec.depth}, "
             f"{n_params:.2f}M params, joints from {'MANO' if cfg.model.mano_path else 'the head'}")

    # ---- optimizer and schedule (groups before compile: parameter names without _orig_mod)
    global_batch = cfg.train.batch_size * accelerator.num_processes * cfg.train.grad_accum_steps
    groups = layer_decay_groups(model, cfg.optim, cfg.model.layer_decay, lr=scaled_lr(cfg.optim, global_batch))
    optimizer = build_optimizer(groups, cfg.optim, accelerator.device)
    scheduler = lr_scheduler(optimizer, cfg.sched, cfg.train.total_steps)
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler)

    step = 0
    ckpt = find_resume(run_dir, cfg.resume)
    if ckpt is not None:
        step = load_checkpoint(accelerator, ckpt)["step"]
        log.info(f"resumed from {ckpt} at step {step}")

    if cfg.eval_only:
        members = [model]
        for path in cfg.ensemble:
            m = build_model(cfg)
            load_weights(m, path, convert, strict=True, log=log.info)
            members.append(accelerator.prepare_model(m, evaluation_mode=True))
        if cfg.ensemble and not cfg.load_from:
            members = members[1:]
        if not cfg.load_from and not cfg.ensemble and ckpt is None:
            raise UserError("eval_only=true needs load_from=PATH, ensemble=[...] or resume=PATH")
        result = evaluate(members, val_loader, accelerator, run_dir / "vis" / "eval.png", cfg.save_vis)
        if len(members) > 1:
            for i, m in enumerate(members):
                result |= {f"member{i}_{k}": v for k, v in evaluate([m], val_loader, accelerator).items()}
        log.eval(step, result | {"mpjpe_mean_pose": baseline})
        log.close()
        return result

    # ---- training loop
    h = cfg.model.handec
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.grad_accum_steps)
    epoch, skip = divmod(step, steps_per_epoch)
    best = None
    metrics: dict = {}
    key = cfg.train.best_metric or "mpjpe"
    model.train()
    while step < cfg.train.total_steps:
        train_loader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, skip * cfg.train.grad_accum_steps) if skip else train_loader
        skip = 0
        for batch in loader:
            p_drop = dropout_at(step, h.dropout, h.dropout_warmup_step, h.dropout_ramp)  # progressive dropout
            accelerator.unwrap_model(model).set_dropout(p_drop)
            with accelerator.accumulate(model):
                out = model(batch["image"], batch["is_right"])  # joints (B, 21, 3), cam (B, 3), pose, betas
                losses = hand_losses(out, batch, cfg.loss)
                loss = sum(losses.values())
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.clip_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
                lr = optimizer.param_groups[-1]["lr"]  # the head's (last group)
                optimizer.step()  # skipped by accelerate while accumulating
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            log.train_step(step, {"loss": loss} | losses, lr=lr, images=global_batch, extra={"dropout": p_drop})

            if step % cfg.train.eval_interval == 0 or step == cfg.train.total_steps:
                vis = run_dir / "vis" / f"step_{step}.png" if cfg.save_vis else None
                metrics = evaluate([model], val_loader, accelerator, vis, cfg.save_vis)
                log.eval(step, metrics | {"mpjpe_mean_pose": baseline})
                better = best is None or (metrics[key] > best if cfg.train.best_mode == "max" else metrics[key] < best)
                if better:
                    best = metrics[key]
                    save_weights(accelerator, model, run_dir / "checkpoints" / "best", {"step": step, key: best})
            if step % cfg.train.ckpt_interval == 0 or step == cfg.train.total_steps:
                save_checkpoint(accelerator, run_dir, step, {"epoch": epoch}, cfg.train.max_keep_ckpts)
            if step >= cfg.train.total_steps:
                break
        epoch += 1
    log.close()
    return metrics | {"mpjpe_mean_pose": baseline}


if __name__ == "__main__":
    cli_main(main)()
