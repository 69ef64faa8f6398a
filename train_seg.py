r"""Semantic segmentation with SegFormer (MiT-B0..B5) and optional teacher -> student distillation.

Run (1 CPU, 1 GPU, N GPUs or N nodes: whatever `accelerate config` / the launch flags say):
  accelerate launch train_seg.py --config configs/seg/sample.yaml                       # bundled sample, CPU < 2 min
  accelerate launch train_seg.py --config configs/seg/camvid_b0.yaml data.root=../shared/data/camvid
  accelerate launch --num_processes 8 train_seg.py --config configs/seg/camvid_b2.yaml mixed_precision=bf16
  accelerate launch train_seg.py --config configs/seg/camvid_b0_kd_b2.yaml \
      kd.teacher_weights=runs/camvid_b2/checkpoints/best                                  # distil B2 -> B0
  accelerate launch train_seg.py --config configs/seg/camvid_b0.yaml resume=auto        # continue a run
  ... ema.decay=0.999                                                                   # + EMA: checkpoints/best_ema
  ... train.unit=epoch train.total_steps=100 train.eval_interval=5 train.ckpt_interval=5 \
      sched.warmup_steps=2                                                              # counts in epochs
Ctrl-C (or SIGTERM) finishes the step, saves checkpoints/step_N and says how to continue (resume=auto).
Use a trained model (none of these reads the training folder, except baseline=majority):
  accelerate launch train_seg.py --config configs/seg/camvid_b0.yaml eval_only=true \
      load_from=runs/camvid_b0/checkpoints/best --save-vis                               # val metrics + overlays
  ... eval_only=true load_from=... data.test_img_dir=/data/test data.test_ann_dir=/data/testannot \
      eval.scales=[0.5,0.75,1.0,1.25,1.5,1.75] eval.flip=true                           # multi-scale + flip test
  ... load_from=runs/camvid_b0/checkpoints/best predict='photos/*.jpg'                   # masks + overlays
  ... load_from=runs/camvid_b0/checkpoints/best export=onnx                              # output_dir/export/model.onnx
  ... eval_only=true baseline=majority                                                   # trivial predictor row
  python train_seg.py --help                                                             # every config key

`load_from` takes this script's checkpoints, HF transformers SegFormer files/folders, NVlabs
SegFormer .pth and MiT ImageNet backbone .pth (key mapping in lib/models/segformer.py).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from PIL import Image
from torch import nn

from lib.checkpoint import (BestCheckpoint, checkpoint_info, eval_members, find_resume, load_checkpoint, load_weights,
                            save_checkpoint)
from lib.config import (Frac, NonNegFloat, NonNegInt, PathStr, PosFloat, PosInt, Range, RunConfig, TrainConfig,
                        parse_config, resolve_units)
from lib.data import device_aug
from lib.data.common import denormalize, kfold_indices, make_loader, read_image, to_tensor_normalized
from lib.data.seg import CAMVID_PALETTE, SegDataConfig, SegFolderDataset, colorize, list_pairs, rescale_size
from lib.ema import ModelEMA
from lib.errors import UserError
from lib.export import export_model, onnx_max_abs_diff
from lib.logging import RunLog
from lib.losses import seg_kd
from lib.metrics.seg import class_table, confusion_matrix, seg_metrics
from lib.models.segformer import SegFormer, convert_state_dict
from lib.optim import build_optimizer, param_groups, scaled_lr
from lib.predict import list_inputs, shard
from lib.runtime import cli_main, convert_sync_batchnorm, setup_run, stop_requested
from lib.schedules import lr_scheduler


Variant = Literal["b0", "b1", "b2", "b3", "b4", "b5"]  # MiT-B0..B5 encoder (+ its all-MLP decoder width)


@dataclass
class ModelConfig:
    variant: Variant = "b0"  # MiT-B0..B5
    drop_path_rate: Frac = 0.1  # stochastic depth of the last encoder block (linear from 0 over the blocks)
    decoder_dropout: Frac = 0.1  # dropout before the decoder's classifier
    grad_checkpointing: bool = False  # recompute encoder block activations in the backward pass (less memory)


@dataclass
class LogitKD:  # kd.kl (pixel KL) and kd.cwd (channel-wise): on the (B, K, H/4, W/4) logits
    weight: NonNegFloat = 0.0  # 0 = off
    temperature: PosFloat = 4.0  # softmax temperature T; the term is scaled by T^2


@dataclass
class FeatureKD:  # kd.at (attention transfer) and kd.sp (similarity preserving): on encoder stages
    weight: NonNegFloat = 0.0  # 0 = off
    stages: list[Annotated[int, Range(ge=0, le=3)]] = field(default_factory=lambda: [3])  # encoder stages 0..3, terms summed


@dataclass
class KDConfig:
    teacher_variant: Literal["", Variant] = ""  # "" = no distillation
    teacher_weights: PathStr = ""  # checkpoint of this script (e.g. runs/b2/checkpoints/best) or HF/NVlabs file
    kl: LogitKD = field(default_factory=LogitKD)
    cwd: LogitKD = field(default_factory=LogitKD)
    at: FeatureKD = field(default_factory=lambda: FeatureKD(stages=[0, 1, 2, 3]))
    sp: FeatureKD = field(default_factory=FeatureKD)


@dataclass
class EvalConfig:
    mode: Literal["whole", "slide"] = "whole"  # whole image, or mmseg sliding window (crop_size, stride)
    crop_size: tuple[PosInt, PosInt] = (512, 512)  # slide window (H, W)
    stride: tuple[PosInt, PosInt] = (341, 341)  # slide window step (H, W)
    scales: list[PosFloat] = field(default_factory=lambda: [1.0])  # mmseg aug_test ratios of data.scale
    flip: bool = False  # also the horizontally flipped image; softmax averaged over scales x flips


@dataclass
class SegConfig(RunConfig):
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    save_vis: NonNegInt = 0  # write this many (image | prediction | truth) overlays per evaluation
    train: TrainConfig = field(default_factory=lambda: TrainConfig(best_metric="mIoU", best_mode="max"))


def distill_losses(kd: KDConfig, logits, feats, t_logits, t_feats, valid: torch.Tensor) -> dict:
    """Weighted KD terms that are on. logits (B, K, h, w), feats 4 x (B, C_i, h_i, w_i), valid (B, H, W) bool."""
    out = {}
    if kd.kl.weight:
        out["loss_kl"] = kd.kl.weight * seg_kd.kl_div(logits, t_logits, kd.kl.temperature, valid=valid)
    if kd.cwd.weight:
        out["loss_cwd"] = kd.cwd.weight * seg_kd.channel_wise(logits, t_logits, kd.cwd.temperature)
    if kd.at.weight:
        out["loss_at"] = kd.at.weight * sum(seg_kd.attention_transfer(feats[s], t_feats[s]) for s in kd.at.stages)
    if kd.sp.weight:
        out["loss_sp"] = kd.sp.weight * sum(seg_kd.similarity_preserving(feats[s], t_feats[s]) for s in kd.sp.stages)
    return out


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


def seg_probs(models: list, img: torch.Tensor, size: tuple[int, int], cfg: SegConfig) -> torch.Tensor:
    """mmseg aug_test: mean over models x eval.scales x flips of softmax(logits resized to `size`).
    img (B, 3, h, w) at data.scale -> (B, K, H, W) probabilities."""
    h, w = img.shape[-2:]
    probs, n = 0, 0
    for s in cfg.eval.scales:
        x = img if s == 1.0 else F.interpolate(img, size=(int(h * s + 0.5), int(w * s + 0.5)), mode="bilinear",
                                               align_corners=False)
        for flip in (False, True) if cfg.eval.flip else (False,):
            xf = x.flip(-1) if flip else x
            for m in models:
                logits = (slide_logits(m, xf, cfg.data.num_classes, cfg.eval.crop_size, cfg.eval.stride)
                          if cfg.eval.mode == "slide" else m(xf))
                p = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False).softmax(1)
                probs, n = probs + (p.flip(-1) if flip else p), n + 1
    return probs / n


@torch.no_grad()
def evaluate(models: list, loader, cfg: SegConfig, accelerator, vis_dir: Path | None = None) -> dict:
    """mIoU/mAcc/aAcc at label resolution; several models = ensemble (mean of softmax)."""
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    k = cfg.data.num_classes
    total = torch.zeros(k, k, dtype=torch.int64, device=accelerator.device)
    n_vis = 0
    for batch in loader:
        img, label = batch["image"], batch["label"]  # (B, 3, h, w), (B, H, W) original size
        with accelerator.autocast():
            pred = seg_probs(models, img, label.shape[-2:], cfg).argmax(1)  # (B, H, W)
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
    for m, t in zip(models, was_training):
        m.train(t)
    return seg_metrics(total)


def build_model(cfg: SegConfig, variant: str = "") -> SegFormer:
    return SegFormer(variant=variant or cfg.model.variant, num_classes=cfg.data.num_classes,
                     drop_path_rate=cfg.model.drop_path_rate, decoder_dropout=cfg.model.decoder_dropout)


class MajorityClass(nn.Module):
    """Trivial baseline (baseline=majority): every pixel is the training labels' most frequent class."""

    def __init__(self, cls: int, num_classes: int):
        super().__init__()
        self.cls, self.num_classes = cls, num_classes

    def forward(self, x):  # (B, 3, H, W) -> one-hot logits (B, K, H/4, W/4), like the model's
        out = x.new_zeros(x.shape[0], self.num_classes, math.ceil(x.shape[2] / 4), math.ceil(x.shape[3] / 4))
        out[:, self.cls] = 1.0
        return out


