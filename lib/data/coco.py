"""COCO person keypoints, top-down: one sample per person box, mmpose 0.x TopDown pipeline.

    ds = CocoPoseDataset(cfg, "train", train=True, seed=0)   # ground-truth boxes of annotated persons
    ds = CocoPoseDataset(cfg, "val", train=False)             # detection boxes (cfg.det_file) or gt boxes
    tr, va = fold_image_ids(load_coco_json(Path(cfg.root) / cfg.train_ann), k=5, fold=0)  # image-disjoint folds
    ds = CocoPoseDataset(cfg, "train", train=False, image_ids=va)             # fold 0 of the train annotations
    mean = mean_pose(ds.items, aspect=0.75)                    # (J, 2) mean joints in the padded box, [0, 1]
    ds[(index, epoch)] -> {"image": (3, h, w) float, "target": (J, h/4, w/4), "target_weight": (J,),
                           "center": (2,), "scale": (2,), "box_score": (), "image_id": ()}
    # data.aug_device=device (train): "image" is the decoded (3, H, W) uint8 source and "affine" (2, 3)
    # maps crop pixels to source pixels; collate with lib.data.device_aug_pose.collate, finish with
    # device_aug_pose.pose_train_batch on the GPU

Box -> crop: center of the box, width/height enlarged to the input aspect ratio, times
`bbox_padding` (1.25); `scale` is the crop size in image pixels (mmpose's scale * 200).
Training augmentations, in mmpose's order: center shift (p 0.3, 0.16 of the box), horizontal
flip with joint pairs (p 0.5), half body (p 0.3, > 8 visible joints), scale N(1, 0.35) clipped to
[0.65, 1.35], rotation N(0, 45) clipped to +-90 with p 0.6; then the affine crop (bilinear,
cv2.warpAffine's pixel convention) and sigma-2 Gaussian target heatmaps at 1/4 resolution
(`unbiased_encoding`: centred on the exact sub-pixel joint, DARK). Every random draw comes from
`sample_rng(seed, index, epoch)`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from PIL import Image

from lib.config import Frac, NonNegFloat, NonNegInt, PathStr, PosFloat, PosInt, Range, SubPath
from lib.data.common import (DataError, kfold_indices, read_image, require_dir, sample_rng, split_key,
                             to_tensor_normalized)
from lib.errors import UserError

COCO_KEYPOINTS = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                  "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
                  "left_knee", "right_knee", "left_ankle", "right_ankle"]
COCO_FLIP_PAIRS = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]
COCO_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]) / 10
UPPER_BODY = list(range(11))  # nose .. wrists


@dataclass
class PoseDataConfig:
    root: PathStr = "tests/data/pose"  # dataset folder; the five paths below are relative to it
    train_ann: SubPath = "test_coco.json"  # COCO person_keypoints_*.json, relative to root
    train_images: SubPath = "images"
    val_ann: SubPath = "test_coco.json"
    val_images: SubPath = "images"
    det_file: SubPath = ""  # person detections json for evaluation, relative to root ("" = ground-truth boxes)
    det_bbox_thr: Frac = 0.0  # keep detections scoring above this
    image_size: tuple[PosInt, PosInt] = (192, 256)  # (w, h); heatmaps are (w/4, h/4)
    sigma: PosFloat = 2.0  # Gaussian of the target heatmaps, in heatmap pixels
    unbiased_encoding: bool = True
    bbox_padding: PosFloat = 1.25
    shift_prob: Frac = 0.3
    shift_factor: NonNegFloat = 0.16
    flip_prob: Frac = 0.5
    half_body_prob: Frac = 0.3
    half_body_min_joints: NonNegInt = 8
    scale_factor: Annotated[float, Range(ge=0, lt=1)] = 0.35  # scale N(1, f) clipped to [1 - f, 1 + f]
    rot_factor: NonNegFloat = 45.0  # rotation N(0, f) degrees clipped to +-2f
    rot_prob: Frac = 0.6
    folds: NonNegInt = 0  # k >= 2: k-fold over the training IMAGES (sweep.py --folds); validate on fold `fold` of train_ann
    fold: NonNegInt = 0  # the held-out fold (0 <= fold < folds); the split is fixed (seed 0), the same for every run seed
    # more COCO folders to train on, each read with train_ann / train_images (e.g. [../shared/data/coco_tiny]);
    # their images that are also in the validation annotations are left out (the log says how many)
    extra_train: list[PathStr] = field(default_factory=list)
    # where the train affine crop runs: "cpu" = in the loader workers (PIL); "device" = workers decode,
    # draw the augmentation and build the targets, lib.data.device_aug_pose.pose_train_batch warps on the GPU
    aug_device: Literal["cpu", "device"] = "cpu"


# ----------------------------------------------------------------------------- geometry
def box_to_center_scale(box, aspect: float, padding: float = 1.25) -> tuple[np.ndarray, np.ndarray]:
    """(x, y, w, h) -> center (2,), crop size (2,) in pixels with aspect w/h = `aspect`, padded."""
    x, y, w, h = box
    center = np.array([x + w * 0.5, y + h * 0.5], np.float32)
    if w > aspect * h:
        h = w / aspect
    else:
        w = h * aspect
    return center, np.array([w, h], np.float32) * padding


def affine_matrix(center, scale, rot: float, out_size) -> np.ndarray:
    """2x3 map image -> crop (pixel-index coords): scale by out_w / scale_w, rotate by -rot degrees
    about `center` (positive rot turns the person counter-clockwise in the crop), center -> crop centre."""
    k = out_size[0] / scale[0]
    c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    a = k * np.array([[c, s], [-s, c]])
    t = np.array([out_size[0] * 0.5, out_size[1] * 0.5]) - a @ np.asarray(center, np.float64)
    return np.concatenate([a, t[:, None]], axis=1)


def affine_points(pts: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(K, 2) points through a 2x3 matrix."""
    return pts @ m[:, :2].T + m[:, 2]


