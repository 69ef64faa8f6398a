"""3D hand pose metrics (root-relative MPJPE, PA-MPJPE) and keypoint overlay pictures.

    err = mpjpe(pred, gt)         # (B,) mean joint error per sample, in the input unit
    err = pa_mpjpe(pred, gt)      # (B,) after Procrustes alignment (rotation, scale, translation)
    summary = summarize({"mpjpe": e1 * 1000, "pa_mpjpe": e2 * 1000})  # mm: mean and std
    save_overlay(path, images, kp_gt, kp_pred)   # PNG grid, truth green, prediction red, legend strip below
    save_overlay(path, images, None, kp_pred)    # predictions only (no labels): legend says so
    fluctuation([41.0, 39.5, 40.2])              # std of val MPJPE over evaluations (the plan's "fluctuation")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from lib.data.common import denormalize  # noqa: F401 (used by overlays below)

# bones of the 21-joint hand (wrist, then thumb, index, middle, ring, pinky, base to tip)
BONES = [(0 if j % 4 == 1 else j - 1, j) for j in range(1, 21)]


def root_relative(joints: torch.Tensor, root: int = 0) -> torch.Tensor:
    return joints - joints[:, root:root + 1]


def mpjpe(pred: torch.Tensor, gt: torch.Tensor, root: int = 0) -> torch.Tensor:
    """(B, J, 3), (B, J, 3) -> (B,) mean Euclidean joint error after subtracting the root joint."""
    return (root_relative(pred, root) - root_relative(gt, root)).norm(dim=-1).mean(-1)


def procrustes_align(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Similarity transform (s, R, t) of `pred` (B, J, 3) closest to `gt` in least squares (Umeyama 1991)."""
    pred, gt = pred.double(), gt.double()
    mu_p, mu_g = pred.mean(1, keepdim=True), gt.mean(1, keepdim=True)
    p, g = pred - mu_p, gt - mu_g
    u, s, vt = torch.linalg.svd(p.transpose(1, 2) @ g)  # (B, 3, 3): H = P^T G
    d = torch.sign(torch.linalg.det(u @ vt))  # no reflections
    fix = torch.ones_like(s)
    fix[:, -1] = d
    rot = u @ torch.diag_embed(fix) @ vt  # applied as p @ rot
    scale = (s * fix).sum(-1) / p.pow(2).sum((1, 2)).clamp_min(1e-12)
    return scale[:, None, None] * p @ rot + mu_g


def pa_mpjpe(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(B,) mean joint error after Procrustes alignment with scale (root choice does not matter)."""
    return (procrustes_align(pred, gt) - gt.double()).norm(dim=-1).mean(-1).to(pred.dtype)


def summarize(errors: dict[str, torch.Tensor]) -> dict[str, float]:
    """{name: per-sample errors} -> {name: mean, name_std: std}."""
    out = {}
    for k, v in errors.items():
        v = v.double()
        out[k] = float(v.mean())
        out[f"{k}_std"] = float(v.std(unbiased=False))
    return out


def fluctuation(values: list[float]) -> float:
    """Population std of a metric over the evaluations so far (0 for fewer than two)."""
    return float(np.std(np.asarray(values, dtype=np.float64))) if len(values) > 1 else 0.0




def draw_keypoints(img: np.ndarray, kps: np.ndarray, color: tuple, radius: int = 2) -> np.ndarray:
    """Skeleton of (21, 2) pixel keypoints on an (H, W, 3) uint8 image."""
    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    for a, b in BONES:
        d.line([tuple(kps[a]), tuple(kps[b])], fill=color, width=1)
    for x, y in kps:
        d.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)
    return np.array(im)


GT_COLOR, PRED_COLOR = (0, 255, 0), (255, 0, 0)
LEGEND_HEIGHT = 16


def legend_strip(width: int, with_truth: bool) -> np.ndarray:
    """(LEGEND_HEIGHT, width, 3) black strip: a red swatch "prediction" [and a green one "truth"]."""
    im = Image.new("RGB", (width, LEGEND_HEIGHT))
    d = ImageDraw.Draw(im)
    x = 4
    for color, label in [(PRED_COLOR, "prediction")] + ([(GT_COLOR, "truth")] if with_truth else []):
        d.rectangle([x, 4, x + 8, 12], fill=color)
        d.text((x + 12, 2), label, fill=(255, 255, 255))
        x += 16 + 7 * len(label)
    return np.array(im)


def save_overlay(path: str | Path, images: torch.Tensor, kp_gt: torch.Tensor | None, kp_pred: torch.Tensor,
                 cols: int = 4, scale: int = 2) -> None:
    """PNG grid of crops (B, 3, H, W) with truth (green, if given) and predicted (red) 2D keypoints
    (B, 21, 2) in [-0.5, 0.5], and a legend strip below the grid."""
    tiles = []
    for i, (img, p) in enumerate(zip(images, kp_pred)):
        im = denormalize(img)
        h, w = im.shape[:2]
        im = np.array(Image.fromarray(im).resize((w * scale, h * scale), Image.BILINEAR))
        to_px = lambda k: ((k.float().cpu().numpy() + 0.5) * np.array([w, h]) * scale)  # noqa: E731
        if kp_gt is not None:
            im = draw_keypoints(im, to_px(kp_gt[i]), GT_COLOR)
        tiles.append(draw_keypoints(im, to_px(p), PRED_COLOR))
    rows = [np.concatenate(tiles[i:i + cols] + [np.zeros_like(tiles[0])] * (cols - len(tiles[i:i + cols])), 1)
            for i in range(0, len(tiles), cols)]
    grid = np.concatenate(rows, 0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([grid, legend_strip(grid.shape[1], kp_gt is not None)], 0)).save(path)