def class_counts(ds: SegFolderDataset, num_classes: int, ignore_index: int) -> np.ndarray:
    """Pixels per class over all labels of `ds`, at label resolution (ignored pixels left out)."""
    counts = np.zeros(num_classes, np.int64)
    for i in range(len(ds)):
        label = ds.load(i)[1]
        counts += np.bincount(label[label != ignore_index].ravel(), minlength=num_classes)
    return counts


def predict_images(model, cfg: SegConfig, accelerator, out_dir: Path) -> int:
    """Masks (PNG, class ids with the palette) + overlays of every image of `predict`; each process a shard."""
    paths = list_inputs(cfg.predict)
    mine = shard(paths, accelerator.process_index, accelerator.num_processes)
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(CAMVID_PALETTE)] = CAMVID_PALETTE
    out_dir.mkdir(parents=True, exist_ok=True)
    for j in range(math.ceil(len(paths) / accelerator.num_processes)):  # same number of rounds on every process
        done = []
        for path in mine[j:j + 1]:
            img = read_image(path)  # (H, W, 3)
            h, w = img.shape[:2]
            x = np.array(Image.fromarray(img).resize(rescale_size(w, h, cfg.data.scale, 1.0), Image.BILINEAR))
            with torch.no_grad(), accelerator.autocast():
                probs = seg_probs([model], to_tensor_normalized(x)[None].to(accelerator.device), (h, w), cfg)
            done.append((str(path), probs.argmax(1)[0].cpu().numpy().astype(np.uint8), img))
        for path, mask, img in gather_object(done):  # the main process writes
            if accelerator.is_main_process:
                png = Image.fromarray(mask, "P")
                png.putpalette(pal.ravel().tolist())
                png.save(out_dir / f"{Path(path).stem}.png")
                overlay = (0.5 * img + 0.5 * colorize(mask, palette=CAMVID_PALETTE)).astype(np.uint8)
                Image.fromarray(overlay).save(out_dir / f"{Path(path).stem}_overlay.jpg", quality=90)
    accelerator.wait_for_everyone()
    return len(paths)


