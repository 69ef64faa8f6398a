r"""3D hand pose: DINOv2 ViT backbone + "handec" transformer regressor head, progressive dropout.

Run (1 CPU, 1 GPU, N GPUs or N nodes: whatever `accelerate config` / the launch flags say):
  accelerate launch train_hand.py --config configs/hand/sample.yaml                     # bundled sample, CPU < 2 min
  accelerate launch train_hand.py --config configs/hand/hand3d_vits.yaml                # real hand3d set, CPU minutes
  accelerate launch --num_processes 8 train_hand.py --config configs/hand/stage1-dino_large.yaml \
      data.root=/data/freihand model.backbone_weights=dinov2_vitl14_pretrain.pth        # the progressive dropout plan
  python -m lib.data.make_shards --root /data/freihand --split training --out /data/freihand_wds
  accelerate launch train_hand.py --config configs/hand/dinov2_l_recipe.yaml data.format=webdataset \
      data.root=/data/freihand_wds                                                       # tar shards
  accelerate launch train_hand.py --config configs/hand/hand3d_vits.yaml eval_only=true \
      load_from=runs/hand3d_vits/checkpoints/best                                       # evaluate + overlays
  accelerate launch train_hand.py --config configs/hand/hand3d_vits.yaml eval_only=true baseline=mean_pose
  accelerate launch train_hand.py --config configs/hand/hand3d_vits.yaml load_from=runs/hand3d_vits/checkpoints/best \
      predict='photos/*.jpg' [predict_camera=K.json]                                    # joints JSON + overlays
  accelerate launch train_hand.py --config configs/hand/hand3d_vits.yaml load_from=runs/hand3d_vits/checkpoints/best \
      export=onnx                                                                        # or export=safetensors
  accelerate launch train_hand.py --config configs/hand/hand3d_vits.yaml resume=auto    # continue a run (also after Ctrl-C)
  accelerate launch train_hand.py --config configs/hand/hand3d_vits.yaml ema.decay=0.98 train.unit=epoch \
      train.total_steps=2 train.eval_interval=1                                         # EMA weights too; counts in epochs
  python train_hand.py --help                                                            # every config key

`model.backbone_weights` takes a local DINOv2 file in timm, facebookresearch hub or HF transformers
`Dinov2Model` layout (key mapping in lib/models/hand.py); `model.mano_path` an optional MANO model
file (without it the head regresses the 21 joints directly). Metrics: root-relative MPJPE and
PA-MPJPE in mm (mean and std over the validation set), `val_loss`, `mpjpe_fluct` (std of val MPJPE
over the evaluations so far: the plan's "validation fluctuation") next to `mpjpe_mean_pose`, the
error of predicting the training set's mean pose for every image. With `ema.decay` the EMA weights are
evaluated too (`ema_mpjpe`, ...; best in checkpoints/best_ema). Ctrl-C / SIGTERM stops after the current
step and saves checkpoints/step_N; `resume=auto` continues exactly (weights, EMA, RNG, data position, best).
"""

from __future__ import annotations

import functools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from accelerate.utils import gather_object
from PIL import Image
from torch import nn

from lib.checkpoint import (BestCheckpoint, checkpoint_info, eval_members, find_resume, load_checkpoint, load_weights,
                            save_checkpoint)
from lib.config import (NonNegInt, PathStr, PosInt, Range, RunConfig, ScheduleConfig, TrainConfig, parse_config,
                        resolve_units)
from lib.data import device_aug_hand
from lib.data.common import make_loader, read_image, to_tensor_normalized
from lib.data.hand import (HandDataConfig, HandDataset, crop_affine, label_stats, make_source, mean_pose,
                           split_indices)
