"""Face recognition under a parameter budget: identity folders -> embedding, verified on pairs by EER.

Run (1 CPU, 1 GPU, N GPUs or N nodes: whatever `accelerate config` / the launch flags say):
  accelerate launch train_face.py --config configs/face/sample.yaml                   # bundled sample, CPU < 2 min
  accelerate launch train_face.py --config configs/face/lfw.yaml                      # LFW folds 1-3 -> EER on 4-5
  accelerate launch train_face.py --config configs/face/resnet18_arcface.yaml         # the grid (train1 folders)
  accelerate launch train_face.py --config configs/face/finetune_train2.yaml \
      load_from=runs/resnet18_arcface/checkpoints/best                                # train2: new head, fine-tune
  accelerate launch train_face.py --config configs/face/resnet18_arcface.yaml eval_only=true \
      load_from=runs/resnet18_arcface/checkpoints/best data.test_pairs=test.csv       # -> predictions.csv
  accelerate launch train_face.py --config configs/face/lfw.yaml resume=auto          # continue a run
  python train_face.py --help                                                         # every config key

The model (backbone + embedding) must fit `model.max_params` (11.5M) without its classification
head; the margin heads (lib/losses/face.py) hold the class weights under `model.heads`. The best
checkpoint is the one with the lowest validation EER (cosine scores of L2-normalised embeddings,
optionally averaged with the horizontally flipped image). `load_from` takes this script's
checkpoints (a different class count re-initialises the head only) or timm/torchvision backbone
files (lib/models/face.py); `model.backbone_weights` loads a local backbone file into a fresh model.
"""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lib.checkpoint import find_resume, load_checkpoint, load_weights, save_checkpoint, save_weights
from lib.config import RunConfig, parse_config
from lib.data.common import EpochSampler, kfold_indices, make_loader
from lib.data.face import (FaceDataConfig, IdentityFolder, ImageList, PKSampler, build_mixup, build_transform,
                           lfw_identities, make_pairs, read_pairs, scan_identities)
from lib.logging import RunLog
from lib.losses.face import FaceLossConfig, build_heads, face_losses, term_weights
from lib.metrics.face import cosine_scores, save_roc, verification_metrics
from lib.models.face import (FaceModelConfig, FaceNet, check_budget, convert_state_dict, count_params,
                              load_backbone)
from lib.optim import build_optimizer, param_groups, scaled_lr
from lib.runtime import UserError, cli_main, convert_sync_batchnorm, setup_run
from lib.schedules import lr_scheduler


@dataclass
class EvalConfig:
    flip_tta: bool = True  # embedding of image + its mirror image
    batch_size: int = 64  # per process
    far: float = 1e-3  # TAR@FAR
    patience: int = 0  # early stopping: stop after this many evaluations without a lower EER (0 = off)


