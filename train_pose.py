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
  accelerate launch train_pose.py --config configs/pose/coco_s_v1.yaml resume=auto       # continue a run (also after Ctrl-C)
  accelerate launch train_pose.py --config configs/pose/coco_mini.yaml ema.decay=0.999   # + EMA weights: ema_AP, checkpoints/best_ema
  accelerate launch train_pose.py --config configs/pose/sample.yaml save_vis=4           # + pose pictures in vis/
  accelerate launch train_pose.py --config configs/pose/coco_mini.yaml eval_only=true baseline=mean_pose  # trivial row
  accelerate launch train_pose.py load_from=runs/pose_coco_mini/checkpoints/best predict=images/ \
      [predict_boxes=boxes.json]                                                         # keypoints.json + skeletons
  accelerate launch train_pose.py load_from=runs/pose_coco_mini/checkpoints/best export=onnx  # export/model.onnx
  python train_pose.py --help                                                            # every config key

Training uses ground-truth person boxes; evaluation uses `data.det_file` detections (or gt boxes
if empty). `load_from` takes this script's checkpoints and SDPose's mmpose checkpoints (key
mapping in lib/models/tokenpose.py).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from accelerate.utils import gather_object
from PIL import Image
from torch import nn

from lib.checkpoint import (BestCheckpoint, checkpoint_info, eval_members, find_resume, load_checkpoint, load_weights,
                            save_checkpoint)
from lib.config import (Frac, NonNegFloat, NonNegInt, PathStr, PosInt, Range, RunConfig, TrainConfig, parse_config,
                        resolve_units)
from lib.data import device_aug_pose
from lib.data.coco import (COCO_FLIP_PAIRS, COCO_KEYPOINTS, CocoPoseDataset, PoseDataConfig, affine_matrix,
                           box_to_center_scale, draw_poses, fold_image_ids, load_coco_json, mean_pose, warp_image)
from lib.data.common import make_loader, read_image, to_tensor_normalized
from lib.ema import ModelEMA
from lib.errors import DataError, ModelError, UserError
from lib.export import export_model, onnx_max_abs_diff
from lib.logging import RunLog
from lib.losses.pose import MaskedTokenDistilLoss, joints_mse, token_importance
from lib.metrics.pose import decode_heatmaps, evaluate_coco, heatmap_to_image, predict_heatmaps
from lib.models.tokenpose import TokenPose, convert_state_dict, tokenpose
from lib.optim import build_optimizer, param_groups, scaled_lr
from lib.predict import list_inputs, shard
from lib.runtime import cli_main, convert_sync_batchnorm, setup_run, stop_requested
from lib.schedules import lr_scheduler


@dataclass
class ModelConfig:
    name: Literal["t", "s-v1", "s-v2"] = "s-v1"  # SDPose preset
    cycle_num: NonNegInt = 0  # transformer cycles in training (0 = the preset's)
    test_cycle: PosInt = 1  # evaluation predicts from cycle test_cycle (SDPose: the first)
    depth: NonNegInt = 0  # 0 = the preset's
    dim: PosInt = 192
    heads: PosInt = 8


@dataclass
class TokenDistilConfig:  # lib.losses.pose.MaskedTokenDistilLoss
    loss_weight: NonNegFloat = 5e-6  # SDPose's TokenDistilLoss weight; 0 = off
    mask_ratio: Annotated[float, Range(ge=0, lt=1)] = 0.0  # fraction of token positions left out of the distillation
    mask_strategy: Literal["random", "importance"] = "random"
    detach_teacher: bool = False


@dataclass
class LossConfig:
    heatmap_weight: NonNegFloat = 1.0  # JointsMSE (target weights), summed over cycles
    # token self-distillation between cycles; null = the term is off (e.g. loss.vis_token=null)
    vis_token: TokenDistilConfig | None = field(default_factory=TokenDistilConfig)  # loss_vis_token_dist
    kpt_token: TokenDistilConfig | None = field(default_factory=TokenDistilConfig)  # loss_kpt_token_dist


