"""Face recognition under a parameter budget: identity folders -> embedding, verified on pairs by EER.

Run (1 CPU, 1 GPU, N GPUs or N nodes: whatever `accelerate config` / the launch flags say):
  accelerate launch train_face.py --config configs/face/sample.yaml                   # bundled sample, CPU < 2 min
  accelerate launch train_face.py --config configs/face/lfw.yaml                      # LFW folds 1-3 -> EER on 4-5
  accelerate launch train_face.py --config configs/face/resnet18_arcface.yaml         # the grid (train1 folders)
  accelerate launch train_face.py --config configs/face/finetune_train2.yaml \
      load_from=runs/resnet18_arcface/checkpoints/best                                # train2: new head, fine-tune
  accelerate launch train_face.py --config configs/face/phase1_baseline.yaml         # the plan's Phase 1 (10 epochs)
  accelerate launch train_face.py --config configs/face/resnet18_arcface.yaml eval_only=true \
      load_from=runs/resnet18_arcface/checkpoints/best data.test_pairs=test.csv       # -> predictions.csv
  accelerate launch train_face.py --config configs/face/lfw.yaml resume=auto          # continue a run
  python train_face.py --config configs/face/sample.yaml output_dir=runs/face_use \
      load_from=runs/face_sample/checkpoints/best predict='tests/data/face/val/*/*.jpg'  # -> predict/embeddings.npy
  python train_face.py --config configs/face/sample.yaml output_dir=runs/face_use \
      load_from=runs/face_sample/checkpoints/best export=onnx                          # -> export/model.onnx
  python train_face.py --config configs/face/lfw.yaml eval_only=true baseline=random   # chance-level EER row
  python train_face.py --help                                                         # every config key

The model (backbone + embedding) must fit `model.max_params` (11.5M) without its classification
head; the margin heads (lib/losses/face.py) hold the class weights under `model.heads`. The best
checkpoint is the one with the lowest validation EER (cosine scores of L2-normalised embeddings,
optionally averaged with the horizontally flipped image); `ema.decay=0.999` also keeps an EMA of the weights,
evaluated beside them (ema_EER, ...) with its own best in checkpoints/best_ema. `train.unit=epoch` counts
total_steps / intervals / schedule steps in epochs. Ctrl-C saves a step checkpoint (continue: resume=auto),
and a resume keeps the best checkpoint of the steps before it. `load_from` takes this script's
checkpoints (a different class count re-initialises the head only) or timm/torchvision backbone
files (lib/models/face.py); `model.backbone_weights` loads a local backbone file into a fresh model.
eval_only / predict / export build the embedding model only (no heads) and read no training folder:
a labelled `data.test_pairs` gets threshold-free test EER / TAR@FAR and the accuracy at the threshold
chosen on `data.val_pairs` (never fitted on the test pairs).
"""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F

import numpy as np

from lib.checkpoint import (BestCheckpoint, checkpoint_info, eval_members, find_resume, load_checkpoint,
                            load_weights, save_checkpoint, save_weights)
from lib.config import NonNegInt, PosInt, Range, RunConfig, TrainConfig, parse_config, resolve_units
from lib.data.common import EpochSampler, kfold_indices, make_loader
from lib.data.face import (FaceDataConfig, IdentityFolder, ImageList, PKSampler, build_mixup, build_transform,
                           lfw_identities, make_pairs, read_pairs, scan_identities)
from lib.ema import ModelEMA
from lib.errors import UserError
from lib.logging import RunLog
from lib.losses.face import FaceLossConfig, build_heads, face_losses, term_weights
from lib.metrics.face import cosine_scores, heldout_metrics, random_embeddings, save_roc, verification_metrics
from lib.models.face import (FaceModelConfig, FaceNet, check_budget, convert_state_dict, count_params,
                              load_backbone)
from lib.optim import build_optimizer, param_groups, scaled_lr
from lib.runtime import cli_main, convert_sync_batchnorm, setup_run, stop_requested
from lib.schedules import lr_scheduler


@dataclass
class EvalConfig:
    flip_tta: bool = True  # embedding of image + its mirror image
    batch_size: PosInt = 64  # per process
    far: Annotated[float, Range(gt=0, lt=1)] = 1e-3  # TAR@FAR
    patience: NonNegInt = 0  # early stopping: stop after this many evaluations without a better best_metric (0 = off)


