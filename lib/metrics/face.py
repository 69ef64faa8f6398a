"""Face verification metrics on pair scores: EER, TAR@FAR, best-threshold accuracy, ROC plot.

    scores = cosine_scores(emb_a, emb_b)               # (N,) in [-1, 1]
    m = verification_metrics(scores, labels)           # {"EER": %, "TAR@FAR=1e-3": %, "acc": %, "threshold": t}
    save_roc(scores, labels, run_dir / "roc.png")
    t = heldout_metrics(test_scores, test_labels, m["threshold"])   # threshold from validation, not test
    emb = random_embeddings(n, dim, seed)              # the trivial baseline's (n, dim) embeddings

Percentages (0-100). The ROC comes from scikit-learn's `roc_curve` with every threshold kept;
EER is where the false-accept rate equals the false-reject rate on that curve, linearly
interpolated between its two neighbouring points (so it is exact when the curve crosses on a
segment, not just the nearest threshold's max(FAR, FRR)).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_curve

from lib.errors import DataError


def cosine_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (N, D) -> (N,) cosine similarity of the L2-normalised embeddings."""
    return (F.normalize(a.float(), dim=1) * F.normalize(b.float(), dim=1)).sum(1)


def roc(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): a pair is accepted as same-person when score >= threshold."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(int)
    if labels.min() == labels.max():
        raise DataError(f"verification needs both same-person (1) and different-person (0) pairs, got {len(labels)} "
                        f"pairs all labelled {int(labels[0])}")
    return roc_curve(labels, scores, drop_intermediate=False)


def eer(scores, labels) -> tuple[float, float]:
    """(equal error rate in [0, 1], threshold at the crossing)."""
    fpr, tpr, thr = roc(scores, labels)
    d = fpr - (1 - tpr)  # FAR - FRR: rises from -1 to +1 along the curve
    i = int(np.argmax(d >= 0))
    if i == 0:
        return float(fpr[0]), float(thr[0])
    t = -d[i - 1] / (d[i] - d[i - 1])  # fraction of the way from point i-1 to point i
    rate = fpr[i - 1] + t * (fpr[i] - fpr[i - 1])
    finite = thr[i] if not np.isfinite(thr[i - 1]) else thr[i - 1] + t * (thr[i] - thr[i - 1])
    return float(rate), float(finite)


def tar_at_far(scores, labels, far: float = 1e-3) -> float:
    """Highest true-accept rate among thresholds whose false-accept rate is <= far."""
    fpr, tpr, _ = roc(scores, labels)
    return float(tpr[fpr <= far].max())


def best_accuracy(scores, labels) -> tuple[float, float]:
    """(accuracy, threshold) of the best single threshold (score >= t means same person)."""
    labels = np.asarray(labels).astype(int)
    fpr, tpr, thr = roc(scores, labels)
    n_pos, n_neg = labels.sum(), len(labels) - labels.sum()
    acc = (tpr * n_pos + (1 - fpr) * n_neg) / len(labels)
    i = int(np.argmax(acc))
    return float(acc[i]), float(thr[i])


def verification_metrics(scores, labels, far: float = 1e-3) -> dict[str, float]:
    scores = scores.cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    e, e_thr = eer(scores, labels)
    acc, acc_thr = best_accuracy(scores, labels)
    return {"EER": 100 * e, f"TAR@FAR={far:g}": 100 * tar_at_far(scores, labels, far), "acc": 100 * acc,
            "threshold": acc_thr, "eer_threshold": e_thr, "pairs": int(len(labels))}


def accuracy_at(scores, labels, threshold: float) -> float:
    """Accuracy (0-1) of "same person when score >= threshold"."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(int)
    return float(((scores >= threshold).astype(int) == labels).mean())


def heldout_metrics(scores, labels, threshold: float | None = None, far: float = 1e-3) -> dict[str, float]:
    """Held-out pairs: threshold-free EER / TAR@FAR, and the accuracy at a threshold chosen elsewhere
    (validation). Without one, the accuracy at these pairs' own EER threshold, named so
    (`acc_at_test_eer_threshold`: fitted on the pairs it scores, an optimistic number)."""
    scores = scores.cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    e, e_thr = eer(scores, labels)
    out = {"EER": 100 * e, f"TAR@FAR={far:g}": 100 * tar_at_far(scores, labels, far)}
    if threshold is not None:
        out |= {"acc": 100 * accuracy_at(scores, labels, threshold), "threshold": float(threshold)}
    else:
        out |= {"acc_at_test_eer_threshold": 100 * accuracy_at(scores, labels, e_thr), "eer_threshold": e_thr}
    return out | {"pairs": int(len(labels))}


def random_embeddings(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(n, dim) L2-normalised Gaussian embeddings from `seed`: the trivial "random embedding" baseline."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=1)


def save_roc(scores, labels, path: str | Path, title: str = "") -> None:
    """ROC curve (log-scale FAR) with the EER point marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = scores.cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    fpr, tpr, _ = roc(scores, labels)
    e, _ = eer(scores, labels)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    floor = 1.0 / max(int((labels == 0).sum()), 1)
    ax.plot(np.maximum(fpr, floor / 2), tpr, lw=1.5)
    ax.plot([e], [1 - e], "o", label=f"EER {100 * e:.2f}%")
    ax.set(xscale="log", xlim=(floor / 2, 1), ylim=(0, 1.01), xlabel="false accept rate",
           ylabel="true accept rate", title=title or "ROC")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