from lib.ema import ModelEMA
from lib.errors import DataError, UserError
from lib.export import export_model
from lib.logging import RunLog, read_metrics
from lib.losses.hand import LossWeights, hand_losses, project
from lib.metrics.hand import PRED_COLOR, draw_keypoints, fluctuation, legend_strip, mpjpe, pa_mpjpe, save_overlay, summarize
from lib.models.hand import HandRegressor, convert_state_dict
from lib.optim import build_optimizer, param_groups, scaled_lr
from lib.predict import list_inputs
from lib.runtime import cli_main, setup_run, stop_requested
from lib.schedules import lr_scheduler, schedule_factor

DEFAULT_FOCAL = 5000.0 / 256  # predict without intrinsics: focal = this x image side (HaMeR: 5000 px at 256 px)
Prob = Annotated[float, Range(ge=0, lt=1)]  # a dropout / drop-path rate


@dataclass
class HandecConfig:
    dim: PosInt = 1024
    depth: PosInt = 6
    heads: PosInt = 8
    dim_head: PosInt = 64
    mlp_dim: PosInt = 1024
    num_queries: PosInt = 1
    ief_iters: PosInt = 1  # 1 = direct regression; > 1 = iterative error feedback
    pose_repr: Literal["6d", "aa"] = "6d"
    dropout: Prob = 0.1  # reached after the warm-up (progressive dropout)
    dropout_warmup_step: NonNegInt = 10000  # p = 0 before this optimizer step (epoch, train.unit=epoch)
    dropout_ramp: Literal["step", "linear"] = "step"  # jump to p, or rise linearly during the warm-up


@dataclass
class ModelConfig:
    backbone: Literal["vit_small_patch14_dinov2", "vit_base_patch14_dinov2", "vit_large_patch14_dinov2",
                      "vit_giant_patch14_dinov2"] = "vit_large_patch14_dinov2"
    drop_path_rate: Prob = 0.0
    grad_checkpointing: bool = False
    backbone_weights: PathStr = ""  # local DINOv2 weights (timm / hub / HF layout); "" = random init
    mano_path: PathStr = ""  # MANO_RIGHT .npz/.pkl; "" = regress joints directly
    layer_decay: Annotated[float, Range(gt=0, le=1)] = 1.0  # layer-wise lr decay of the backbone (1 = off)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # timm overrides, e.g. {depth: 4} (not DINOv2 then)
    handec: HandecConfig = field(default_factory=HandecConfig)


@dataclass
class HandConfig(RunConfig):
    data: HandDataConfig = field(default_factory=HandDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(best_metric="mpjpe", best_mode="min"))
    save_vis: NonNegInt = 8  # keypoint overlay PNG of this many validation crops per evaluation (0 = off)
    predict_camera: PathStr = ""  # predict: json with K (3x3) for every image, or {image name: K}; "" = default focal
    predict_side: Literal["right", "left"] = "right"  # predict: handedness of the hands in the images


def build_model(cfg: HandConfig) -> HandRegressor:
    m, h = cfg.model, cfg.model.handec
    return HandRegressor(backbone=m.backbone, img_size=cfg.data.img_size, drop_path_rate=m.drop_path_rate,
                         dim=h.dim, depth=h.depth, heads=h.heads, dim_head=h.dim_head, mlp_dim=h.mlp_dim,
                         dropout=0.0, num_queries=h.num_queries, ief_iters=h.ief_iters, pose_repr=h.pose_repr,
                         mano_path=m.mano_path, backbone_overrides=m.backbone_kwargs)


def load_model(cfg: HandConfig, path: str, log) -> HandRegressor:
    model = build_model(cfg)
    load_weights(model, path, functools.partial(convert_state_dict, model=model), strict=True, log=log)
    return model


def dropout_at(step: int, p: float, warmup_steps: int, ramp: str = "step") -> float:
    """Progressive dropout at optimizer step `step` (0-based): 0 before `warmup_steps`, then p; ramp "linear"
    rises from 0 to p over the warm-up. A lib.schedules factor (hold / linear warm-up, constant after)."""
    sched = ScheduleConfig(name="constant", warmup_steps=warmup_steps, warmup_start_factor=0.0,
                           warmup_mode="hold" if ramp == "step" else "linear")
    return p * schedule_factor(step, 1, sched)


