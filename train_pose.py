r"""Top-down 2D human pose on COCO keypoints: TokenPose / SDPose students with cycle self-distillation
and masked token distillation (random or attention-importance masking).

Run (1 CPU, 1 GPU, N GPUs or N nodes: whatever `accelerate config` / the launch flags say):
  accelerate launch train_pose.py --config configs/pose/sample.yaml                      # bundled sample, CPU < 2 min
  accelerate launch train_pose.py --config configs/pose/coco_mini.yaml                   # ../shared/data/coco_mini
  accelerate launch --num_processes 8 train_pose.py --config configs/pose/coco_s_v1.yaml data.root=data/coco
  accelerate launch train_pose.py --config configs/pose/seed_importance0.3.yaml seed=1    # one of the seed's runs
  accelerate launch train_pose.py --config configs/pose/coco_s_v1.yaml \
      load_from=runs/coco_s_v1/checkpoints/best                                         # fine-tune from best AP
  accelerate launch train_pose.py --config configs/pose/coco_s_v1.yaml eval_only=true \
      load_from=runs/coco_s_v1/checkpoints/best                                         # evaluate a checkpoint
  accelerate launch train_pose.py --config configs/pose/coco_s_v1.yaml eval_only=true \
      ensemble=[runs/a/checkpoints/best,runs/b/checkpoints/best]                        # heatmap-averaging ensemble
  accelerate launch train_pose.py --config configs/pose/coco_s_v1.yaml resume=auto       # continue a run
  accelerate launch train_pose.py --config configs/pose/sample.yaml save_vis=4           # + pose pictures in vis/
  python train_pose.py --help                                                            # every config key

Training uses ground-truth person boxes; evaluation uses `data.det_file` detections (or gt boxes
if empty). `load_from` takes this script's checkpoints and SDPose's mmpose checkpoints (key
mapping in lib/models/tokenpose.py).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from lib.checkpoint import find_resume, load_checkpoint, load_weights, save_checkpoint, save_weights
from lib.config import RunConfig, parse_config
from lib.data.coco import COCO_FLIP_PAIRS, COCO_KEYPOINTS, CocoPoseDataset, PoseDataConfig, draw_poses
from lib.data.common import make_loader, read_image
from lib.logging import RunLog
from lib.losses.pose import MaskedTokenDistilLoss, joints_mse, token_importance
from lib.metrics.pose import decode_heatmaps, evaluate_coco, heatmap_to_image, predict_heatmaps
from lib.models.tokenpose import TokenPose, convert_state_dict, tokenpose
from lib.optim import build_optimizer, param_groups, scaled_lr
from lib.runtime import UserError, cli_main, convert_sync_batchnorm, setup_run
from lib.schedules import lr_scheduler


@dataclass
class ModelConfig:
    name: Literal["t", "s-v1", "s-v2"] = "s-v1"  # SDPose preset
    cycle_num: int = 0  # transformer cycles in training (0 = the preset's)
    test_cycle: int = 1  # evaluation predicts from cycle test_cycle (SDPose: the first)
    depth: int = 0  # 0 = the preset's
    dim: int = 192
    heads: int = 8


@dataclass
class TokenDistilConfig:  # lib.losses.pose.MaskedTokenDistilLoss
    loss_weight: float = 5e-6  # SDPose's TokenDistilLoss weight; 0 = off
    mask_ratio: float = 0.0  # fraction of token positions left out of the distillation
    mask_strategy: Literal["random", "importance"] = "random"
    detach_teacher: bool = False


@dataclass
class LossConfig:
    heatmap_weight: float = 1.0  # JointsMSE (target weights), summed over cycles
    vis_token: TokenDistilConfig = field(default_factory=TokenDistilConfig)  # loss_vis_token_dist
    kpt_token: TokenDistilConfig = field(default_factory=TokenDistilConfig)  # loss_kpt_token_dist


@dataclass
class EpochPlan:
    """mmpose-style plan in epochs of the train set; total > 0 overrides train.total_steps,
    train.eval_interval, train.ckpt_interval and sched.milestones."""
    total: int = 0
    milestones: list[int] = field(default_factory=list)
    eval_interval: int = 10
    ckpt_interval: int = 10


@dataclass
class EvalConfig:
    batch_size: int = 32
    flip_test: bool = True
    shift_heatmap: bool = True
    decode: Literal["dark", "default", "argmax"] = "dark"  # dark = mmpose post_process='unbiased'
    blur_kernel: int = 11
    vis_thr: float = 0.2
    oks_thr: float = 0.9
    use_nms: bool = True


@dataclass
class PoseConfig(RunConfig):
    data: PoseDataConfig = field(default_factory=PoseDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    epochs: EpochPlan = field(default_factory=EpochPlan)
    eval: EvalConfig = field(default_factory=EvalConfig)
    save_vis: int = 0  # draw the predicted poses (after NMS) on this many val images per evaluation


def build_model(cfg: PoseConfig) -> TokenPose:
    m = cfg.model
    try:
        return tokenpose(m.name, num_joints=len(COCO_KEYPOINTS), image_size=tuple(cfg.data.image_size),
                         cycle_num=m.cycle_num or None, test_cycle=m.test_cycle, depth=m.depth or None,
                         dim=m.dim, heads=m.heads)
    except ValueError as e:  # sizes that do not fit together
        raise UserError(f"model config: {e}") from None


@torch.no_grad()
def evaluate(models: list, loader, cfg: PoseConfig, accelerator, val_ds, vis_dir: Path | None = None) -> list[dict]:
    """COCO keypoint metrics of each model and, with several, of their heatmap-averaged ensemble (last)."""
    for m in models:
        m.eval()
    rows: list[list[dict]] = [[] for _ in range(len(models) + (len(models) > 1))]
    for batch in loader:
        with accelerator.autocast():
            hms = [predict_heatmaps([m], batch["image"], COCO_FLIP_PAIRS, cfg.eval.flip_test, cfg.eval.shift_heatmap)
                   for m in models]  # each (B, J, h, w) float32
        if len(models) > 1:
            hms.append(torch.stack(hms).mean(0))
        for row, hm in zip(rows, hms):
            xy, maxval = decode_heatmaps(hm, cfg.eval.decode, cfg.eval.blur_kernel)  # (B, J, 2), (B, J)
            kpts = heatmap_to_image(xy, batch["center"], batch["scale"], (hm.shape[-1], hm.shape[-2]))
            row.append(accelerator.gather_for_metrics({
                "kpts": kpts, "maxval": maxval, "box_score": batch["box_score"],
                "area": batch["scale"].prod(-1), "image_id": batch["image_id"]}))
    for m in models:
        m.train()
    out = []
    for row in rows:
        r = {k: torch.cat([x[k] for x in row]).cpu().numpy() for k in row[0]}
        metrics, results = evaluate_coco(val_ds.coco, r["kpts"], r["maxval"], r["box_score"], r["area"],
                                         r["image_id"], cfg.eval.vis_thr, cfg.eval.oks_thr, cfg.eval.use_nms, True)
        out.append(metrics)
    if vis_dir is not None and accelerator.is_main_process:  # the last row: the ensemble or the single model
        vis_dir.mkdir(parents=True, exist_ok=True)
        files = {im["id"]: im["file_name"] for im in val_ds.coco["images"]}
        for image_id in sorted({p["image_id"] for p in results})[:cfg.save_vis]:
            poses = [np.array(p["keypoints"]).reshape(-1, 3) for p in results if p["image_id"] == image_id]
            img = draw_poses(read_image(val_ds.img_dir / files[image_id]), poses, cfg.eval.vis_thr)
            Image.fromarray(img).save(vis_dir / f"{Path(files[image_id]).stem}.jpg")
    return out


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(PoseConfig, sys.argv[1:] if argv is None else argv, __doc__)
    accelerator = setup_run(cfg, "pose")
    run_dir = Path(cfg.output_dir)

    # ---- data: gt boxes for training, detections (or gt boxes) for evaluation
    train_ds = CocoPoseDataset(cfg.data, "train", train=True, seed=cfg.seed)
    val_ds = CocoPoseDataset(cfg.data, "val", train=False)
    if len(train_ds) < cfg.train.batch_size * accelerator.num_processes:
        raise UserError(f"train set has {len(train_ds)} persons, fewer than one global batch "
                        f"({cfg.train.batch_size} x {accelerator.num_processes} processes)")
    loader_kw = dict(num_workers=cfg.train.num_workers, pin_memory=accelerator.device.type == "cuda")
    train_loader = make_loader(train_ds, cfg.train.batch_size, shuffle=True, seed=cfg.seed, drop_last=True, **loader_kw)
    val_loader = make_loader(val_ds, cfg.eval.batch_size, shuffle=False, **loader_kw)
    global_batch = cfg.train.batch_size * accelerator.num_processes * cfg.train.grad_accum_steps
    # optimizer steps per epoch, as len(prepared train_loader) / grad_accum (accelerate shards the batches)
    steps_per_epoch = math.ceil(math.ceil(len(train_ds) // cfg.train.batch_size / accelerator.num_processes)
                                / cfg.train.grad_accum_steps)
    if cfg.epochs.total:  # epoch plan -> steps
        cfg.train.total_steps = cfg.epochs.total * steps_per_epoch
        cfg.train.eval_interval = cfg.epochs.eval_interval * steps_per_epoch
        cfg.train.ckpt_interval = cfg.epochs.ckpt_interval * steps_per_epoch
        cfg.sched.milestones = [e * steps_per_epoch for e in cfg.epochs.milestones]
    log = RunLog(accelerator, run_dir, cfg.train.total_steps, log_interval=cfg.train.log_interval,
                 check_losses=cfg.train.check_finite)
    log.info(f"data: {len(train_ds)} train persons (gt boxes) / {len(val_ds)} val boxes "
             f"({'detections ' + cfg.data.det_file if cfg.data.det_file else 'gt boxes'}) from {cfg.data.root}; "
             f"{steps_per_epoch} steps/epoch")

    # ---- model and losses
    model = build_model(cfg)
    if cfg.load_from:
        load_weights(model, cfg.load_from, convert_state_dict, skip_mismatched=not cfg.eval_only, log=log.info)
    model = convert_sync_batchnorm(model, accelerator.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    log.info(f"model: TokenPose/SDPose-{cfg.model.name.upper()} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
             f"params, {model.cycle_num} cycles (eval: cycle {model.test_cycle})")
    num_joints = model.num_joints
    try:
        vis_loss = MaskedTokenDistilLoss(**vars(cfg.loss.vis_token))
        kpt_loss = MaskedTokenDistilLoss(**vars(cfg.loss.kpt_token))
    except ValueError as e:
        raise UserError(f"loss config: {e}") from None
    need_attn = vis_loss.needs_attention or kpt_loss.needs_attention  # importance masking reads the attention
    if cfg.compile:
        model = torch.compile(model)

    # ---- optimizer and schedule (Adam, linear lr scaling, warm-up + multistep)
    groups = param_groups(model, cfg.optim, head_prefixes=("head.", "_orig_mod.head."),
                          lr=scaled_lr(cfg.optim, global_batch))
    optimizer = build_optimizer(groups, cfg.optim, accelerator.device)
    scheduler = lr_scheduler(optimizer, cfg.sched, cfg.train.total_steps)
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler)

    step = 0
    ckpt = find_resume(run_dir, cfg.resume)
    if ckpt is not None:
        step = load_checkpoint(accelerator, ckpt)["step"]
        log.info(f"resumed from {ckpt} at step {step}")

    if cfg.eval_only:
        members = [model] if (cfg.load_from or ckpt is not None) else []
        for path in cfg.ensemble:
            m = build_model(cfg)
            load_weights(m, path, convert_state_dict, strict=True, log=log.info)
            members.append(accelerator.prepare_model(m, evaluation_mode=True))
        if not members:
            raise UserError("eval_only=true needs load_from=PATH, ensemble=[...] or resume=PATH")
        results = evaluate(members, val_loader, cfg, accelerator, val_ds, run_dir / "vis" if cfg.save_vis else None)
        result = dict(results[-1])  # the ensemble (or the single model)
        if len(members) > 1:
            for i, r in enumerate(results[:-1]):
                result |= {f"member{i}_{k}": r[k] for k in ("AP", "AP50", "AP75", "AR")}
        log.eval(step, result)
        log.close()
        return result

    # ---- training loop
    epoch, skip = divmod(step, max(steps_per_epoch, 1))
    best = None
    metrics: dict = {}
    model.train()
    while step < cfg.train.total_steps:
        train_loader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, skip * cfg.train.grad_accum_steps) if skip else train_loader
        skip = 0
        for batch in loader:
            img, target, weight = batch["image"], batch["target"], batch["target_weight"]  # (B,3,H,W) (B,J,h,w) (B,J)
            if cfg.channels_last:
                img = img.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                outs = model(img, need_attn=need_attn)  # one dict per cycle
                losses = {"loss_heatmap": cfg.loss.heatmap_weight * sum(joints_mse(o["heatmap"], target, weight)
                                                                        for o in outs)}
                if len(outs) > 1:  # SDPose: the deeper cycle i+1 teaches cycle i, visual and keypoint tokens apart
                    vis = kpt = 0.0
                    for s, t in zip(outs[:-1], outs[1:]):
                        vis_imp, kpt_imp = token_importance(t["attn"], num_joints) if need_attn else (None, None)
                        vis = vis + vis_loss(s["vis_token"], t["vis_token"], vis_imp)
                        kpt = kpt + kpt_loss(s["kpt_token"], t["kpt_token"], kpt_imp)
                    losses |= {"loss_vis_token_dist": vis, "loss_kpt_token_dist": kpt}
                loss = sum(losses.values())
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.clip_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()  # skipped by accelerate while accumulating
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            log.train_step(step, {"loss": loss} | losses if len(losses) > 1 else losses, lr=lr, images=global_batch)

            if step % cfg.train.eval_interval == 0 or step == cfg.train.total_steps:
                metrics = evaluate([model], val_loader, cfg, accelerator, val_ds,
                                   run_dir / "vis" / f"step_{step}" if cfg.save_vis else None)[0]
                log.eval(step, metrics)
                key = cfg.train.best_metric or "AP"
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
    return metrics


if __name__ == "__main__":
    cli_main(main)()