def warp_image(img: np.ndarray, m: np.ndarray, out_size) -> np.ndarray:
    """cv2.warpAffine(img, m, out_size, INTER_LINEAR) with PIL: out(p) = img(m^-1 p), zeros outside."""
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    a, t = inv[:, :2], inv[:, 2]
    c = t + 0.5 - a @ np.array([0.5, 0.5])  # PIL samples at pixel centres (x + 0.5)
    data = (a[0, 0], a[0, 1], c[0], a[1, 0], a[1, 1], c[1])
    return np.array(Image.fromarray(img).transform(tuple(out_size), Image.Transform.AFFINE, data,
                                                     resample=Image.Resampling.BILINEAR))


def crop_to_source(m: np.ndarray, flip_width: int | None = None) -> np.ndarray:
    """(2, 3) float64 map crop pixel -> source pixel of the image -> crop matrix `m` (what warp_image
    samples at); with `flip_width` w, `m` is on the image flipped left-right (x -> w - 1 - x) and the
    result reads the unflipped one."""
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    if flip_width is not None:
        inv = np.array([[-1.0, 0.0, flip_width - 1.0], [0.0, 1.0, 0.0]]) @ np.vstack([inv, [0, 0, 1]])
    return np.ascontiguousarray(inv, dtype=np.float64)


