"""Top-down pose evaluation: flip test, heatmap ensembles, DARK decoding, rescoring, OKS-NMS, COCO AP.

    hm = predict_heatmaps([model], images, COCO_FLIP_PAIRS)        # (B, J, h, w), flip-averaged
    xy, maxval = decode_heatmaps(hm, "dark")                       # heatmap pixels, (B, J, 2), (B, J)
    kpts = heatmap_to_image(xy, center, scale, hm.shape[-1:-3:-1])  # image pixels
    metrics = evaluate_coco(gt_json_dict, kpts, maxval, box_score, area, image_id)  # AP, AP50, ...

Follows mmpose 0.x TopDownCocoDataset.evaluate: flip test averages the heatmaps of the image and
of its mirror (mirror heatmaps flipped back, joint pairs swapped, shifted 1 px right);
`dark` = DARK / mmpose's `post_process='unbiased'` (11x11 Gaussian blur preserving the maximum,
log, second-order Taylor step at the argmax); `default` = argmax + quarter pixel towards the
higher neighbour. Score of a person = box score x mean of its joint scores above `vis_thr`;
OKS-NMS at 0.9 per image; AP / AR from pycocotools' COCOeval (iouType 'keypoints').
A checkpoint ensemble averages the (flip-tested) heatmaps of its members before decoding.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import torch
import torch.nn.functional as F

from lib.data.coco import COCO_SIGMAS

METRIC_NAMES = ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]
# + "OKS": mean over the labelled ground-truth persons of the best OKS of any prediction in the same image
# (COCOeval's own OKS; 0 for a person without predictions). Not a COCO metric: a continuous number that
# still moves while AP (a threshold count from OKS 0.5 up) is 0, e.g. in short CPU runs.


# ----------------------------------------------------------------------------- heatmaps
def flip_back(hm: torch.Tensor, flip_pairs) -> torch.Tensor:
    """Heatmaps of a mirrored image (B, J, h, w) -> heatmaps in the original frame."""
    idx = list(range(hm.shape[1]))
    for a, b in flip_pairs:
        idx[a], idx[b] = b, a
    return hm[:, idx].flip(-1)


@torch.no_grad()
def predict_heatmaps(models, images: torch.Tensor, flip_pairs, flip_test: bool = True,
                     shift_heatmap: bool = True) -> torch.Tensor:
    """Mean over `models` (eval mode; each returns a list of cycles, the last one is used) of the
    (flip-tested) heatmaps: (B, 3, H, W) -> (B, J, H/4, W/4) float32."""
    out = 0
    for m in models:
        hm = m(images)[-1]["heatmap"].float()
        if flip_test:
            hf = flip_back(m(images.flip(-1))[-1]["heatmap"].float(), flip_pairs)
            if shift_heatmap:  # the mirrored features are off by one pixel
                hf = torch.cat([hf[..., :1], hf[..., :-1]], dim=-1)
            hm = (hm + hf) * 0.5
        out = out + hm
    return out / len(models)


def gaussian_blur(hm: torch.Tensor, kernel: int = 11) -> torch.Tensor:
    """cv2.GaussianBlur(k x k, sigma from k) of each zero-padded map, rescaled to keep its maximum."""
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    r = (kernel - 1) // 2
    g = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32, device=hm.device) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    b, j, h, w = hm.shape
    x = hm.reshape(b * j, 1, h, w)
    x = F.conv2d(F.conv2d(x, g.view(1, 1, 1, -1), padding=(0, r)), g.view(1, 1, -1, 1), padding=(r, 0))
    x = x.reshape(b, j, h, w)
    peak = hm.amax(dim=(2, 3), keepdim=True)
    return x * peak / x.amax(dim=(2, 3), keepdim=True).clamp(min=1e-12)


def decode_heatmaps(hm: torch.Tensor, method: str = "dark", kernel: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, J, h, w) -> joint positions in heatmap pixels (B, J, 2) and maxima (B, J)."""
    hm = hm.float()
    b, j, h, w = hm.shape
    maxval, idx = hm.reshape(b, j, -1).max(dim=-1)
    px, py = idx % w, idx // w
    xy = torch.stack([px, py], dim=-1).float()

    def at(m, dx, dy):  # m[b, j, py + dy, px + dx], indices clamped (only used where in range)
        yy, xx = (py + dy).clamp(0, h - 1), (px + dx).clamp(0, w - 1)
        return m.reshape(b, j, -1).gather(-1, (yy * w + xx)[..., None])[..., 0]

    if method == "default":
        inside = (px > 1) & (px < w - 1) & (py > 1) & (py < h - 1)
        d = torch.stack([at(hm, 1, 0) - at(hm, -1, 0), at(hm, 0, 1) - at(hm, 0, -1)], dim=-1)
        xy = xy + 0.25 * torch.sign(d) * inside[..., None]
    elif method == "dark":
        lg = torch.log(gaussian_blur(hm, kernel).clamp(min=1e-10))
        c = at(lg, 0, 0)
        dx, dy = 0.5 * (at(lg, 1, 0) - at(lg, -1, 0)), 0.5 * (at(lg, 0, 1) - at(lg, 0, -1))
        dxx = 0.25 * (at(lg, 2, 0) - 2 * c + at(lg, -2, 0))
        dyy = 0.25 * (at(lg, 0, 2) - 2 * c + at(lg, 0, -2))
        dxy = 0.25 * (at(lg, 1, 1) - at(lg, 1, -1) - at(lg, -1, 1) + at(lg, -1, -1))
        det = dxx * dyy - dxy * dxy
        ok = (px > 1) & (px < w - 2) & (py > 1) & (py < h - 2) & (det != 0)
        det = torch.where(ok, det, torch.ones_like(det))
        off = torch.stack([-(dyy * dx - dxy * dy) / det, -(dxx * dy - dxy * dx) / det], dim=-1)  # -H^-1 g
        xy = xy + off * ok[..., None]
    elif method != "argmax":
        raise ValueError(f"unknown heatmap decoding '{method}' (dark, default, argmax)")
    return xy * (maxval > 0)[..., None], maxval


