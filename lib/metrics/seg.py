"""Segmentation metrics from a confusion matrix (mmseg definitions).

    cm = confusion_matrix(pred, label, num_classes, ignore_index)   # (K, K): rows = truth, cols = prediction
    m = seg_metrics(cm)   # {"mIoU", "mAcc", "aAcc"} in %, plus per-class "IoU" and "Acc" lists
Classes absent from the ground truth (and never predicted) are NaN and left out of the means.
"""

from __future__ import annotations

import numpy as np
import torch


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """pred, label: (..., H, W) int -> (K, K) int64 counts over valid pixels."""
    valid = label != ignore_index
    idx = label[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def seg_metrics(cm: torch.Tensor | np.ndarray) -> dict:
    cm = np.asarray(cm.cpu() if isinstance(cm, torch.Tensor) else cm, dtype=np.float64)
    tp = np.diag(cm)
    gt, pr = cm.sum(1), cm.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (gt + pr - tp)
        acc = tp / gt
    return {
        "mIoU": float(np.nanmean(iou) * 100),
        "mAcc": float(np.nanmean(acc) * 100),
        "aAcc": float(tp.sum() / max(cm.sum(), 1) * 100),
        "IoU": [float(x * 100) for x in iou],
        "Acc": [float(x * 100) for x in acc],
    }


def class_table(metrics: dict, class_names: list[str]) -> str:
    """Per-class IoU / Acc as a fixed-width text table."""
    lines = [f"{'class':<14}{'IoU':>8}{'Acc':>8}"]
    for name, iou, acc in zip(class_names, metrics["IoU"], metrics["Acc"]):
        lines.append(f"{name:<14}{iou:>8.2f}{acc:>8.2f}")
    return "\n".join(lines)