def encode_heatmaps(joints: np.ndarray, visible: np.ndarray, size, sigma: float = 2.0,
                    unbiased: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Joints (K, 2) in heatmap pixels -> Gaussian targets (K, h, w) and weights (K,) (mmpose MSRA).

    unbiased: exp(-d^2 / 2 sigma^2) around the exact joint over the whole map (DARK); otherwise
    around the rounded joint, cut to a (6 sigma + 1) window. Weight 0 for invisible joints and for
    joints whose 3-sigma window misses the map.
    """
    w, h = size
    k = len(joints)
    target, weight = np.zeros((k, h, w), np.float32), (np.asarray(visible) > 0).astype(np.float32)
    xs, ys = np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)
    r = sigma * 3
    for j in range(k):
        mx, my = (float(joints[j, 0]), float(joints[j, 1])) if unbiased else \
            (float(int(joints[j, 0] + 0.5)), float(int(joints[j, 1] + 0.5)))
        if mx - r >= w or my - r >= h or mx + r + 1 < 0 or my + r + 1 < 0:
            weight[j] = 0
        if weight[j] == 0:
            continue
        g = np.exp(-((xs[None] - mx) ** 2 + (ys[:, None] - my) ** 2) / (2 * sigma ** 2))
        if not unbiased:  # window of 6 sigma + 1 around the rounded joint
            g *= (np.abs(xs[None] - mx) <= int(r)) & (np.abs(ys[:, None] - my) <= int(r))
        target[j] = g
    return target, weight


# ----------------------------------------------------------------------------- annotations
def load_coco_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"cannot parse {path}: {e}") from None
    if isinstance(data, dict):
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise DataError(f"{path} is not a COCO keypoints file (no '{key}')")
    return data


def person_instances(coco: dict, path: Path) -> list[dict]:
    """Annotated persons with keypoints (mmpose: skip crowd, empty keypoints, degenerate boxes)."""
    images = {im["id"]: im for im in coco["images"]}
    out = []
    for ann in coco["annotations"]:
        if ann.get("category_id", 1) != 1 or ann.get("iscrowd", 0) or max(ann.get("keypoints", [0])) == 0:
            continue
        if ann["image_id"] not in images:
            raise DataError(f"{path}: annotation {ann.get('id')} refers to unknown image {ann['image_id']}")
        im = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        x1, y1 = max(0.0, x), max(0.0, y)
        x2, y2 = min(im["width"] - 1.0, x1 + max(0.0, w)), min(im["height"] - 1.0, y1 + max(0.0, h))
        if ann.get("area", 1) <= 0 or x2 <= x1 or y2 <= y1:
            continue
        kpts = np.asarray(ann["keypoints"], np.float32).reshape(-1, 3)
        if len(kpts) != len(COCO_KEYPOINTS):
            raise DataError(f"{path}: annotation {ann.get('id')} has {len(kpts)} keypoints, expected 17")
        out.append({"file": im["file_name"], "image_id": im["id"], "box": (x1, y1, x2 - x1, y2 - y1),
                    "score": 1.0, "joints": kpts[:, :2], "visible": (kpts[:, 2] > 0).astype(np.float32)})
    return out


def detection_instances(dets: list, coco: dict, path: Path, thr: float) -> list[dict]:
    """Person detections (COCO results format) on the images of `coco`, score > thr."""
    if not isinstance(dets, list):
        raise DataError(f"{path}: a detection file is a json list of {{image_id, bbox, score, category_id}}")
    images = {im["id"]: im for im in coco["images"]}
    out = []
    for d in dets:
        if d.get("category_id", 1) != 1 or d["score"] <= thr or d["image_id"] not in images:
            continue
        im = images[d["image_id"]]
        out.append({"file": im["file_name"], "image_id": im["id"], "box": tuple(d["bbox"]), "score": float(d["score"]),
                    "joints": np.zeros((len(COCO_KEYPOINTS), 2), np.float32),
                    "visible": np.zeros(len(COCO_KEYPOINTS), np.float32)})
    if not out:
        raise DataError(f"{path}: no person detection above {thr} on the images of the annotation file")
    return out


def fold_image_ids(coco: dict, k: int, fold: int, seed: int = 0) -> tuple[set[int], set[int]]:
    """(train, val) image ids of fold `fold` of `k` over the images of `coco` (every person of an image
    lands in the same fold, so COCO AP on the held-out images is well defined)."""
    if k < 2 or not 0 <= fold < k:
        raise DataError(f"data.folds={k} / data.fold={fold}: need folds >= 2 and 0 <= fold < folds")
    ids = sorted(im["id"] for im in coco["images"])
    if len(ids) < k:
        raise DataError(f"data.folds={k}: the train annotations have only {len(ids)} images")
    tr, va = kfold_indices(len(ids), k, fold, seed=seed)
    return {ids[i] for i in tr}, {ids[i] for i in va}


def subset_images(coco: dict, image_ids: set[int]) -> dict:
    """The COCO dict restricted to `image_ids` (images and their annotations)."""
    return {**coco, "images": [im for im in coco["images"] if im["id"] in image_ids],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in image_ids]}


def mean_pose(items: list[dict], aspect: float, padding: float = 1.25) -> np.ndarray:
    """Mean joint positions (J, 2) of annotated persons, each normalised in its padded box crop
    (box_to_center_scale): (0, 0) = the crop's top-left corner, (1, 1) = its bottom-right. Joints
    never visible sit at the crop centre."""
    total, count = np.zeros((len(COCO_KEYPOINTS), 2)), np.zeros(len(COCO_KEYPOINTS))
    for it in items:
        center, scale = box_to_center_scale(it["box"], aspect, padding)
        uv = (it["joints"] - center) / scale + 0.5  # (J, 2)
        total += uv * it["visible"][:, None]
        count += it["visible"]
    return np.where(count[:, None] > 0, total / np.maximum(count, 1)[:, None], 0.5).astype(np.float32)


# ----------------------------------------------------------------------------- dataset
class CocoPoseDataset(torch.utils.data.Dataset):
    """One sample per person box; `image_ids` restricts it (and `self.coco`, used for COCO AP) to those images.
    Training adds the persons of `cfg.extra_train` whose image is not in `exclude_ids` (the val images)."""

    accepts_epoch_keys = True  # lib.data.common.make_loader hands (index, epoch) keys

    def __init__(self, cfg: PoseDataConfig, split: str, train: bool, seed: int = 0,
                 image_ids: set[int] | None = None, exclude_ids: set[int] = frozenset()):
        root = Path(cfg.root)
        ann, img_dir = (cfg.train_ann, cfg.train_images) if split == "train" else (cfg.val_ann, cfg.val_images)
        self.ann_file, self.img_dir = root / ann, require_dir(root / img_dir, "image")
        self.coco = load_coco_json(self.ann_file)
        if image_ids is not None:
            self.coco = subset_images(self.coco, image_ids)
        if split == "train" or not cfg.det_file:  # gt boxes; detections are for the val annotations' images
            self.items = person_instances(self.coco, self.ann_file)
        else:
            det_path = root / cfg.det_file
            self.items = detection_instances(load_coco_json(det_path), self.coco, det_path, cfg.det_bbox_thr)
        self.excluded = 0  # persons of cfg.extra_train left out: image in exclude_ids or already in the set
        for extra in cfg.extra_train if split == "train" else ():
            ann_file, img_dir = Path(extra) / cfg.train_ann, require_dir(Path(extra) / cfg.train_images, "image")
            coco = load_coco_json(ann_file)
            items = person_instances(coco, ann_file)
            skip = set(exclude_ids) | {it["image_id"] for it in self.items}
            kept = [{**it, "file": str(img_dir / it["file"])} for it in items if it["image_id"] not in skip]
            self.items += kept
            self.excluded += len(items) - len(kept)
        if not self.items:
            raise DataError(f"{self.ann_file}: no person with keypoints")
        if cfg.aug_device not in ("cpu", "device"):
            raise UserError(f"data.aug_device must be cpu or device, got {cfg.aug_device!r}")
        self.cfg, self.train, self.seed = cfg, train, seed
        self.on_device = train and cfg.aug_device == "device"  # batch goes through device_aug_pose.pose_train_batch
        self.flip_index = np.arange(len(COCO_KEYPOINTS))
        for a, b in COCO_FLIP_PAIRS:
            self.flip_index[a], self.flip_index[b] = b, a

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key) -> dict:
        i, epoch = split_key(key)
        it, cfg = self.items[i], self.cfg
        img = read_image(self.img_dir / it["file"])
        joints, vis = it["joints"].copy(), it["visible"].copy()
        center, scale = box_to_center_scale(it["box"], cfg.image_size[0] / cfg.image_size[1], cfg.bbox_padding)
        rot, flip = 0.0, False
        if self.train:
            flip, joints, vis, center, scale, rot = self.draw(img.shape[1], joints, vis, center, scale,
                                                              sample_rng(self.seed, i, epoch))
        m = affine_matrix(center, scale, rot, cfg.image_size)  # (2, 3) image (flipped if `flip`) -> crop
        hm_size = (cfg.image_size[0] // 4, cfg.image_size[1] // 4)
        target, weight = encode_heatmaps(affine_points(joints, m) / 4.0, vis, hm_size, cfg.sigma, cfg.unbiased_encoding)
        out = {"target": torch.from_numpy(target), "target_weight": torch.from_numpy(weight),
               "center": torch.from_numpy(center), "scale": torch.from_numpy(scale.astype(np.float32)),
               "box_score": torch.tensor(it["score"]), "image_id": torch.tensor(it["image_id"])}
        if self.on_device:  # image stays uint8 at its own size; lib.data.device_aug_pose does the crop
            return {"image": torch.from_numpy(img).permute(2, 0, 1), "affine": torch.from_numpy(
                crop_to_source(m, img.shape[1] if flip else None)), **out}
        if flip:
            img = np.ascontiguousarray(img[:, ::-1])
        return {"image": to_tensor_normalized(warp_image(img, m, cfg.image_size)), **out}

    def augment(self, img, joints, vis, center, scale, rng: np.random.Generator):
        """The CPU train augmentation of one sample: `draw`, with the image flipped when it says so."""
        flip, joints, vis, center, scale, rot = self.draw(img.shape[1], joints, vis, center, scale, rng)
        return np.ascontiguousarray(img[:, ::-1] if flip else img), joints, vis, center, scale, rot

    def draw(self, w: int, joints, vis, center, scale, rng: np.random.Generator):
        """Every random choice of one train sample (image width `w`), in mmpose's order ->
        (flip, joints, vis, center, scale, rot); joints and center are already in the flipped image."""
        cfg = self.cfg
        if rng.random() < cfg.shift_prob:  # TopDownRandomShiftBboxCenter
            center = center + rng.uniform(-1, 1, 2).astype(np.float32) * cfg.shift_factor * scale
        flip = bool(rng.random() < cfg.flip_prob)
        if flip:  # TopDownRandomFlip
            joints, vis = joints[self.flip_index], vis[self.flip_index]
            joints[:, 0] = w - 1 - joints[:, 0]
            center = np.array([w - 1 - center[0], center[1]], np.float32)
        if vis.sum() > cfg.half_body_min_joints and rng.random() < cfg.half_body_prob:
            hb = half_body(joints, vis, rng, cfg.image_size[0] / cfg.image_size[1])
            if hb is not None:
                center, scale = hb
        s = np.clip(rng.standard_normal() * cfg.scale_factor + 1, 1 - cfg.scale_factor, 1 + cfg.scale_factor)
        r = float(np.clip(rng.standard_normal() * cfg.rot_factor, -2 * cfg.rot_factor, 2 * cfg.rot_factor))
        rot = r if rng.random() <= cfg.rot_prob else 0.0
        return flip, joints, vis, center, scale * s, rot


def half_body(joints: np.ndarray, vis: np.ndarray, rng: np.random.Generator, aspect: float):
    """mmpose TopDownHalfBodyTransform: box around the visible upper or lower body joints, padded 1.5."""
    upper = [j for j in range(len(joints)) if vis[j] > 0 and j in UPPER_BODY]
    lower = [j for j in range(len(joints)) if vis[j] > 0 and j not in UPPER_BODY]
    sel = upper if (rng.random() < 0.5 and len(upper) > 2) else (lower if len(lower) > 2 else upper)
    if len(sel) < 2:
        return None
    pts = joints[sel]
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    center = pts.mean(axis=0).astype(np.float32)
    w, h = hi - lo
    if w > aspect * h:
        h = w / aspect
    else:
        w = h * aspect
    return center, np.array([w, h], np.float32) * 1.5



COCO_SKELETON = [(15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9),
                 (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]


def draw_poses(img: np.ndarray, poses: list[np.ndarray], thr: float = 0.3) -> np.ndarray:
    """(H, W, 3) uint8 with the skeletons of `poses` ((J, 3): x, y, score; joints scoring > thr) drawn on it."""
    from PIL import ImageDraw

    im = Image.fromarray(img)
    draw = ImageDraw.Draw(im)
    r = max(2, round(max(img.shape[:2]) / 200))
    for pose in poses:
        for a, b in COCO_SKELETON:
            if pose[a, 2] > thr and pose[b, 2] > thr:
                draw.line([tuple(pose[a, :2]), tuple(pose[b, :2])], fill=(0, 255, 0) if a % 2 else (255, 128, 0), width=r)
        for x, y, s in pose:
            if s > thr:
                draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 0, 0))
    return np.asarray(im)