class MeanPose(nn.Module):
    """Trivial baseline: the mean training skeleton (right-hand frame, mirrored for left hands) and mean camera."""

    def __init__(self, joints: torch.Tensor, cam: torch.Tensor):
        super().__init__()
        self.register_buffer("joints", joints.float().reshape(21, 3))
        self.register_buffer("cam", cam.float().reshape(3))

    def forward(self, x: torch.Tensor, is_right: torch.Tensor) -> dict[str, torch.Tensor]:
        b = x.shape[0]
        sign = torch.where(is_right.bool(), 1.0, -1.0).to(self.joints.dtype)[:, None, None]  # (B, 1, 1)
        joints = self.joints.expand(b, 21, 3).clone()
        joints[..., 0:1] *= sign
        cam = self.cam.expand(b, 3).clone()
        cam[:, 1:2] *= sign[:, 0]
        return {"joints": joints, "cam": cam, "pose": torch.eye(3, device=x.device).expand(b, 16, 3, 3),
                "betas": torch.zeros(b, 10, device=x.device)}


class JointsAndCamera(nn.Module):
    """Exported inference model: (image (B, 3, S, S), is_right (B,) int64) -> joints (B, 21, 3) m, cam (B, 3)."""

    def __init__(self, model: HandRegressor):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, is_right: torch.Tensor):
        out = self.model(image, is_right)
        return out["joints"], out["cam"]