def use_trained(cfg: SegConfig, accelerator, log: RunLog, run_dir: Path) -> dict:
    """predict / export (load_from only: no dataset is read), then eval_only on the val set (or
    data.test_img_dir / test_ann_dir; the training folder is read only by baseline=majority)."""
    loader_kw = dict(num_workers=cfg.train.num_workers, pin_memory=accelerator.device.type == "cuda")
    if cfg.predict or cfg.export:
        if not cfg.load_from:
            raise UserError("predict= and export= need load_from=CHECKPOINT")
        model = build_model(cfg)
        load_weights(model, cfg.load_from, convert_state_dict, strict=True, log=log.info)
        step = checkpoint_info(cfg.load_from)["step"]
        if cfg.export and accelerator.is_main_process:  # input (B, 3, H, W) at data.scale, as the val pipeline
            x = torch.randn(1, 3, cfg.data.scale[1], cfg.data.scale[0], generator=torch.Generator().manual_seed(0))
            path = export_model(model, (x,), run_dir / "export", cfg.export, input_names=["image"],
                                output_names=["logits"], metadata={"script": "train_seg.py", "step": step,
                                                                   "model": f"SegFormer-{cfg.model.variant}",
                                                                   "num_classes": cfg.data.num_classes})
            log.info(f"export: {path} (weights of step {step}, input (B, 3, {x.shape[2]}, {x.shape[3]}))")
            if cfg.export == "onnx":
                with torch.no_grad():
                    ref = model.eval()(x)
                diff = onnx_max_abs_diff(path, (x,), ref)
                log.info(f"export: onnxruntime vs PyTorch max |diff| {diff:.2e} (max |logit| {ref.abs().max():.3g})")
        accelerator.wait_for_everyone()
        if cfg.predict:
            model = model.to(accelerator.device).eval()
            n = predict_images(model, cfg, accelerator, run_dir / "predict")
            log.info(f"predict: {n} images of {cfg.predict} -> {run_dir / 'predict'} (weights of step {step})")
        if not cfg.eval_only:
            return {}

    paths = eval_members(cfg)  # load_from / ensemble; [] = the resumed model (or a baseline)
    step, train_idx, val_idx = None, None, None
    if cfg.data.folds:  # k-fold: evaluate on the held-out fold of the train folder
        n = len(list_pairs(Path(cfg.data.root), cfg.data.train_img_dir, cfg.data.train_ann_dir))
        train_idx, val_idx = kfold_indices(n, cfg.data.folds, cfg.data.fold, seed=cfg.seed)
    if cfg.baseline:
        if cfg.baseline != "majority" or paths:
            raise UserError(f"baseline={cfg.baseline!r}: seg has baseline=majority, without load_from/ensemble")
        counts = class_counts(SegFolderDataset(cfg.data, "train", train=False, indices=train_idx),
                              cfg.data.num_classes, cfg.data.ignore_index)  # the one eval reading training labels
        cls = int(counts.argmax())
        log.info(f"baseline: majority class {cls} ({cfg.data.class_names[cls]}, "
                 f"{counts[cls] / counts.sum():.1%} of the training pixels)")
        members = [MajorityClass(cls, cfg.data.num_classes).to(accelerator.device)]
    else:
        if not paths:
            ckpt = find_resume(run_dir, cfg.resume)
            if ckpt is None:
                raise UserError(f"eval_only=true resume={cfg.resume}: no checkpoint in {run_dir / 'checkpoints'}")
            paths = [str(ckpt)]
        members = []
        for path in paths:
            m = build_model(cfg)
            load_weights(m, path, convert_state_dict, strict=True, log=log.info)
            members.append(accelerator.prepare_model(m, evaluation_mode=True))
        step = checkpoint_info(paths[0])["step"]  # the step the weights were saved at
    split = "train" if cfg.data.folds else "test" if cfg.data.test_img_dir else "val"
    ds = SegFolderDataset(cfg.data, split, train=False, indices=val_idx)
    loader = accelerator.prepare(make_loader(ds, 1, shuffle=False, **loader_kw))
    log.info(f"eval: {len(ds)} images from {ds.img_dir} (labels {ds.ann_dir}); "
             + (f"weights of step {step}" if step is not None else "baseline" if cfg.baseline
                else "step unknown (not a checkpoint of this script)")
             + f"; scales {cfg.eval.scales}{' + flip' if cfg.eval.flip else ''}")
    metrics = evaluate(members, loader, cfg, accelerator, run_dir / "vis" if cfg.save_vis else None)
    result = {k: metrics[k] for k in ("mIoU", "mAcc", "aAcc")} | {"IoU": metrics["IoU"]}
    if len(members) > 1:
        for i, m in enumerate(members):
            mm = evaluate([m], loader, cfg, accelerator)
            result |= {f"member{i}_{k}": mm[k] for k in ("mIoU", "mAcc", "aAcc")}
    log.info(class_table(metrics, cfg.data.class_names))
    log.eval(step or 0, result)
    return result


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    argv = ["save_vis=8" if a == "--save-vis" else a for a in argv]
    cfg = parse_config(SegConfig, argv, __doc__)
    for name in ("at", "sp"):
        term = getattr(cfg.kd, name)
        if term.weight and not term.stages:
            raise UserError(f"kd.{name}.stages is empty (encoder stages 0..3)")
    if not cfg.eval.scales:
        raise UserError("eval.scales is empty (e.g. [1.0])")
    if cfg.train.best_metric not in ("mIoU", "mAcc", "aAcc"):
        raise UserError(f"train.best_metric must be mIoU, mAcc or aAcc (got {cfg.train.best_metric!r})")
    accelerator = setup_run(cfg, "seg")
    run_dir = Path(cfg.output_dir)

    # ---- use a trained model: predict / export / eval_only (no step checkpoints, no training)
    if cfg.predict or cfg.export or cfg.eval_only:
        log = RunLog(accelerator, run_dir, 0, check_losses=False)
        result = use_trained(cfg, accelerator, log, run_dir)
        log.close()
        return result

    # ---- training: distillation settings that would otherwise be ignored are errors
    kd = cfg.kd
    on = [n for n in ("kl", "cwd", "at", "sp") if getattr(kd, n).weight]
    if bool(kd.teacher_variant) != bool(on):
        raise UserError("kd.teacher_variant is set but every kd.*.weight is 0" if kd.teacher_variant
                        else f"kd.{on[0]}.weight is set but kd.teacher_variant is empty (no teacher)")
    if kd.teacher_variant and not kd.teacher_weights:
        raise UserError("kd.teacher_variant is set but kd.teacher_weights is empty (a trained teacher is needed)")

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
    # the loaders' EpochSampler hands the datasets (index, epoch) keys: augmentation is a function of both
    loader_kw = dict(num_workers=cfg.train.num_workers, pin_memory=accelerator.device.type == "cuda")
    on_device = cfg.data.aug_device == "device"  # workers decode + crop labels, the image part runs on the device
    train_loader = make_loader(train_ds, cfg.train.batch_size, shuffle=True, seed=cfg.seed, drop_last=True,
                               collate_fn=device_aug.collate if on_device else None, **loader_kw)
    val_loader = make_loader(val_ds, 1, shuffle=False, **loader_kw)
    train_loader, val_loader = accelerator.prepare(train_loader, val_loader)  # this process's share of each
    accum = accelerator.gradient_accumulation_steps  # the config's train.grad_accum_steps, else the launcher's
    steps_per_epoch = math.ceil(len(train_loader) / accum)
    given = cfg  # as written (train.unit=epoch: counts in epochs), the run's config.yaml
    cfg = resolve_units(cfg, steps_per_epoch)  # train.unit=epoch: epoch counts -> optimizer steps
    log = RunLog(accelerator, run_dir, cfg.train.total_steps, log_interval=cfg.train.log_interval,
                 check_losses=cfg.train.check_finite)
    log.info(f"data: {len(train_ds)} train images from {train_ds.img_dir} / {len(val_ds)} val images from "
             f"{val_ds.img_dir}; processes: {accelerator.num_processes} ({accelerator.distributed_type}); "
             f"{steps_per_epoch} steps per epoch, {cfg.train.total_steps} steps")

    # ---- model (+ frozen teacher)
    model = build_model(cfg)
    if cfg.load_from:
        load_weights(model, cfg.load_from, convert_state_dict, skip_mismatched=True, log=log.info)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    model = convert_sync_batchnorm(model, accelerator.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    log.info(f"model: SegFormer-{cfg.model.variant.upper()} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params")
    teacher = None
    if kd.teacher_variant:
        teacher = build_model(cfg, variant=kd.teacher_variant)
        load_weights(teacher, kd.teacher_weights, convert_state_dict, strict=True, log=log.info)
        teacher = teacher.eval().requires_grad_(False).to(accelerator.device)
        log.info("distillation: " + ", ".join(f"{n} {getattr(kd, n)}" for n in on))

    # ---- optimizer and schedule (parameter groups from the plain model, before torch.compile)
    global_batch = cfg.train.batch_size * accelerator.num_processes * accum
    groups = param_groups(model, cfg.optim, head_prefixes=model.head_prefixes, lr=scaled_lr(cfg.optim, global_batch))
    optimizer = build_optimizer(groups, cfg.optim, accelerator.device)
    scheduler = lr_scheduler(optimizer, cfg.sched, cfg.train.total_steps)
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = ModelEMA(model, cfg.ema.decay, cfg.ema.start_step) if cfg.ema.decay else None  # fp32 copy of the weights
    if ema is not None:
        accelerator.register_for_checkpointing(ema)  # saved in step_N, restored by load_checkpoint
    best = BestCheckpoint(run_dir, cfg.train.best_metric, cfg.train.best_mode)  # checkpoints/best (mIoU, max)
    best_ema = BestCheckpoint(run_dir, cfg.train.best_metric, cfg.train.best_mode, name="best_ema")

    step = 0
    ckpt = find_resume(run_dir, cfg.resume)
    if ckpt is not None:
        step = load_checkpoint(accelerator, ckpt, given)["step"]  # a changed architecture: names the key
        log.resumed(step, ckpt)
        best.restore(), best_ema.restore()  # a worse evaluation after the resume keeps the best so far

    # ---- training loop
    epoch, skip = divmod(step, steps_per_epoch)
    metrics: dict = {}
    model.train()
    while step < cfg.train.total_steps and not stop_requested(accelerator):
        train_loader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, skip * accum) if skip else train_loader
        skip = 0
        for batch in loader:
            if on_device:
                batch = device_aug.seg_train_batch(batch, cfg.data.crop_size)
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
                    losses |= distill_losses(kd, logits, feats, t_logits, t_feats, label != cfg.data.ignore_index)
                loss = sum(losses.values())
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.clip_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()  # skipped by accelerate while accumulating
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            log.micro_batch({"loss": loss} | losses if len(losses) > 1 else losses)  # logged: mean over micro-batches
            if not accelerator.sync_gradients:
                continue
            step += 1
            if ema is not None:
                ema.update(model, step)
            log.train_step(step, lr=lr, images=global_batch)

            if step % cfg.train.eval_interval == 0 or step == cfg.train.total_steps:
                metrics = evaluate([model], val_loader, cfg, accelerator,
                                   run_dir / "vis" / f"step_{step}" if cfg.save_vis else None)
                log.info(class_table(metrics, cfg.data.class_names))
                ema_metrics = {}
                if ema is not None and cfg.ema.eval:  # the averaged weights through the same eval
                    ema_metrics = evaluate([ema.module], val_loader, cfg, accelerator)
                log.eval(step, {k: metrics[k] for k in ("mIoU", "mAcc", "aAcc")} | {"IoU": metrics["IoU"]}
                         | {f"ema_{k}": ema_metrics[k] for k in ("mIoU", "mAcc", "aAcc") if ema_metrics})
                best.update(accelerator, model, step, metrics)  # train.best_metric / best_mode (lists left out)
                if ema_metrics:
                    best_ema.update(accelerator, ema.module, step, ema_metrics)
            if step % cfg.train.ckpt_interval == 0 or step == cfg.train.total_steps:
                save_checkpoint(accelerator, run_dir, step, {"epoch": epoch}, cfg.train.max_keep_ckpts, metrics=metrics)
            if step >= cfg.train.total_steps or stop_requested(accelerator):
                break
        epoch += 1
    if step < cfg.train.total_steps:  # stopped by Ctrl-C / SIGTERM: save and say how to continue
        log.interrupted(step, save_checkpoint(accelerator, run_dir, step, {"epoch": step // steps_per_epoch},
                                              cfg.train.max_keep_ckpts, metrics=metrics))
    log.close()
    return metrics


if __name__ == "__main__":
    cli_main(main)()