@dataclass
class EvalConfig:
    batch_size: PosInt = 32
    flip_test: bool = True
    shift_heatmap: bool = True
    decode: Literal["dark", "default", "argmax"] = "dark"  # dark = mmpose post_process='unbiased'
    blur_kernel: PosInt = 11  # dark: Gaussian blur of the heatmaps before the Taylor step (odd)
    vis_thr: Frac = 0.2
    oks_thr: Frac = 0.9
    use_nms: bool = True


@dataclass
class PoseConfig(RunConfig):
    data: PoseDataConfig = field(default_factory=PoseDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(best_metric="AP", best_mode="max"))
    save_vis: NonNegInt = 0  # draw the predicted poses (after NMS) on this many val images per evaluation
    predict_boxes: PathStr = ""  # predict: person boxes json (COCO detections: file_name or image_id, bbox, score); "" = whole image


def build_model(cfg: PoseConfig) -> TokenPose:
    m = cfg.model
    try:
        return tokenpose(m.name, num_joints=len(COCO_KEYPOINTS), image_size=tuple(cfg.data.image_size),
                         cycle_num=m.cycle_num or None, test_cycle=m.test_cycle, depth=m.depth or None,
                         dim=m.dim, heads=m.heads)
    except ValueError as e:  # sizes that do not fit together
        raise ModelError(f"model config: {e}") from None


class Heatmaps(nn.Module):
    """The inference model (export): image (B, 3, H, W) -> heatmaps of the test cycle (B, J, H/4, W/4)."""

    def __init__(self, model: TokenPose):
        super().__init__()
        self.model = model

    def forward(self, img):
        return self.model(img)[-1]["heatmap"]


def person_boxes(path: str, images: list[Path]) -> dict[str, list[tuple]]:
    """predict_boxes json (a list of {file_name | image_id, bbox: [x, y, w, h], score}; a COCO image id
    matches a file named by that number) -> {image path: [(box, score), ...]}."""
    try:
        dets = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"predict_boxes: cannot read {path}: {e}") from None
    if not isinstance(dets, list) or not all(isinstance(d, dict) and "bbox" in d for d in dets):
        raise DataError(f"predict_boxes: {path} must be a json list of {{file_name or image_id, bbox, score}}")
    out: dict[str, list[tuple]] = {str(p): [] for p in images}
    by_name = {p.name: str(p) for p in images} | {p.stem.lstrip("0") or "0": str(p) for p in images if p.stem.isdigit()}
    for d in dets:
        key = by_name.get(str(d["file_name"])) if "file_name" in d else by_name.get(str(d.get("image_id")))
        if key is not None and d.get("category_id", 1) == 1:
            out[key].append((tuple(float(v) for v in d["bbox"]), float(d.get("score", 1.0))))
    return out