@torch.no_grad()
def evaluate(models: list, loader, accelerator, loss_w: LossWeights, val_seed: int, vis_path: Path | None = None,
             n_vis: int = 0) -> dict:
    """Root-relative MPJPE / PA-MPJPE (mm) and the validation loss; several models = ensemble (mean joints,
    camera and betas). The RNG is seeded with `val_seed` for the pass (and restored after it)."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    errs: dict[str, list] = {"mpjpe": [], "pa_mpjpe": []}
    val_loss: list = []
    shown: list = []
    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
        torch.manual_seed(val_seed)
        for batch in loader:
            outs = []
            for m in models:
                with accelerator.autocast():
                    outs.append(m(batch["image"], batch["is_right"]))
            out = {k: torch.stack([o[k].float() for o in outs]).mean(0) for k in ("joints", "cam", "betas")}
            out["pose"] = outs[0]["pose"].float()
            joints, cam, gt = out["joints"], out["cam"], batch["joints3d"]  # (B, 21, 3) metres, (B, 3)
            loss = sum(hand_losses(out, batch, loss_w).values())
            e = accelerator.gather_for_metrics({"mpjpe": mpjpe(joints, gt) * 1000, "pa_mpjpe": pa_mpjpe(joints, gt) * 1000,
                                                "val_loss": loss.expand(len(gt))})
            for k in errs:
                errs[k].append(e[k].cpu())
            val_loss.append(e["val_loss"].cpu())
            if vis_path is not None and sum(len(s[0]) for s in shown) < n_vis:
                kp = project(joints - joints[:, :1], cam)
                shown.append((batch["image"].cpu(), batch["joints2d"].cpu(), kp.cpu()))
    for m, mode in zip(models, modes):
        m.train(mode)
    if vis_path is not None and shown and accelerator.is_main_process:
        imgs, gt2d, pred2d = (torch.cat(t)[:n_vis] for t in zip(*shown))
        save_overlay(vis_path, imgs, gt2d, pred2d)
    return summarize({k: torch.cat(v) for k, v in errs.items()}) | {"val_loss": float(torch.cat(val_loss).mean())}


def mean_pose_mpjpe(mean: np.ndarray, val_ds: HandDataset) -> float:
    """MPJPE (mm) of the mean right-hand-frame training pose (mirrored for left hands) on every validation
    sample, from the labels alone (`baseline=mean_pose` runs the same predictor through `evaluate`)."""
    errs = []
    for i in range(len(val_ds)):
        gt = val_ds.joints(i)
        right = val_ds.is_right(i)
        errs.append(np.linalg.norm(mean * (1.0 if right else np.array([-1.0, 1.0, 1.0])) - gt, axis=-1).mean())
    return float(np.mean(errs)) * 1000


def read_intrinsics(path: str) -> dict | np.ndarray:
    """predict_camera json: one K (3x3 list, or {"K": ...}) for every image, or {image name: K}."""
    if not Path(path).is_file():
        raise DataError(f"predict_camera: file not found: {path}")
    try:
        data = json.loads(Path(path).read_text())
        if isinstance(data, dict) and "K" in data:
            data = data["K"]
        if isinstance(data, dict):
            return {k: np.asarray(v["K"] if isinstance(v, dict) else v, dtype=np.float64).reshape(3, 3)
                    for k, v in data.items()}
        return np.asarray(data, dtype=np.float64).reshape(3, 3)
    except (ValueError, TypeError) as e:
        raise DataError(f"predict_camera {path}: need a 3x3 K or {{image name: K}}: {e}") from None


@torch.no_grad()
def predict(model: HandRegressor, cfg: HandConfig, accelerator, out_dir: Path) -> list[dict]:
    """Whole-image crop of each input -> joints JSON + overlay PNG of the projected skeleton per image."""
    paths = list_inputs(cfg.predict)
    cams = read_intrinsics(cfg.predict_camera) if cfg.predict_camera else None
    model.eval()
    right = int(cfg.predict_side == "right")
    results = []
    with accelerator.split_between_processes(paths) as mine:
        for path in mine:
            img = read_image(path)  # (H, W, 3) uint8
            h, w = img.shape[:2]
            side, center = float(max(h, w)), np.array([(w - 1) / 2, (h - 1) / 2])
            crop, A = crop_affine(img, center, side, 0.0, False, cfg.data.img_size)
            out = model(to_tensor_normalized(crop)[None].to(accelerator.device), torch.tensor([right], device=accelerator.device))
            joints, cam = out["joints"][0].float().cpu(), out["cam"][0].float().cpu()  # (21, 3) m, (3,)
            uv = project(joints[None] - joints[None, :1], cam[None])[0].double().numpy()  # crop coords [-0.5, 0.5]
            px = ((uv + 0.5) * cfg.data.img_size - 0.5 - A[:, 2]) @ np.linalg.inv(A[:, :2]).T  # (21, 2) image pixels
            K = cams.get(path.name) if isinstance(cams, dict) else cams
            if K is None:
                f = DEFAULT_FOCAL * side
                K = np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1.0]])
            # weak perspective -> camera frame: s * side px per metre = f / depth; root at its projected pixel
            depth = K[0, 0] / max(float(cam[0]) * side, 1e-6)
            root = np.array([(px[0, 0] - K[0, 2]) * depth / K[0, 0], (px[0, 1] - K[1, 2]) * depth / K[1, 1], depth])
            j = joints.double().numpy() - joints[0].double().numpy()
            results.append({"image": str(path), "is_right": bool(right), "joints3d": j.round(6).tolist(),
                            "joints3d_cam": (j + root).round(6).tolist(), "joints2d": px.round(2).tolist(),
                            "K": K.tolist()})
            vis = draw_keypoints(img, px, PRED_COLOR, radius=max(2, int(side) // 128))
            out_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.concatenate([vis, legend_strip(w, with_truth=False)], 0)).save(out_dir / f"{path.stem}.png")
    results = sorted(gather_object(results), key=lambda r: r["image"])
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "joints.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(HandConfig, argv, __doc__)
    accelerator = setup_run(cfg, "hand")
    run_dir = Path(cfg.output_dir)
    members = eval_members(cfg) if cfg.eval_only else []  # which weights eval_only evaluates, before any model
    if cfg.baseline and (cfg.baseline != "mean_pose" or not cfg.eval_only):
        raise UserError(f"baseline={cfg.baseline!r}: the hand script has baseline=mean_pose, with eval_only=true")
    if cfg.baseline and members:
        raise UserError("baseline=mean_pose evaluates the mean training pose: drop load_from / ensemble")

    # ---- inference only: predict / export the model of load_from (no data read)
    if cfg.predict or cfg.export:
        if not cfg.load_from:
            raise UserError("predict= / export= need load_from=CHECKPOINT (e.g. runs/x/checkpoints/best)")
        log = RunLog(accelerator, run_dir, 0, check_losses=False)
        model = load_model(cfg, cfg.load_from, log.info).to(accelerator.device).eval()
        result: dict = {}
        if cfg.predict:
            preds = predict(model, cfg, accelerator, run_dir / "predict")
            log.info(f"predict: {len(preds)} images -> {run_dir / 'predict'} (joints.json + overlays)")
            result["predictions"] = len(preds)
        if cfg.export and accelerator.is_main_process:
            x = torch.zeros(2, 3, cfg.data.img_size, cfg.data.img_size)
            path = export_model(JointsAndCamera(model), (x, torch.tensor([1, 0])), run_dir / "export", cfg.export,
                                input_names=["image", "is_right"], output_names=["joints", "cam"],
                                metadata={"script": "train_hand.py", "model": cfg.model.backbone,
                                          "step": checkpoint_info(cfg.load_from)["step"], "img_size": cfg.data.img_size})
            log.info(f"export: {path}")
            result["export"] = str(path)
        log.close()
        return result

    # ---- data (eval_only on given weights reads no training split; the held-out part of it only)
    d = cfg.data
    if d.format == "hand3d" and not (d.val_count or d.folds):
        raise UserError("data.format=hand3d is one set: set data.val_count (e.g. 103) to hold out validation images")
    held_out = bool(d.val_count or d.folds)  # validation samples come from the train split
    train_src = make_source(d, d.train_split) if held_out or not members else None
    train_idx, val_idx = split_indices(len(train_src), d) if held_out else (None, None)
    val_src = train_src if held_out else make_source(d, d.val_split)
    part = f"fold {d.fold} of {d.folds}" if d.folds else f"{d.val_count} held out"
    where = f"{d.root} ({d.train_split if d.format != 'hand3d' else 'hand3d'}, {part})" if held_out else \
        f"{d.root} ({d.val_split})"
    val_ds = HandDataset(val_src, d, train=False, indices=val_idx)
    loader_kw = dict(num_workers=cfg.train.num_workers, pin_memory=accelerator.device.type == "cuda")
    on_device = d.aug_device == "device"  # train workers decode + draw + labels, the crop runs on the device
    # datasets take (index, epoch) keys from lib.data.common.EpochSampler (make_loader)
    val_loader = make_loader(val_ds, cfg.train.batch_size, shuffle=False, **loader_kw)
    val_loader = accelerator.prepare_data_loader(val_loader)
    accum = accelerator.gradient_accumulation_steps  # the config's, else the launcher's
    global_batch = cfg.train.batch_size * accelerator.num_processes * accum
    baseline: dict = {}
    if not members:  # training, eval of a resumed run, or the mean-pose baseline
        train_ds = HandDataset(train_src, d, train=True, seed=cfg.seed, indices=train_idx)
        if len(train_ds) < cfg.train.batch_size * accelerator.num_processes:
            raise UserError(f"train set has {len(train_ds)} images, fewer than one global batch "
                            f"({cfg.train.batch_size} x {accelerator.num_processes} processes)")
        train_loader = make_loader(train_ds, cfg.train.batch_size, shuffle=True, seed=cfg.seed, drop_last=True,
                                   collate_fn=device_aug_hand.collate if on_device else None, **loader_kw)
        train_loader = accelerator.prepare_data_loader(train_loader)  # sharded: its length is per process
        steps_per_epoch = math.ceil(len(train_loader) / accum)
        # train.unit=epoch: epoch counts (and the dropout warm-up) -> optimizer steps
        cfg = resolve_units(cfg, steps_per_epoch, extra=("model.handec.dropout_warmup_step",))
    log = RunLog(accelerator, run_dir, 0 if cfg.eval_only else cfg.train.total_steps,
                 log_interval=cfg.train.log_interval, check_losses=cfg.train.check_finite)
    if not members:
        mean = mean_pose(train_ds)  # (21, 3) right-hand frame
        baseline = {"mpjpe_mean_pose": mean_pose_mpjpe(mean, val_ds)}
        log.info(f"data: {len(train_ds)} train images ({d.format}, {d.root}"
                 f"{'' if d.format == 'hand3d' else ', ' + d.train_split}); {len(val_ds)} val "
                 f"images from {where}; {steps_per_epoch} steps/epoch, {cfg.train.total_steps} steps; "
                 f"mean-pose baseline MPJPE {baseline['mpjpe_mean_pose']:.2f} mm")
    else:
        log.info(f"data: {len(val_ds)} val images from {where} ({d.format}); no training split read")

    # ---- trivial baseline through the same eval path (eval_only=true baseline=mean_pose)
    if cfg.baseline:
        stats = label_stats(train_ds, max_samples=64)
        net = accelerator.prepare_model(MeanPose(torch.tensor(mean), stats["cam"]), evaluation_mode=True)
        result = evaluate([net], val_loader, accelerator, cfg.loss, d.val_seed, run_dir / "vis" / "eval.png", cfg.save_vis)
        log.eval(0, result | baseline)
        log.close()
        return result | baseline

    # ---- eval_only on given weights (load_from and/or ensemble): no optimizer, no training data
    if members:
        nets = [accelerator.prepare_model(load_model(cfg, p, log.info), evaluation_mode=True) for p in members]
        step = checkpoint_info(members[0])["step"]  # the step the weights were saved at
        log.info(f"eval_only: {len(nets)} model(s), {members[0]} at step {step if step is not None else 'unknown'}")
        result = evaluate(nets, val_loader, accelerator, cfg.loss, d.val_seed, run_dir / "vis" / "eval.png", cfg.save_vis)
        if len(nets) > 1:
            for i, m in enumerate(nets):
                result |= {f"member{i}_{k}": v for k, v in evaluate([m], val_loader, accelerator, cfg.loss, d.val_seed).items()}
        log.eval(step or 0, result)
        log.close()
        return result

    # ---- model: initial state from the training labels, then optional weights
    model = build_model(cfg)
    model.set_init(**label_stats(train_ds))
    convert = functools.partial(convert_state_dict, model=model)
    if cfg.model.backbone_weights:
        load_weights(model, cfg.model.backbone_weights, convert, log=log.info)
    if cfg.load_from:
        load_weights(model, cfg.load_from, convert, log=log.info)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    log.info(f"model: {cfg.model.backbone} @ {d.img_size} + handec depth {cfg.model.handec.depth}, "
             f"{n_params:.2f}M params, joints from {'MANO' if cfg.model.mano_path else 'the head'}")

    # ---- optimizer and schedule (groups before compile: the model names its head and backbone layers)
    groups = param_groups(model, cfg.optim, model.head_prefixes, lr=scaled_lr(cfg.optim, global_batch),
                          layer_id=model.layer_id, layer_decay=cfg.model.layer_decay, num_layers=model.num_layers)
    optimizer = build_optimizer(groups, cfg.optim, accelerator.device)
    scheduler = lr_scheduler(optimizer, cfg.sched, cfg.train.total_steps)
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = ModelEMA(model, cfg.ema.decay, cfg.ema.start_step) if cfg.ema.decay else None  # fp32 weight average
    if ema is not None:
        accelerator.register_for_checkpointing(ema)  # before load_checkpoint: a resume restores it
    best = BestCheckpoint(run_dir, cfg.train.best_metric, cfg.train.best_mode)  # checkpoints/best
    best_ema = BestCheckpoint(run_dir, cfg.train.best_metric, cfg.train.best_mode, name="best_ema")

    step = 0
    ckpt = find_resume(run_dir, cfg.resume)
    if ckpt is not None:
        step = load_checkpoint(accelerator, ckpt, cfg)["step"]  # names the changed config key on a mismatch
        log.resumed(step, ckpt)
        best.restore()  # the best so far, so a worse evaluation after the resume does not replace it
        best_ema.restore()

    if cfg.eval_only:  # the resumed model (and its EMA)
        if ckpt is None:
            raise UserError(f"eval_only=true resume={cfg.resume}: no checkpoint in {run_dir / 'checkpoints'}")
        result = evaluate([model], val_loader, accelerator, cfg.loss, d.val_seed, run_dir / "vis" / "eval.png", cfg.save_vis)
        if ema is not None and cfg.ema.eval:
            ema_result = evaluate([ema.module], val_loader, accelerator, cfg.loss, d.val_seed)
            result |= {f"ema_{k}": v for k, v in ema_result.items()}
        log.eval(step, result | baseline)
        log.close()
        return result

    # ---- training loop
    h = cfg.model.handec
    supervised_mano = train_src.has_mano and (cfg.loss.global_orient or cfg.loss.hand_pose or cfg.loss.betas)
    history = [r["mpjpe"] for r in read_metrics(run_dir) if r["step"] <= step and "mpjpe" in r]  # fluctuation
    epoch, skip = divmod(step, steps_per_epoch)
    record: dict = {}
    model.train()
    while step < cfg.train.total_steps and not stop_requested(accelerator):
        train_loader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, skip * accum) if skip else train_loader
        skip = 0
        for batch in loader:
            if on_device:
                batch = device_aug_hand.hand_train_batch(batch, d.img_size)
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
            terms = {k: v for k, v in losses.items() if supervised_mano or k not in ("loss_theta", "loss_beta")}
            log.micro_batch({"total": loss} | terms)  # the step's logged loss = mean over its micro-batches
            if not accelerator.sync_gradients:
                continue
            step += 1
            if ema is not None:
                ema.update(model, step)
            log.train_step(step, lr=lr, images=global_batch, extra={"dropout": p_drop})

            if step % cfg.train.eval_interval == 0 or step == cfg.train.total_steps:
                vis = run_dir / "vis" / f"step_{step}.png" if cfg.save_vis else None
                metrics = evaluate([model], val_loader, accelerator, cfg.loss, d.val_seed, vis, cfg.save_vis)
                history.append(metrics["mpjpe"])
                metrics |= {"mpjpe_fluct": fluctuation(history)} | baseline
                ema_metrics = evaluate([ema.module], val_loader, accelerator, cfg.loss, d.val_seed) \
                    if ema is not None and cfg.ema.eval else {}
                record = metrics | {f"ema_{k}": v for k, v in ema_metrics.items()}
                log.eval(step, record)
                best.update(accelerator, model, step, metrics)
                if ema_metrics:
                    best_ema.update(accelerator, ema.module, step, ema_metrics)
            if step % cfg.train.ckpt_interval == 0 or step == cfg.train.total_steps:
                save_checkpoint(accelerator, run_dir, step, {"epoch": epoch}, cfg.train.max_keep_ckpts, metrics=record)
            if step >= cfg.train.total_steps or stop_requested(accelerator):
                break
        else:  # the whole epoch ran
            epoch += 1
    if step < cfg.train.total_steps:  # stopped by Ctrl-C / SIGTERM: save and say how to continue
        log.interrupted(step, save_checkpoint(accelerator, run_dir, step, {"epoch": epoch}, cfg.train.max_keep_ckpts))
    log.close()
    return record


if __name__ == "__main__":
    cli_main(main)()