@dataclass
class FaceConfig(RunConfig):
    train: TrainConfig = field(default_factory=lambda: TrainConfig(best_metric="EER", best_mode="min"))
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
    if cfg.data.folds and not (cfg.data.folds >= 2 and cfg.data.fold < cfg.data.folds):
        raise UserError(f"data.folds={cfg.data.folds}, data.fold={cfg.data.fold}: k-fold needs folds >= 2 and "
                        f"0 <= fold < folds")
    if cfg.baseline not in ("", "random"):
        raise UserError(f"baseline: face has 'random' (random embeddings), got '{cfg.baseline}'")
    if cfg.baseline and not cfg.eval_only:
        raise UserError("baseline=random is evaluated with eval_only=true")
    if (cfg.predict or cfg.export) and not cfg.load_from:
        raise UserError(f"{'predict' if cfg.predict else 'export'} needs load_from=PATH (a checkpoint folder or weights)")
    if cfg.data.sampler == "pk":  # each batch is one whole P x K block (see PKSampler): batch size P * K
        cfg.train.batch_size = cfg.data.classes_per_batch * cfg.data.images_per_class


@torch.no_grad()
def embed(models: list, loader, cfg: FaceConfig, accelerator) -> torch.Tensor:
    """(N, D) L2-normalised embeddings of the loader's images in dataset order; ensembles average members."""
    modes = [m.training for m in models]
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
    for m, mode in zip(models, modes):
        m.train(mode)
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
    """Scores of every pair, and EER / TAR@FAR / accuracy when the pairs are labelled.
    No models = the random-embedding baseline (cfg.seed, embed_dim) through the same scoring."""
    if models:
        emb = embed(models, loader, cfg, accelerator)  # (N, D)
    else:
        emb = random_embeddings(len(loader.dataset), cfg.model.embed_dim, cfg.seed)
    scores = cosine_scores(emb[index[:, 0]], emb[index[:, 1]])  # (P,)
    if labels is None:
        return scores, {}
    metrics = verification_metrics(scores, labels, cfg.eval.far)
    if roc_path is not None and accelerator.is_main_process:
        save_roc(scores, labels, roc_path, f"{len(labels)} pairs")
    return scores, metrics


def build_model(model_cfg: FaceModelConfig, *, loss_cfg: FaceLossConfig | None = None, num_classes: int = 0) -> FaceNet:
    """Backbone + embedding, with the loss terms' classification heads when num_classes > 0 (training)."""
    heads = build_heads(loss_cfg, model_cfg.embed_dim, num_classes) if num_classes else None
    return FaceNet(model_cfg, heads)


def load_model(model: FaceNet, path: str, log) -> None:
    """Weights of a checkpoint / backbone file; a head of another class count (fine-tuning) is re-initialised,
    a model without heads (eval / predict / export) skips them."""
    own = model.state_dict()

    def convert(sd):
        sd = convert_state_dict(sd)
        if not len(model.heads):  # verification needs no classification head
            return {k: v for k, v in sd.items() if not k.startswith("heads.")}
        for k, v in sd.items():
            if k.startswith("heads.") and k in own and own[k].shape != v.shape:
                log(f"fine-tuning: head '{k}' has {v.shape[0]} rows in {path}, the new task needs "
                    f"{own[k].shape[0]}: the classification head is re-initialised, the rest is loaded")
        return sd

    load_weights(model, path, convert, skip_mismatched=True, log=log)


def write_scores(path: Path, pairs, scores, threshold: float | None = None) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pair", "path_a", "path_b", "score"] + (["same"] if threshold is not None else []))
        for i, ((_, a, b), s) in enumerate(zip(pairs, scores.tolist())):
            w.writerow([i, a, b, f"{s:.6f}"] + ([int(s >= threshold)] if threshold is not None else []))


