r"""A minimal accelerate training script with the run handling of the four train_*.py scripts.

    python tests/mini_train.py output_dir=runs/mini train.total_steps=20 [key=value ...]
    accelerate launch --cpu --mixed_precision bf16 tests/mini_train.py output_dir=runs/mini

Used by tests/test_runtime.py, test_checkpoint.py and test_ema.py (run folder rule, Ctrl-C save,
resume, best checkpoint kept over a resume, EMA, self-describing checkpoints, trackers). Model: a
2-layer MLP regressing y = x @ w on fixed random data; each optimizer step takes the batch drawn
from (seed, step), so a resume is exact without a data loader. The metric is `score` = -val_loss,
or mini.scores[k] at the k-th evaluation when that list is given (to script a worse evaluation).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib.checkpoint import BestCheckpoint, checkpoint_info, find_resume, load_checkpoint, load_weights, save_checkpoint  # noqa: E402
from lib.config import RunConfig, parse_config  # noqa: E402
from lib.ema import ModelEMA  # noqa: E402
from lib.errors import DataError  # noqa: E402
from lib.logging import RunLog  # noqa: E402
from lib.runtime import cli_main, setup_run, stop_requested  # noqa: E402


@dataclass
class MiniSection:
    hidden: int = 8  # MLP width (changing it changes the architecture)
    sleep: float = 0.0  # seconds per step
    scores: list[float] = field(default_factory=list)  # score of the k-th evaluation (default: -val_loss)
    fail_at_start: bool = False  # a DataError before the first step


@dataclass
class MiniConfig(RunConfig):
    mini: MiniSection = field(default_factory=MiniSection)


def build_model(cfg: MiniConfig) -> nn.Module:
    torch.manual_seed(cfg.seed)
    return nn.Sequential(nn.Linear(4, cfg.mini.hidden), nn.Tanh(), nn.Linear(cfg.mini.hidden, 1))


@torch.no_grad()
def evaluate(model, x, y, cfg: MiniConfig, accelerator, n_eval: int) -> dict:
    model.eval()
    with accelerator.autocast():
        loss = float(F.mse_loss(model(x).float(), y))
    model.train()
    score = cfg.mini.scores[n_eval - 1] if n_eval <= len(cfg.mini.scores) else -loss
    return {"score": score, "val_loss": loss}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(MiniConfig, sys.argv[1:] if argv is None else argv, __doc__)
    accelerator = setup_run(cfg, "mini")
    run_dir = Path(cfg.output_dir)
    log = RunLog(accelerator, run_dir, cfg.train.total_steps, log_interval=cfg.train.log_interval)
    if cfg.mini.fail_at_start:
        raise DataError("mini.fail_at_start: no data here")

    g = torch.Generator().manual_seed(1234)
    x, w = torch.randn(64, 4, generator=g), torch.randn(4, 1, generator=g)
    y = x @ w
    x, y = x.to(accelerator.device), y.to(accelerator.device)
    model = build_model(cfg)
    if cfg.load_from:
        load_weights(model, cfg.load_from, strict=True, log=log.info)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = ModelEMA(model, cfg.ema.decay, cfg.ema.start_step) if cfg.ema.decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    best = BestCheckpoint(run_dir, cfg.train.best_metric or "score", cfg.train.best_mode)
    best_ema = BestCheckpoint(run_dir, cfg.train.best_metric or "score", cfg.train.best_mode, name="best_ema")

    step = 0
    ckpt = find_resume(run_dir, cfg.resume)
    if ckpt is not None:
        step = load_checkpoint(accelerator, ckpt, cfg)["step"]
        log.resumed(step, ckpt)
        best.restore(), best_ema.restore()

    if cfg.eval_only:
        if cfg.load_from:  # the step the weights were saved at, not 0
            step = checkpoint_info(cfg.load_from)["step"] or 0
        metrics = evaluate(model, x, y, cfg, accelerator, 1)
        log.eval(step, metrics)
        log.close()
        return metrics

    metrics: dict = {}
    n_eval = step // cfg.train.eval_interval
    model.train()
    log.info(f"train: steps {step + 1}..{cfg.train.total_steps}")
    while step < cfg.train.total_steps and not stop_requested(accelerator):
        time.sleep(cfg.mini.sleep)
        idx = torch.randperm(64, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + step))[:16]
        with accelerator.autocast():
            loss = F.mse_loss(model(x[idx]).float(), y[idx])
        accelerator.backward(loss)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if ema is not None:
            ema.update(model, step)
        log.train_step(step, {"loss": loss}, lr=lr, images=16)
        if step % cfg.train.eval_interval == 0 or step == cfg.train.total_steps:
            n_eval += 1
            metrics = evaluate(model, x, y, cfg, accelerator, n_eval)
            ema_metrics = evaluate(ema.module, x, y, cfg, accelerator, n_eval) if ema is not None else {}
            log.eval(step, metrics | {f"ema_{k}": v for k, v in ema_metrics.items()})
            best.update(accelerator, model, step, metrics)
            if ema is not None:
                best_ema.update(accelerator, ema.module, step, ema_metrics)
        if step % cfg.train.ckpt_interval == 0 or step == cfg.train.total_steps:
            save_checkpoint(accelerator, run_dir, step, {}, cfg.train.max_keep_ckpts, metrics=metrics)
    if step < cfg.train.total_steps:  # stopped by Ctrl-C / SIGTERM: save and say how to continue
        log.interrupted(step, save_checkpoint(accelerator, run_dir, step, {}, cfg.train.max_keep_ckpts))
    log.close()
    return metrics


if __name__ == "__main__":
    cli_main(main)()
