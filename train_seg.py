r"""Semantic segmentation with SegFormer (MiT-B0..B5) and optional teacher -> student distillation.

Run (1 CPU, 1 GPU, N GPUs or N nodes: whatever `accelerate config` / the launch flags say):
  accelerate launch train_seg.py --config configs/seg/sample.yaml                       # bundled sample, CPU < 2 min
  accelerate launch train_seg.py --config configs/seg/camvid_b0.yaml data.root=../shared/data/camvid
  accelerate launch --num_processes 8 train_seg.py --config configs/seg/camvid_b2.yaml mixed_precision=bf16
  accelerate launch train_seg.py --config configs/seg/camvid_b0_kd_b2.yaml \
      kd.teacher_weights=runs/camvid_b2/checkpoints/best                                  # distil B2 -> B0
  accelerate launch train_seg.py --config configs/seg/camvid_b0.yaml eval_only=true \
      load_from=runs/camvid_b0/checkpoints/best --save-vis                               # evaluate + overlays
  accelerate launch train_seg.py --config configs/seg/camvid_b0.yaml resume=auto        # continue a run
  python train_seg.py --help                                                             # every config key

`load_from` takes this script's checkpoints, HF transformers SegFormer files/folders, NVlabs
SegFormer .pth and MiT ImageNet backbone .pth (key mapping in lib/models/segformer.py).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lib.checkpoint import find_resume, load_checkpoint, load_weights, save_checkpoint, save_weights
from lib.config import RunConfig, parse_config
from lib.data.common import kfold_indices, make_loader
from lib.data.seg import SegDataConfig, SegFolderDataset, colorize, denormalize, list_pairs
from lib.logging import RunLog
from lib.losses import seg_kd
from lib.metrics.seg import class_table, confusion_matrix, seg_metrics
from lib.models.segformer import SegFormer, convert_state_dict
from lib.optim import build_optimizer, param_groups, scaled_lr
from lib.runtime import UserError, cli_main, convert_sync_batchnorm, setup_run
from lib.schedules import lr_scheduler


@dataclass
class ModelConfig:
    variant: str = "b0"  # b0..b5
    drop_path_rate: float = 0.1
    decoder_dropout: float = 0.1
    grad_checkpointing: bool = False


@dataclass
class KDTerm:
    weight: float = 0.0  # 0 = off
    temperature: float = 1.0  # kl, cwd
    stages: list[int] = field(default_factory=lambda: [3])  # at, sp: encoder stages 0..3


@dataclass
class KDConfig:
    teacher_variant: str = ""  # "" = no distillation
    teacher_weights: str = ""  # checkpoint of this script (e.g. runs/b2/checkpoints/best) or HF/NVlabs file
    kl: KDTerm = field(default_factory=lambda: KDTerm(temperature=4.0))
    cwd: KDTerm = field(default_factory=lambda: KDTerm(temperature=4.0))
    at: KDTerm = field(default_factory=lambda: KDTerm(stages=[0, 1, 2, 3]))
    sp: KDTerm = field(default_factory=lambda: KDTerm(stages=[3]))


@dataclass
class EvalConfig:
    mode: str = "whole"  # whole | slide
    crop_size: tuple[int, int] = (512, 512)  # slide window (H, W)
    stride: tuple[int, int] = (341, 341)


@dataclass
class SegConfig(RunConfig):
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    save_vis: int = 0  # write this many (image | prediction | truth) overlays per evaluation


def slide_logits(model, img: torch.Tensor, num_classes: int, crop: tuple[int, int], stride: tuple[int, int]):
    """mmseg sliding-window inference: (B, 3, H, W) -> summed-and-averaged logits (B, K, H, W)."""
    b, _, h, w = img.shape
    (ch, cw), (sh, sw) = crop, stride
    out = img.new_zeros((b, num_classes, h, w))
    count = img.new_zeros((1, 1, h, w))
    for y in range(max(math.ceil((h - ch) / sh), 0) + 1):
        for x in range(max(math.ceil((w - cw) / sw), 0) + 1):
            y1, x1 = min(y * sh, max(h - ch, 0)), min(x * sw, max(w - cw, 0))
            y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
            logits = model(img[:, :, y1:y2, x1:x2])
            out[:, :, y1:y2, x1:x2] += F.interpolate(logits, size=(y2 - y1, x2 - x1), mode="bilinear",
                                                     align_corners=False)
            count[:, :, y1:y2, x1:x2] += 1
    return out / count


@torch.no_grad()
def evaluate(models: list, loader, cfg: SegConfig, accelerator, vis_dir: Path | None = None) -> dict:
    """mIoU/mAcc/aAcc at label resolution; several models = ensemble (mean of softmax)."""
    for m in models:
        m.eval()
    k = cfg.data.num_classes
    total = torch.zeros(k, k, dtype=torch.int64, device=accelerator.device)
    n_vis = 0
    for batch in loader:
        img, label = batch["image"], batch["label"]  # (B, 3, h, w), (B, H, W) original size
        probs = 0
        for m in models:
            with accelerator.autocast():
                if cfg.eval.mode == "slide":
                    logits = slide_logits(m, img, k, cfg.eval.crop_size, cfg.eval.stride)
                else:
                    logits = m(img)
            logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
            probs = probs + logits.softmax(1) / len(models)
        pred = probs.argmax(1)  # (B, H, W)
        cms = torch.stack([confusion_matrix(p, l, k, cfg.data.ignore_index) for p, l in zip(pred, label)])
        total += accelerator.gather_for_metrics(cms).sum(0)
        if vis_dir is not None and accelerator.is_main_process and n_vis < cfg.save_vis:
            for i in range(min(len(img), cfg.save_vis - n_vis)):
                shown = F.interpolate(img[i:i + 1].float(), size=label.shape[-2:], mode="bilinear")[0]
                panel = np.concatenate([denormalize(shown), colorize(pred[i].cpu().numpy()),
                                        colorize(label[i].cpu().numpy(), ignore_index=cfg.data.ignore_index)], 1)
                vis_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(panel).save(vis_dir / f"{batch['name'][i]}.png")
                n_vis += 1
    for m in models:
        m.train()
    return seg_metrics(total)


def build_model(cfg: SegConfig, variant: str | None = None) -> SegFormer:
    return SegFormer(variant or cfg.model.variant, cfg.data.num_classes, cfg.model.drop_path_rate,
                     cfg.model.decoder_dropout)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    argv = ["save_vis=8" if a == "--save-vis" else a for a in argv]
    cfg = parse_config(SegConfig, argv, __doc__)
    accelerator = setup_run(cfg, "seg")
    run_dir = Path(cfg.output_dir)
    log = RunLog(accelerator, run_dir, cfg.train.total_steps, log_interval=cfg.train.log_interval,
                 check_losses=cfg.train.check_finite)

    # ---- data
    train_idx = val_idx = None
    if cfg.data.folds:  # k-fold: validate on fold `fold` of the train folder
        n = len(list_pairs(Path(cfg.data.root), cfg.data.train_img_dir, cfg.data.train_ann_dir))
        train_idx, val_idx = kfold_indices(n, cfg.data.folds, cfg.data.fold, seed=cfg.seed)
    train_ds = SegFolderDataset(cfg.data, "train", train=True, seed=cfg.seed, indices=train_idx)
    val_ds = SegFolderDataset(cfg.data, "train" if cfg.data.folds else "val", train=False, indices=val_idx)
    if len(train_ds) < cfg.train.batch_size * accelerator.num_processes:
        raise UserError(f"train set has {len(train_ds)} images, fewer than one global batch "
                        f"({cfg.train.batch_size} x {accelerator.num_processes} processes)")
    loader_kw = dict(num_workers=cfg.train.num_workers, pin_memory=accelerator.device.type == "cuda")
    train_loader = make_loader(train_ds, cfg.train.batch_size, shuffle=True, seed=cfg.seed, drop_last=True, **loader_kw)
    val_loader = make_loader(val_ds, 1, shuffle=False, **loader_kw)
    log.info(f"data: {len(train_ds)} train / {len(val_ds)} val images from {cfg.data.root}; "
             f"processes: {accelerator.num_processes} ({accelerator.distributed_type})")

    # ---- model (+ frozen teacher)
    model = build_model(cfg)
    if cfg.load_from:
        load_weights(model, cfg.load_from, convert_state_dict, skip_mismatched=not cfg.eval_only, log=log.info)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    model = convert_sync_batchnorm(model, accelerator.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    log.info(f"model: SegFormer-{cfg.model.variant.upper()} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params")
    teacher = None
    if cfg.kd.teacher_variant and not cfg.eval_only:
        if not cfg.kd.teacher_weights:
            raise UserError("kd.teacher_variant is set but kd.teacher_weights is empty (a trained teacher is needed)")
        teacher = build_model(cfg, cfg.kd.teacher_variant)
        load_weights(teacher, cfg.kd.teacher_weights, convert_state_dict, strict=True, log=log.info)
        teacher = teacher.eval().requires_grad_(False).to(accelerator.device)
    if cfg.compile:
        model = torch.compile(model)

    # ---- optimizer and schedule
    global_batch = cfg.train.batch_size * accelerator.num_processes * cfg.train.grad_accum_steps
    groups = param_groups(model, cfg.optim, head_prefixes=("decode_head.", "_orig_mod.decode_head."),
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
        members = [model]
        for path in cfg.ensemble:
            m = build_model(cfg)
            load_weights(m, path, convert_state_dict, strict=True, log=log.info)
            members.append(accelerator.prepare_model(m, evaluation_mode=True))
        if cfg.ensemble and not cfg.load_from:
            members = members[1:]
        if not cfg.load_from and not cfg.ensemble and ckpt is None:
            raise UserError("eval_only=true needs load_from=PATH, ensemble=[...] or resume=PATH")
        metrics = evaluate(members, val_loader, cfg, accelerator, run_dir / "vis" if cfg.save_vis else None)
        result = {k: metrics[k] for k in ("mIoU", "mAcc", "aAcc")} | {"IoU": metrics["IoU"]}
        if len(members) > 1:
            for i, m in enumerate(members):
                mm = evaluate([m], val_loader, cfg, accelerator)
                result |= {f"member{i}_{k}": mm[k] for k in ("mIoU", "mAcc", "aAcc")}
        log.info(class_table(metrics, cfg.data.class_names))
        log.eval(step, result)
        log.close()
        return result

    # ---- training loop
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.grad_accum_steps)
    epoch, skip = divmod(step, steps_per_epoch)
    best = None
    metrics: dict = {}
    model.train()
    while step < cfg.train.total_steps:
        train_loader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, skip * cfg.train.grad_accum_steps) if skip else train_loader
        skip = 0
        for batch in loader:
            img, label = batch["image"], batch["label"]  # (B, 3, H, W), (B, H, W)
            if cfg.channels_last:
                img = img.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                logits, feats = model(img, return_features=True)  # (B, K, H/4, W/4), 4 x (B, C_i, h_i, w_i)
                up = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
                # mmseg default (avg_non_ignore=False): mean over all pixels, ignored ones count as 0
                losses = {"loss_ce": F.cross_entropy(up.float(), label, ignore_index=cfg.data.ignore_index,
                                                     reduction="sum") / label.numel()}
                if teacher is not None:
                    with torch.no_grad(), accelerator.autocast():
                        t_logits, t_feats = teacher(img, return_features=True)
                    kd = cfg.kd
                    if kd.kl.weight:
                        losses["loss_kl"] = kd.kl.weight * seg_kd.kl_div(logits, t_logits, kd.kl.temperature)
                    if kd.cwd.weight:
                        losses["loss_cwd"] = kd.cwd.weight * seg_kd.channel_wise(logits, t_logits, kd.cwd.temperature)
                    if kd.at.weight:
                        losses["loss_at"] = kd.at.weight * sum(seg_kd.attention_transfer(feats[s], t_feats[s])
                                                               for s in kd.at.stages)
                    if kd.sp.weight:
                        losses["loss_sp"] = kd.sp.weight * sum(seg_kd.similarity_preserving(feats[s], t_feats[s])
                                                               for s in kd.sp.stages)
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
            log.train_step(step, {"loss": loss} | losses if len(losses) > 1 else losses,
                           lr=lr, images=global_batch)

            if step % cfg.train.eval_interval == 0 or step == cfg.train.total_steps:
                metrics = evaluate([model], val_loader, cfg, accelerator,
                                   run_dir / "vis" / f"step_{step}" if cfg.save_vis else None)
                log.info(class_table(metrics, cfg.data.class_names))
                log.eval(step, {k: metrics[k] for k in ("mIoU", "mAcc", "aAcc")} | {"IoU": metrics["IoU"]})
                key = cfg.train.best_metric or "mIoU"
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