@torch.no_grad()
def predict_images(model, cfg: PoseConfig, accelerator, out_dir: Path) -> list[dict]:
    """Keypoints of every person box (or whole image) of `predict`: COCO results json + drawn skeletons.
    Each process predicts its shard of the images; the main process writes."""
    paths = list_inputs(cfg.predict)
    boxes = person_boxes(cfg.predict_boxes, paths) if cfg.predict_boxes else {}
    w, h = cfg.data.image_size
    results = []
    mine = shard(paths, accelerator.process_index, accelerator.num_processes)
    for j in range(math.ceil(len(paths) / accelerator.num_processes)):  # same number of rounds on every process
        done = []
        for path in mine[j:j + 1]:
            img = read_image(path)  # (H, W, 3)
            dets = boxes.get(str(path)) if cfg.predict_boxes else [((0.0, 0.0, img.shape[1], img.shape[0]), 1.0)]
            poses = []
            for box, score in dets:
                center, scale = box_to_center_scale(box, w / h, cfg.data.bbox_padding)
                crop = warp_image(img, affine_matrix(center, scale, 0.0, (w, h)), (w, h))
                x = to_tensor_normalized(crop)[None].to(accelerator.device)  # (1, 3, h, w)
                with accelerator.autocast():
                    hm = predict_heatmaps([model], x, COCO_FLIP_PAIRS, cfg.eval.flip_test, cfg.eval.shift_heatmap)
                xy, maxval = decode_heatmaps(hm, cfg.eval.decode, cfg.eval.blur_kernel)
                kpts = heatmap_to_image(xy, torch.from_numpy(center)[None].to(xy.device),
                                        torch.from_numpy(scale)[None].to(xy.device), (hm.shape[-1], hm.shape[-2]))
                pose = torch.cat([kpts[0], maxval[0, :, None]], dim=-1).cpu().numpy()  # (J, 3)
                valid = pose[:, 2] > cfg.eval.vis_thr
                poses.append({"file_name": Path(path).name, "image_id": int(Path(path).stem) if Path(path).stem.isdigit()
                              else -1, "category_id": 1, "bbox": list(box), "keypoints": pose.reshape(-1).tolist(),
                              "score": float(score * (pose[valid, 2].mean() if valid.any() else 0.0))})
            done.append((str(path), poses))
        for path, poses in gather_object(done):
            results += poses
            if accelerator.is_main_process:
                out_dir.mkdir(parents=True, exist_ok=True)
                drawn = draw_poses(read_image(path), [np.array(p["keypoints"]).reshape(-1, 3) for p in poses],
                                   cfg.eval.vis_thr)
                Image.fromarray(drawn).save(out_dir / f"{Path(path).stem}.jpg", quality=90)
    if accelerator.is_main_process:
        (out_dir / "keypoints.json").write_text(json.dumps(results))
    accelerator.wait_for_everyone()
    return results