def use_trained(cfg: FaceConfig, accelerator, log, run_dir: Path) -> dict:
    """export / predict / eval_only: embedding models from load_from / ensemble / resume (no heads, no
    training data read), or the random-embedding baseline."""
    d = cfg.data
    paths = eval_members(cfg) if cfg.eval_only else [cfg.load_from]
    val_pairs = read_pairs(d.val_pairs, d.val_root, d.val_folds) if cfg.eval_only and d.val_pairs else []
    test_pairs = read_pairs(d.test_pairs, d.test_root) if cfg.eval_only and d.test_pairs else []
    if cfg.eval_only and not val_pairs and not test_pairs:
        raise UserError("eval_only=true needs data.val_pairs and/or data.test_pairs")
    if cfg.eval_only and not paths and not cfg.baseline:
        ckpt = find_resume(run_dir, cfg.resume)
        if ckpt is None:
            raise UserError(f"eval_only=true with resume={cfg.resume}: no checkpoint in {run_dir}")
        paths = [str(ckpt)]  # the resumed model (weights only)
    members, steps = [], []
    for path in paths if not cfg.baseline else []:
        m = build_model(cfg.model)
        load_model(m, path, log.info)
        steps.append(checkpoint_info(path)["step"])  # None: a plain weight file
        members.append(m)
    step = steps[0] if steps and steps[0] is not None else 0
    for path, st in zip(paths, steps):
        log.info(f"model: {path} ({'step ' + str(st) if st is not None else 'step unknown'})")
    if cfg.baseline:
        log.info(f"baseline=random: seeded (seed {cfg.seed}) random {cfg.model.embed_dim}-d embeddings, no model")
    result: dict = {}

    if cfg.export:  # the embedding model of load_from: (B, 3, S, S) image -> (B, D) embedding (not normalised)
        from lib.export import export_model, onnx_max_abs_diff

        x = torch.randn(2, 3, d.image_size, d.image_size, generator=torch.Generator().manual_seed(0))
        model = members[0].eval()
        meta = {"script": "train_face.py", "backbone": cfg.model.backbone, "embed_dim": cfg.model.embed_dim,
                "image_size": d.image_size, "mean": list(d.mean), "std": list(d.std), "step": step,
                "output": "embedding; L2-normalise and compare by cosine"}
        out = export_model(model, (x,), run_dir / "export", cfg.export, input_names=["image"],
                           output_names=["embedding"], metadata=meta)
        log.info(f"export: wrote {out} (step {step}; input (B, 3, {d.image_size}, {d.image_size}))")
        if cfg.export == "onnx":
            try:
                with torch.no_grad():
                    result["onnx_max_abs_diff"] = onnx_max_abs_diff(out, (x,), model(x))
                log.info(f"export: onnxruntime vs PyTorch max |diff| {result['onnx_max_abs_diff']:.2e}")
            except ImportError:
                log.info("export: onnxruntime not installed, output not checked")

    prepared = [accelerator.prepare_model(m, evaluation_mode=True) for m in members]
    if cfg.predict:  # embeddings of every input image (+ scores of data.test_pairs) -> output_dir/predict/
        from lib.predict import list_inputs

        images = list_inputs(cfg.predict)
        ds = ImageList(images, build_transform(d, train=False))
        loader = accelerator.prepare_data_loader(make_loader(ds, cfg.eval.batch_size, shuffle=False,
                                                             num_workers=cfg.train.num_workers))
        emb = embed(prepared, loader, cfg, accelerator)  # (N, D) L2-normalised
        out_dir = run_dir / "predict"
        pairs, scores = [], None
        if d.test_pairs:
            pairs = read_pairs(d.test_pairs, d.test_root)
            ploader, index = pair_loader(pairs, cfg, accelerator)
            scores, _ = verify(prepared, ploader, index, None, cfg, accelerator)
        if accelerator.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
            np.save(out_dir / "embeddings.npy", emb.numpy().astype(np.float32))
            (out_dir / "names.txt").write_text("".join(f"{p}\n" for p in images))
            if scores is not None:
                write_scores(out_dir / "scores.csv", pairs, scores)
        log.info(f"predict: {len(images)} images from {cfg.predict} -> {out_dir / 'embeddings.npy'} "
                 f"{tuple(emb.shape)} + names.txt" + (f"; {len(pairs)} pair scores of {d.test_pairs} -> "
                                                       f"scores.csv" if pairs else ""))
        result["predicted"] = len(images)

    if not cfg.eval_only:
        return result
    # ---- eval_only: validation pairs pick the threshold, labelled test pairs are scored with it
    for name, pairs, file in (("validation", val_pairs, d.val_pairs), ("test", test_pairs, d.test_pairs)):
        if pairs:
            labelled = sum(lab >= 0 for lab, _, _ in pairs)
            log.info(f"data: {len(pairs)} {name} pairs ({labelled} labelled) from {file}, images under "
                     f"{pairs[0][1].parent.parent}")
    if val_pairs:
        loader, index = pair_loader(val_pairs, cfg, accelerator)
        labels = torch.tensor([lab for lab, _, _ in val_pairs])
        _, result = verify(prepared, loader, index, labels, cfg, accelerator, run_dir / "roc.png")
        if len(prepared) > 1:
            for i, m in enumerate(prepared):
                result[f"member{i}_EER"] = verify([m], loader, index, labels, cfg, accelerator)[1]["EER"]
    if test_pairs:
        loader, index = pair_loader(test_pairs, cfg, accelerator)
        scores, _ = verify(prepared, loader, index, None, cfg, accelerator)
        threshold = result.get("threshold")
        test_labels = [lab for lab, _, _ in test_pairs]
        if min(test_labels) >= 0:  # labelled: threshold-free EER / TAR@FAR, accuracy at the validation threshold
            tm = heldout_metrics(scores, test_labels, threshold, cfg.eval.far)
            result |= {f"test_{k}": v for k, v in tm.items()}
            log.info("test: EER and TAR@FAR need no threshold; " + (
                f"test_acc uses the validation threshold {threshold:.4f}" if threshold is not None else
                "no validation pairs, so no threshold from validation: test_acc_at_test_eer_threshold is the "
                "accuracy at the test pairs' own EER threshold (fitted on the test pairs, optimistic)"))
        if accelerator.is_main_process:
            write_scores(run_dir / "predictions.csv", test_pairs, scores, threshold)
        thr = f" (same = score >= {threshold:.4f}, the best validation threshold)" if threshold is not None else ""
        log.info(f"wrote {len(test_pairs)} pair scores to {run_dir / 'predictions.csv'}{thr}")
    log.eval(step, result)
    return result


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(FaceConfig, sys.argv[1:] if argv is None else argv, __doc__)
    check_config(cfg)
    accelerator = setup_run(cfg, "face")
    run_dir = Path(cfg.output_dir)
    if cfg.eval_only or cfg.predict or cfg.export:  # a trained model (or the random baseline): no training data
        log = RunLog(accelerator, run_dir, 0, check_losses=False)
        result = use_trained(cfg, accelerator, log, run_dir)
        log.close()
        return result

    # ---- data: train identities (all / LFW folds / k-fold) and validation pairs
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
    train_loader = accelerator.prepare_data_loader(train_loader)  # this process's share of each epoch
    accum = accelerator.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_loader) / accum)
    cfg = resolve_units(cfg, steps_per_epoch)  # train.unit=epoch: epoch counts -> optimizer steps
    log = RunLog(accelerator, run_dir, cfg.train.total_steps, log_interval=cfg.train.log_interval,
                 check_losses=cfg.train.check_finite)
    shared = {p.parent.name for _, a, b in val_pairs for p in (a, b)} & set(train_ds.classes)
    if shared:
        log.info(f"warning: {len(shared)} validation identities are also train identities (e.g. {min(shared)})")
    mixup = build_mixup(d, num_classes, cfg.loss.label_smoothing)
    log.info(f"data: {len(train_ds)} train images of {num_classes} identities from {d.root} ({d.sampler} sampler, "
             f"batch {cfg.train.batch_size}/process, processes: {accelerator.num_processes}); "
             f"{len(val_pairs)} validation pairs" + (f" from {d.val_pairs}" if val_pairs and not d.folds else "")
             + f"; {steps_per_epoch} steps per epoch, {cfg.train.total_steps} steps")

    # ---- model: backbone + embedding (budgeted) + classification heads
    model = build_model(cfg.model, loss_cfg=cfg.loss, num_classes=num_classes)
    counts = count_params(model)
    log.info(f"model: {cfg.model.backbone} (width {cfg.model.width}{', ' + cfg.model.attn if cfg.model.attn else ''}) "
             f"+ {cfg.model.embed_dim}-d embedding: {counts['without_head']:,} params without the head "
             f"(budget {cfg.model.max_params:,}), {counts['total']:,} with the head ({'+'.join(cfg.loss.terms)})")
    accelerator.log({"params/without_head": counts["without_head"], "params/total": counts["total"]}, step=0)
    check_budget(counts, cfg.model.max_params)
    if cfg.model.backbone_weights:
        load_backbone(model, cfg.model.backbone_weights, log.info)
    if cfg.load_from:
        load_model(model, cfg.load_from, log.info)
    model = convert_sync_batchnorm(model, accelerator.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)

    # ---- optimizer and schedule (parameter groups from the plain model, before torch.compile)
    global_batch = cfg.train.batch_size * accelerator.num_processes * accum
    groups = param_groups(model, cfg.optim, head_prefixes=model.head_prefixes, lr=scaled_lr(cfg.optim, global_batch))
    optimizer = build_optimizer(groups, cfg.optim, accelerator.device)
    if cfg.compile:
        model = torch.compile(model)
    scheduler = lr_scheduler(optimizer, cfg.sched, cfg.train.total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = ModelEMA(model, cfg.ema.decay, cfg.ema.start_step) if cfg.ema.decay else None  # fp32 copy (+ heads)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)  # saved in step_N, restored by load_checkpoint
    val_loader, val_index = pair_loader(val_pairs, cfg, accelerator) if val_pairs else (None, None)
    val_labels = torch.tensor([lab for lab, _, _ in val_pairs])
    best = BestCheckpoint(run_dir, cfg.train.best_metric, cfg.train.best_mode)  # checkpoints/best (EER, min)
    best_ema = BestCheckpoint(run_dir, cfg.train.best_metric, cfg.train.best_mode, name="best_ema")

    step = 0
    ckpt = find_resume(run_dir, cfg.resume)
    if ckpt is not None:
        step = load_checkpoint(accelerator, ckpt, cfg)["step"]
        log.resumed(step, ckpt)
        best.restore(), best_ema.restore()  # a worse evaluation after the resume keeps the best so far

    # ---- training loop
    eval_every = cfg.train.eval_interval
    epoch, skip = divmod(step, steps_per_epoch)
    stale, stop = 0, False  # evaluations without a new best (early stopping: eval.patience)
    loss_sum, loss_n = torch.zeros((), device=accelerator.device), 0
    metrics: dict = {}
    model.train()
    while step < cfg.train.total_steps and not stop and not stop_requested(accelerator):
        train_loader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, skip * accum) if skip else train_loader
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
            log.micro_batch({"loss": loss} | losses if len(losses) > 1 else losses)  # logged: mean over micro-batches
            loss_sum, loss_n = loss_sum + loss.detach(), loss_n + 1  # every micro-batch, like the log line
            if not accelerator.sync_gradients:
                continue
            step += 1
            if ema is not None:
                ema.update(model, step)
            log.train_step(step, lr=lr, images=global_batch)

            if val_loader is not None and (step % eval_every == 0 or step == cfg.train.total_steps):
                _, metrics = verify([model], val_loader, val_index, val_labels, cfg, accelerator, run_dir / "roc.png")
                ema_metrics = {}
                if ema is not None and cfg.ema.eval:  # the averaged weights through the same pairs
                    _, ema_metrics = verify([ema.module], val_loader, val_index, val_labels, cfg, accelerator)
                train_loss = accelerator.reduce(loss_sum, "mean").item() / max(loss_n, 1)
                loss_sum, loss_n = torch.zeros_like(loss_sum), 0
                log.eval(step, {"epoch": step / steps_per_epoch, "loss": train_loss} | metrics
                         | {f"ema_{k}": v for k, v in ema_metrics.items()})
                if best.update(accelerator, model, step, metrics):  # train.best_metric / best_mode (EER, min)
                    stale = 0
                else:
                    stale += 1
                    if cfg.eval.patience and stale >= cfg.eval.patience:
                        log.info(f"early stop at step {step}: no better {best.metric} in {stale} evaluations "
                                 f"(best {best.value:.4f} at step {best.step})")
                        stop = True
                if ema_metrics:
                    best_ema.update(accelerator, ema.module, step, ema_metrics)
            if stop or step % cfg.train.ckpt_interval == 0 or step == cfg.train.total_steps:
                save_checkpoint(accelerator, run_dir, step, {"epoch": epoch}, cfg.train.max_keep_ckpts, metrics=metrics)
            if stop or step >= cfg.train.total_steps or stop_requested(accelerator):
                break
        epoch += 1
    if step < cfg.train.total_steps and not stop:  # stopped by Ctrl-C / SIGTERM: save, say how to continue
        state = {"epoch": step // steps_per_epoch}
        log.interrupted(step, save_checkpoint(accelerator, run_dir, step, state, cfg.train.max_keep_ckpts, metrics=metrics))
    elif val_loader is None:  # nothing to select by: the last weights are the "best"
        save_weights(accelerator, model, run_dir / "checkpoints" / "best", {"step": step})
        if ema is not None:
            save_weights(accelerator, ema.module, run_dir / "checkpoints" / "best_ema", {"step": step})
    log.close()
    return metrics


if __name__ == "__main__":
    cli_main(main)()