def heatmap_to_image(xy: torch.Tensor, center: torch.Tensor, scale: torch.Tensor, heatmap_size) -> torch.Tensor:
    """Heatmap pixels (B, J, 2) -> image pixels, for crops of size `scale` (B, 2) around `center` (B, 2)."""
    size = torch.tensor(heatmap_size, dtype=torch.float32, device=xy.device)  # (w, h)
    return xy * (scale / size)[:, None] + (center - scale * 0.5)[:, None]


# ----------------------------------------------------------------------------- COCO evaluation
def oks_iou(g: np.ndarray, d: np.ndarray, area_g: float, area_d: np.ndarray, sigmas=COCO_SIGMAS) -> np.ndarray:
    """OKS of one pose g (J, 3) against poses d (N, J, 3) (mmpose's oks_iou, all joints)."""
    var = (sigmas * 2) ** 2
    e = ((d[..., 0] - g[:, 0]) ** 2 + (d[..., 1] - g[:, 1]) ** 2) / var / ((area_g + area_d[:, None]) / 2 + np.spacing(1)) / 2
    return np.exp(-e).mean(axis=1)


def oks_nms(kpts: np.ndarray, scores: np.ndarray, areas: np.ndarray, thr: float = 0.9, sigmas=COCO_SIGMAS) -> list[int]:
    """Greedy NMS by OKS: indices kept, highest score first."""
    order, keep = np.argsort(-scores, kind="stable"), []
    while len(order):
        i = order[0]
        keep.append(int(i))
        ovr = oks_iou(kpts[i], kpts[order[1:]], areas[i], areas[order[1:]], sigmas)
        order = order[1:][ovr <= thr]
    return keep


def rescore(maxval: np.ndarray, box_score: np.ndarray, vis_thr: float = 0.2) -> np.ndarray:
    """box score x mean joint score over joints scoring above vis_thr (0 if none): (N, J), (N,) -> (N,)."""
    valid = maxval > vis_thr
    kpt_score = np.where(valid, maxval, 0).sum(1) / np.maximum(valid.sum(1), 1)
    return kpt_score * box_score


def coco_eval(gt: dict, results: list[dict]) -> dict[str, float]:
    """pycocotools COCOeval('keypoints') of results [{image_id, category_id, keypoints, score}]."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {k: 0.0 for k in METRIC_NAMES + ["OKS"]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        dt = coco.loadRes(results)
        ev = COCOeval(coco, dt, "keypoints")
        ev.params.useSegm = None
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {k: float(v) for k, v in zip(METRIC_NAMES, ev.stats)}
    best = []  # per labelled (not ignored) gt person: its best OKS over the image's predictions
    for (img, cat), gts in ev._gts.items():
        ious = ev.ious.get((img, cat), [])  # (D, G), G in the order of ev._gts
        for g, gt in enumerate(gts):
            if not gt["ignore"]:
                best.append(float(np.max(ious[:, g])) if len(ious) else 0.0)
    out["OKS"] = float(np.mean(best)) if best else 0.0
    return out


def evaluate_coco(gt: dict, kpts: np.ndarray, maxval: np.ndarray, box_score: np.ndarray, area: np.ndarray,
                  image_id: np.ndarray, vis_thr: float = 0.2, oks_thr: float = 0.9, use_nms: bool = True,
                  return_results: bool = False):
    """Rescore, OKS-NMS per image, COCOeval. kpts (N, J, 2) image pixels, maxval (N, J), box_score /
    area (crop w x h) / image_id (N,). Returns the metrics dict (and the kept results)."""
    kpts, maxval = np.asarray(kpts, np.float64), np.asarray(maxval, np.float64)
    poses = np.concatenate([kpts, maxval[..., None]], axis=-1)  # (N, J, 3)
    scores = rescore(maxval, np.asarray(box_score, np.float64), vis_thr)
    area, image_id = np.asarray(area, np.float64), np.asarray(image_id).astype(np.int64)
    results = []
    for img in np.unique(image_id):
        idx = np.nonzero(image_id == img)[0]
        keep = oks_nms(poses[idx], scores[idx], area[idx], oks_thr) if use_nms else range(len(idx))
        for k in keep:
            i = idx[k]
            results.append({"image_id": int(img), "category_id": 1, "keypoints": poses[i].reshape(-1).tolist(),
                            "score": float(scores[i])})
    metrics = coco_eval(gt, results)
    return (metrics, results) if return_results else metrics