@torch.no_grad()
def evaluate(models: list, loader, cfg: PoseConfig, accelerator, val_ds, vis_dir: Path | None = None,
             mean: np.ndarray | None = None) -> list[dict]:
    """COCO keypoint metrics of each model and, with several, of their heatmap-averaged ensemble (last).
    `mean` (J, 2) instead of models: the mean-pose baseline, joints at mean * crop size in each box (score 1)."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    rows: list[list[dict]] = [[] for _ in range(max(len(models) + (len(models) > 1), 1))]
    for batch in loader:
        with accelerator.autocast():
            hms = [predict_heatmaps([m], batch["image"], COCO_FLIP_PAIRS, cfg.eval.flip_test, cfg.eval.shift_heatmap)
                   for m in models]  # each (B, J, h, w) float32
        if len(models) > 1:
            hms.append(torch.stack(hms).mean(0))
        preds = [decode_heatmaps(hm, cfg.eval.decode, cfg.eval.blur_kernel) for hm in hms]  # (B, J, 2), (B, J)
        preds = [(xy, mv, (hm.shape[-1], hm.shape[-2])) for (xy, mv), hm in zip(preds, hms)]
        if mean is not None:  # the mean pose in crop units (1 x 1 "heatmap")
            b = batch["center"].shape[0]
            preds = [(torch.as_tensor(mean, device=batch["center"].device).expand(b, -1, -1),
                      batch["center"].new_ones(b, len(mean)), (1, 1))]
        for row, (xy, maxval, hm_size) in zip(rows, preds):
            kpts = heatmap_to_image(xy, batch["center"], batch["scale"], hm_size)
            row.append(accelerator.gather_for_metrics({
                "kpts": kpts, "maxval": maxval, "box_score": batch["box_score"],
                "area": batch["scale"].prod(-1), "image_id": batch["image_id"]}))
    for m, was_training in zip(models, modes):
        m.train(was_training)
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
    members = eval_members(cfg) if cfg.eval_only else []  # which weights eval_only evaluates, before any model
    if cfg.baseline and (cfg.baseline != "mean_pose" or not cfg.eval_only or members):
        raise UserError(f"baseline={cfg.baseline!r}: pose has baseline=mean_pose, with eval_only=true and "
                        "without load_from / ensemble")
    if cfg.eval.blur_kernel % 2 == 0:
        raise UserError(f"eval.blur_kernel={cfg.eval.blur_kernel}: the DARK blur kernel must be odd")

    # ---- use a trained model: predict / export (load_from only; no dataset is read)
    if cfg.predict or cfg.export:
        if not cfg.load_from:
            raise UserError("predict= and export= need load_from=CHECKPOINT (e.g. runs/x/checkpoints/best)")
        log = RunLog(accelerator, run_dir, 0, check_losses=False)
        model = build_model(cfg)
        load_weights(model, cfg.load_from, convert_state_dict, strict=True, log=log.info)
        step = checkpoint_info(cfg.load_from)["step"]
        result: dict = {}
        if cfg.predict:
            preds = predict_images(model.to(accelerator.device).eval(), cfg, accelerator, run_dir / "predict")
            log.info(f"predict: {len(preds)} persons in {cfg.predict} -> {run_dir / 'predict'} "
                     f"(keypoints.json + skeletons; weights of step {step})")
            result["predictions"] = len(preds)
        if cfg.export and accelerator.is_main_process:
            w, h = cfg.data.image_size
            x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
            net = Heatmaps(model.cpu()).eval()
            path = export_model(net, (x,), run_dir / "export", cfg.export, input_names=["image"],
                                output_names=["heatmaps"], metadata={
                                    "script": "train_pose.py", "model": f"SDPose-{cfg.model.name}", "step": step,
                                    "image_size": f"{w}x{h}", "flip_pairs": COCO_FLIP_PAIRS})
            log.info(f"export: {path} (weights of step {step}; input (B, 3, {h}, {w}) ImageNet-normalised crop, "
                     f"output heatmaps (B, 17, {h // 4}, {w // 4}))")
            if cfg.export == "onnx":
                with torch.no_grad():
                    result["onnx_max_abs_diff"] = onnx_max_abs_diff(path, (x,), net(x))
                log.info(f"export: onnxruntime vs PyTorch max |diff| {result['onnx_max_abs_diff']:.2e}")
            result["export"] = str(path)
        log.close()
        return result

    # ---- data: gt boxes for training, detections (or gt boxes) for evaluation; eval_only reads no training data
    d = cfg.data
    train_ids = val_ids = None
    if d.folds:  # k-fold over the training images: validate on fold d.fold of train_ann
        train_ids, val_ids = fold_image_ids(load_coco_json(Path(d.root) / d.train_ann), d.folds, d.fold)
    val_ds = CocoPoseDataset(d, "train" if d.folds else "val", train=False, image_ids=val_ids)
    loader_kw = dict(num_workers=cfg.train.num_workers, pin_memory=accelerator.device.type == "cuda")
    # the EpochSampler of make_loader hands the datasets (index, epoch) keys (augmentation = f(seed, index, epoch))
    val_loader = make_loader(val_ds, cfg.eval.batch_size, shuffle=False, **loader_kw)
    where = (f"fold {d.fold} of {d.folds} of {val_ds.ann_file}" if d.folds else str(val_ds.ann_file)) + \
        f" ({'detections ' + d.det_file if d.det_file and not d.folds else 'gt boxes'})"
    if cfg.eval_only:
        log = RunLog(accelerator, run_dir, 0, check_losses=False)
    if cfg.eval_only and not cfg.baseline:
        val_loader = accelerator.prepare_data_loader(val_loader)
        log.info(f"data: {len(val_ds)} val boxes from {where}; no training data read")
        if members:
            nets = []
            for path in members:
                m = build_model(cfg)
                load_weights(m, path, convert_state_dict, strict=True, log=log.info)
                nets.append(accelerator.prepare_model(m, evaluation_mode=True))
            step = checkpoint_info(members[0])["step"]
        else:  # the resumed model
            ckpt = find_resume(run_dir, cfg.resume)
            if ckpt is None:
                raise UserError(f"eval_only=true resume={cfg.resume}: no checkpoint in {run_dir / 'checkpoints'}")
            m = build_model(cfg)
            load_weights(m, ckpt, convert_state_dict, strict=True, log=log.info)
            nets, step = [accelerator.prepare_model(m, evaluation_mode=True)], checkpoint_info(ckpt)["step"]
        log.info(f"eval_only: {len(nets)} model(s), {members[0] if members else 'resumed'} at step "
                 f"{step if step is not None else 'unknown'}")
        results = evaluate(nets, val_loader, cfg, accelerator, val_ds, run_dir / "vis" if cfg.save_vis else None)
        result = dict(results[-1])  # the ensemble (or the single model)
        if len(nets) > 1:
            for i, r in enumerate(results[:-1]):
                result |= {f"member{i}_{k}": r[k] for k in ("AP", "AP50", "AP75", "AR")}
        log.eval(step or 0, result)
        log.close()
        return result

    train_ds = CocoPoseDataset(d, "train", train=True, seed=cfg.seed, image_ids=train_ids,
                               exclude_ids={im["id"] for im in val_ds.coco["images"]})  # for data.extra_train
    source = str(train_ds.ann_file) + (f" + data.extra_train {list(map(str, d.extra_train))} ({train_ds.excluded} "
                                       "persons on val or repeated images left out)" if d.extra_train else "")

    # ---- trivial baseline through the same eval path: the mean training pose placed in each box
    if cfg.baseline:
        log.info(f"data: {len(train_ds)} train persons (gt boxes) from {source} / {len(val_ds)} val "
                 f"boxes from {where}")
        mean = mean_pose(train_ds.items, d.image_size[0] / d.image_size[1], d.bbox_padding)  # (J, 2)
        result = evaluate([], accelerator.prepare_data_loader(val_loader), cfg, accelerator, val_ds,
                          run_dir / "vis" if cfg.save_vis else None, mean=mean)[0]
        log.eval(0, result)
        log.close()
        return result

    if len(train_ds) < cfg.train.batch_size * accelerator.num_processes:
        raise UserError(f"train set has {len(train_ds)} persons, fewer than one global batch "
                        f"({cfg.train.batch_size} x {accelerator.num_processes} processes)")
    on_device = d.aug_device == "device"  # workers decode + draw + build targets, the affine crop runs on the device
    train_loader = make_loader(train_ds, cfg.train.batch_size, shuffle=True, seed=cfg.seed, drop_last=True,
                               collate_fn=device_aug_pose.collate if on_device else None, **loader_kw)
    accum = accelerator.gradient_accumulation_steps
    global_batch = cfg.train.batch_size * accelerator.num_processes * accum
    # optimizer steps per epoch, as len(prepared train_loader) / grad_accum (accelerate shards the batches)
    steps_per_epoch = math.ceil(math.ceil(len(train_ds) // cfg.train.batch_size / accelerator.num_processes) / accum)
    cfg = resolve_units(cfg, steps_per_epoch)  # train.unit=epoch: epoch counts -> optimizer steps
    log = RunLog(accelerator, run_dir, cfg.train.total_steps, log_interval=cfg.train.log_interval,
                 check_losses=cfg.train.check_finite)
    log.info(f"data: {len(train_ds)} train persons (gt boxes) from {source} / {len(val_ds)} val boxes "
             f"from {where}; {steps_per_epoch} steps/epoch, {cfg.train.total_steps} steps")

    # ---- model and losses
    model = build_model(cfg)
    if cfg.load_from:
        load_weights(model, cfg.load_from, convert_state_dict, skip_mismatched=True, log=log.info)
    model = convert_sync_batchnorm(model, accelerator.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    log.info(f"model: TokenPose/SDPose-{cfg.model.name.upper()} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
             f"params, {model.cycle_num} cycles (eval: cycle {model.test_cycle})")
    num_joints = model.num_joints
    off = MaskedTokenDistilLoss(loss_weight=0.0)
    try:
        vis_loss = MaskedTokenDistilLoss(**vars(cfg.loss.vis_token)) if cfg.loss.vis_token else off
        kpt_loss = MaskedTokenDistilLoss(**vars(cfg.loss.kpt_token)) if cfg.loss.kpt_token else off
    except ValueError as e:
        raise UserError(f"loss config: {e}") from None
    need_attn = vis_loss.needs_attention or kpt_loss.needs_attention  # importance masking reads the attention
    distil = vis_loss.loss_weight > 0 or kpt_loss.loss_weight > 0

    # ---- optimizer and schedule (Adam, linear lr scaling, warm-up + multistep); groups before torch.compile
    groups = param_groups(model, cfg.optim, head_prefixes=model.head_prefixes, lr=scaled_lr(cfg.optim, global_batch))
    optimizer = build_optimizer(groups, cfg.optim, accelerator.device)
    scheduler = lr_scheduler(optimizer, cfg.sched, cfg.train.total_steps)
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler)
    ema = ModelEMA(model, cfg.ema.decay, cfg.ema.start_step) if cfg.ema.decay else None  # fp32 copy of the weights
    if ema is not None:
        accelerator.register_for_checkpointing(ema)  # saved in step_N, restored by load_checkpoint
    best = BestCheckpoint(run_dir, cfg.train.best_metric, cfg.train.best_mode)  # checkpoints/best (AP, max)
    best_ema = BestCheckpoint(run_dir, cfg.train.best_metric, cfg.train.best_mode, name="best_ema")

    step = 0
    ckpt = find_resume(run_dir, cfg.resume)
    if ckpt is not None:
        step = load_checkpoint(accelerator, ckpt, cfg)["step"]  # a changed model/data key is named
        log.resumed(step, ckpt)
        best.restore(), best_ema.restore()  # a worse evaluation after the resume keeps the best so far

    # ---- training loop
    epoch, skip = divmod(step, steps_per_epoch)
    record: dict = {}
    model.train()
    while step < cfg.train.total_steps and not stop_requested(accelerator):
        train_loader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, skip * accum) if skip else train_loader
        skip = 0
        for batch in loader:
            if on_device:
                batch = device_aug_pose.pose_train_batch(batch, d.image_size)
            img, target, weight = batch["image"], batch["target"], batch["target_weight"]  # (B,3,H,W) (B,J,h,w) (B,J)
            if cfg.channels_last:
                img = img.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                outs = model(img, need_attn=need_attn)  # one dict per cycle
                losses = {"loss_heatmap": cfg.loss.heatmap_weight * sum(joints_mse(o["heatmap"], target, weight)
                                                                        for o in outs)}
                if len(outs) > 1 and distil:  # SDPose: the deeper cycle i+1 teaches cycle i, visual and keypoint tokens apart
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
            log.micro_batch({"loss": loss} | losses if len(losses) > 1 else losses)  # logged: mean over micro-batches
            if not accelerator.sync_gradients:
                continue
            step += 1
            if ema is not None:
                ema.update(model, step)
            log.train_step(step, lr=lr, images=global_batch)

            if step % cfg.train.eval_interval == 0 or step == cfg.train.total_steps:
                metrics = evaluate([model], val_loader, cfg, accelerator, val_ds,
                                   run_dir / "vis" / f"step_{step}" if cfg.save_vis else None)[0]
                ema_metrics = {}
                if ema is not None and cfg.ema.eval:  # the averaged weights through the same eval, logged as ema_*
                    ema_metrics = evaluate([ema.module], val_loader, cfg, accelerator, val_ds)[0]
                record = metrics | {f"ema_{k}": v for k, v in ema_metrics.items()}
                log.eval(step, record)
                best.update(accelerator, model, step, metrics)
                if ema_metrics:
                    best_ema.update(accelerator, ema.module, step, ema_metrics)
            if step % cfg.train.ckpt_interval == 0 or step == cfg.train.total_steps:
                save_checkpoint(accelerator, run_dir, step, {"epoch": epoch}, cfg.train.max_keep_ckpts,
                                metrics=record)
            if step >= cfg.train.total_steps or stop_requested(accelerator):
                break
        epoch += 1
    if step < cfg.train.total_steps:  # stopped by Ctrl-C / SIGTERM: save and say how to continue
        log.interrupted(step, save_checkpoint(accelerator, run_dir, step, {"epoch": step // steps_per_epoch},
                                              cfg.train.max_keep_ckpts))
    log.close()
    return record


if __name__ == "__main__":
    cli_main(main)()