@dataclass
class FaceConfig(RunConfig):
    data: FaceDataConfig = field(default_factory=FaceDataConfig)
    model: FaceModelConfig = field(default_factory=FaceModelConfig)
    loss: FaceLossConfig = field(default_factory=FaceLossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def check_config(cfg: FaceConfig) -> None:
    try:
        term_weights(cfg.loss)
    except ValueError as e:
        raise UserError(str(e)) from None
    if "triplet" in cfg.loss.terms and (cfg.data.sampler != "pk" or cfg.data.images_per_class < 2):
        raise UserError("loss triplet needs data.sampler=pk with data.images_per_class >= 2 (positives in the batch)")
    if (cfg.data.mixup_alpha > 0 or cfg.data.cutmix_alpha > 0) and cfg.loss.terms != ["softmax"]:
        raise UserError(f"MixUp/CutMix need loss.terms=[softmax] (soft targets), got {cfg.loss.terms}")
    if cfg.loss.sub_centers < 1:
        raise UserError("loss.sub_centers must be >= 1")
    if cfg.data.sampler == "pk":  # each batch is one whole P x K block (see PKSampler): batch size P * K
        cfg.train.batch_size = cfg.data.classes_per_batch * cfg.data.images_per_class


@torch.no_grad()
def embed(models: list, loader, cfg: FaceConfig, accelerator) -> torch.Tensor:
    """(N, D) L2-normalised embeddings of the loader's images in dataset order; ensembles average members."""
    for m in models:
        m.eval()
    chunks, order = [], []
    for batch in loader:
        img = batch["image"]  # (B, 3, S, S)
        e = 0
        for m in models:
            with accelerator.autocast():
                out = m(img).float()  # (B, D)
                if cfg.eval.flip_tta:
                    out = out + m(img.flip(3)).float()
            e = e + F.normalize(out, dim=1) / len(models)
        idx, e = accelerator.gather_for_metrics((batch["index"], F.normalize(e, dim=1)))
        chunks.append(e.cpu())
        order.append(idx.cpu())
    for m in models:
        m.train()
    out = torch.cat(chunks)
    return out[torch.cat(order).argsort()]


def pair_loader(pairs, cfg: FaceConfig, accelerator):
    """DataLoader over the unique images of `pairs` + (N, 2) image indices of each pair."""
    paths = sorted({p for _, a, b in pairs for p in (a, b)})
    pos = {p: i for i, p in enumerate(paths)}
    ds = ImageList(paths, build_transform(cfg.data, train=False))
    loader = make_loader(ds, cfg.eval.batch_size, shuffle=False, num_workers=cfg.train.num_workers,
                         pin_memory=accelerator.device.type == "cuda")
    index = torch.tensor([[pos[a], pos[b]] for _, a, b in pairs])
    return accelerator.prepare_data_loader(loader), index


def verify(models, loader, index, labels, cfg, accelerator, roc_path: Path | None = None):
    """Scores of every pair, and EER / TAR@FAR / accuracy when the pairs are labelled."""
    emb = embed(models, loader, cfg, accelerator)
    scores = cosine_scores(emb[index[:, 0]], emb[index[:, 1]])  # (P,)
    if labels is None:
        return scores, {}
    metrics = verification_metrics(scores, labels, cfg.eval.far)
    if roc_path is not None and accelerator.is_main_process:
        save_roc(scores, labels, roc_path, f"{len(labels)} pairs")
    return scores, metrics


def build_model(cfg: FaceConfig, num_classes: int) -> FaceNet:
    return FaceNet(cfg.model, build_heads(cfg.loss, cfg.model.embed_dim, num_classes))


def load_model(model: FaceNet, path: str, cfg: FaceConfig, log) -> None:
    """Weights of a checkpoint / backbone file; a head of another class count (fine-tuning) is re-initialised."""
    own = model.state_dict()

    def convert(sd):
        sd = convert_state_dict(sd)
        if cfg.eval_only:  # verification needs no classification head
            return {k: v for k, v in sd.items() if not k.startswith("heads.")}
        for k, v in sd.items():
            if k.startswith("heads.") and k in own and own[k].shape != v.shape:
                log(f"fine-tuning: head '{k}' has {v.shape[0]} rows in {path}, the new task needs "
                    f"{own[k].shape[0]}: the classification head is re-initialised, the rest is loaded")
        return sd

    load_weights(model, path, convert, skip_mismatched=True, log=log)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(FaceConfig, sys.argv[1:] if argv is None else argv, __doc__)
    check_config(cfg)
    accelerator = setup_run(cfg, "face")
    run_dir = Path(cfg.output_dir)
    log = RunLog(accelerator, run_dir, cfg.train.total_steps, log_interval=cfg.train.log_interval,
                 check_losses=cfg.train.check_finite)

    # ---- data: train identities (all / LFW folds / k-fold), validation and test pairs
    d = cfg.data
    identities = lfw_identities(d.identities_from, d.train_folds) if d.identities_from else None
    train_idx = None
    val_pairs = read_pairs(d.val_pairs, d.val_root, d.val_folds) if d.val_pairs and not d.folds else []
    if d.folds:  # identity-disjoint k-fold over the train folder; validation pairs from the held-out identities
        samples, _ = scan_identities(d.root, identities, d.min_images)
        labels = [lab for _, lab in samples]
        train_idx, val_idx = kfold_indices(len(samples), d.folds, d.fold, seed=cfg.seed, groups=labels)
        val_pairs = [(s, samples[val_idx[i]][0], samples[val_idx[j]][0])
                     for s, i, j in make_pairs([labels[i] for i in val_idx], d.fold_pairs, cfg.seed)]
    train_ds = IdentityFolder(d.root, build_transform(d, train=True), identities, cfg.seed, train_idx, d.min_images)
    num_classes = len(train_ds.classes)
    shared = {p.parent.name for _, a, b in val_pairs for p in (a, b)} & set(train_ds.classes)
    if shared:
        log.info(f"warning: {len(shared)} validation identities are also train identities (e.g. {min(shared)})")
    loader_kw = dict(num_workers=cfg.train.num_workers, pin_memory=accelerator.device.type == "cuda")
    if d.sampler == "pk":
        sampler = PKSampler(train_ds.labels, d.classes_per_batch, d.images_per_class, accelerator.num_processes,
                            cfg.seed)
    else:
        sampler = EpochSampler(len(train_ds), True, cfg.seed)
    if len(sampler) < cfg.train.batch_size * accelerator.num_processes:
        raise UserError(f"train set has {len(train_ds)} images, fewer than one global batch "
                        f"({cfg.train.batch_size} x {accelerator.num_processes} processes)")
    train_loader = make_loader(train_ds, cfg.train.batch_size, shuffle=True, sampler=sampler, drop_last=True, **loader_kw)
    mixup = build_mixup(d, num_classes, cfg.loss.label_smoothing)
    log.info(f"data: {len(train_ds)} train images of {num_classes} identities from {d.root} ({d.sampler} sampler, "
             f"batch {cfg.train.batch_size}/process, processes: {accelerator.num_processes}); "
             f"{len(val_pairs)} validation pairs")

    # ---- model: backbone + embedding (budgeted) + classification heads
    model = build_model(cfg, num_classes)
    counts = count_params(model)
    log.info(f"model: {cfg.model.backbone} (width {cfg.model.width}{', ' + cfg.model.attn if cfg.model.attn else ''}) "
             f"+ {cfg.model.embed_dim}-d embedding: {counts['without_head']:,} params without the head "
             f"(budget {cfg.model.max_params:,}), {counts['total']:,} with the head ({'+'.join(cfg.loss.terms)})")
    accelerator.log({"params/without_head": counts["without_head"], "params/total": counts["total"]}, step=0)
    check_budget(counts, cfg.model.max_params)
    if cfg.model.backbone_weights:
        load_backbone(model, cfg.model.backbone_weights, log.info)
    if cfg.load_from:
        load_model(model, cfg.load_from, cfg, log.info)
    model = convert_sync_batchnorm(model, accelerator.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model = torch.compile(model)

    # ---- optimizer and schedule
    global_batch = cfg.train.batch_size * accelerator.num_processes * cfg.train.grad_accum_steps
    groups = param_groups(model, cfg.optim, head_prefixes=("heads.", "_orig_mod.heads."),
                          lr=scaled_lr(cfg.optim, global_batch))
    optimizer = build_optimizer(groups, cfg.optim, accelerator.device)
    scheduler = lr_scheduler(optimizer, cfg.sched, cfg.train.total_steps)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    val_loader, val_index = pair_loader(val_pairs, cfg, accelerator) if val_pairs else (None, None)
    val_labels = torch.tensor([lab for lab, _, _ in val_pairs])

    step = 0
    ckpt = find_resume(run_dir, cfg.resume)
    if ckpt is not None:
        step = load_checkpoint(accelerator, ckpt)["step"]
        log.info(f"resumed from {ckpt} at step {step}")

    if cfg.eval_only:
        members = [model]
        for path in cfg.ensemble:
            m = build_model(cfg, num_classes)
            load_model(m, path, cfg, log.info)
            members.append(accelerator.prepare_model(m, evaluation_mode=True))
        if cfg.ensemble and not cfg.load_from:
            members = members[1:]
        if not cfg.load_from and not cfg.ensemble and ckpt is None:
            raise UserError("eval_only=true needs load_from=PATH, ensemble=[...] or resume=PATH")
        result: dict = {}
        if val_loader is not None:
            _, result = verify(members, val_loader, val_index, val_labels, cfg, accelerator, run_dir / "roc.png")
            if len(members) > 1:
                for i, m in enumerate(members):
                    _, mm = verify([m], val_loader, val_index, val_labels, cfg, accelerator)
                    result[f"member{i}_EER"] = mm["EER"]
            log.eval(step, result)
        if d.test_pairs:
            test_pairs = read_pairs(d.test_pairs, d.test_root)
            loader, index = pair_loader(test_pairs, cfg, accelerator)
            scores, _ = verify(members, loader, index, None, cfg, accelerator)
            if accelerator.is_main_process:
                with open(run_dir / "predictions.csv", "w", newline="") as f:
                    w = csv.writer(f)
                    w.writerow(["pair", "path_a", "path_b", "score"] + (["same"] if result else []))
                    for i, ((_, a, b), s) in enumerate(zip(test_pairs, scores.tolist())):
                        same = [int(s >= result["threshold"])] if result else []
                        w.writerow([i, a, b, f"{s:.6f}"] + same)
            thr = f" (same = score >= {result['threshold']:.4f}, the best validation threshold)" if result else ""
            log.info(f"wrote {len(test_pairs)} pair scores to {run_dir / 'predictions.csv'}{thr}")
        if val_loader is None and not d.test_pairs:
            raise UserError("eval_only=true needs data.val_pairs and/or data.test_pairs")
        log.close()
        return result

    # ---- training loop
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.grad_accum_steps)
    eval_every = cfg.train.eval_interval or steps_per_epoch  # 0 = every epoch
    epoch, skip = divmod(step, steps_per_epoch)
    best, stale, stop = None, 0, False
    loss_sum, loss_n = torch.zeros((), device=accelerator.device), 0
    metrics: dict = {}
    model.train()
    while step < cfg.train.total_steps and not stop:
        train_loader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, skip * cfg.train.grad_accum_steps) if skip else train_loader
        skip = 0
        for batch in loader:
            img, label = batch["image"], batch["label"]  # (B, 3, S, S), (B,)
            targets = None
            if mixup is not None:
                img, targets = mixup(img, label)  # (B, 3, S, S) mixed, (B, K) soft targets
            if cfg.channels_last:
                img = img.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                emb, logits = model(img, label)  # (B, D), {term: (B, K)}
                losses = face_losses(emb, logits, label, cfg.loss, targets)
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
            loss_sum, loss_n = loss_sum + loss.detach(), loss_n + 1
            log.train_step(step, {"loss": loss} | losses if len(losses) > 1 else losses, lr=lr, images=global_batch)

            if val_loader is not None and (step % eval_every == 0 or step == cfg.train.total_steps):
                _, metrics = verify([model], val_loader, val_index, val_labels, cfg, accelerator, run_dir / "roc.png")
                train_loss = accelerator.reduce(loss_sum, "mean").item() / max(loss_n, 1)
                loss_sum, loss_n = torch.zeros_like(loss_sum), 0
                log.eval(step, {"epoch": step / steps_per_epoch, "loss": train_loss} | metrics)
                key = cfg.train.best_metric or "EER"  # EER: lower is better, whatever train.best_mode says
                maximize = key != "EER" and cfg.train.best_mode == "max"
                better = best is None or (metrics[key] > best if maximize else metrics[key] < best)
                if better:
                    best, stale = metrics[key], 0
                    save_weights(accelerator, model, run_dir / "checkpoints" / "best",
                                 {"step": step, key: best, "threshold": metrics["threshold"]})
                else:
                    stale += 1
                    if cfg.eval.patience and stale >= cfg.eval.patience:
                        log.info(f"early stop at step {step}: no better {key} in {stale} evaluations (best {best:.4f})")
                        stop = True
            if stop or step % cfg.train.ckpt_interval == 0 or step == cfg.train.total_steps:
                save_checkpoint(accelerator, run_dir, step, {"epoch": epoch}, cfg.train.max_keep_ckpts)
            if stop or step >= cfg.train.total_steps:
                break
        epoch += 1
    if val_loader is None:  # nothing to select by: the last weights are the "best"
        save_weights(accelerator, model, run_dir / "checkpoints" / "best", {"step": step})
    log.close()
    return metrics


if __name__ == "__main__":
    cli_main(main)()
