"""3D hand data: FreiHAND-style folders, the hand3d real test set, WebDataset shards; crop + augment.

Sources (each gives raw JPEG/PNG bytes + a label dict {"K": 3x3, "xyz": 21x3 metres, ["mano": 58+]}):
  folder      FreiHAND layout: <root>/<split>/rgb/*.jpg, <root>/<split>_K.json, <root>/<split>_xyz.json
              [, <root>/<split>_mano.json: per image [[48 axis-angle pose, 10 betas, ...]]]; image i uses
              label i % len(labels) (FreiHAND's training set repeats its labels over 4 backgrounds).
  hand3d      ../shared/data/hand3d: images/*.jpg (256x256 crops), pose_gt.mat (N x 21 x 3, cm),
              params.mat cam_param [fx, fy, u0, v0] of the original image and bbox [x, y, w, h] of the crop:
              crop intrinsics = (fx, fy, u0 - x, v0 - y) * 256 / w.
  webdataset  tar shards written by `python -m lib.data.make_shards`: <root>/<split>.json (shard list in
              the wids format) + <root>/<split>-NNNNNN.tar holding <key>.jpg + <key>.json per sample.
              Read by an offset index (random access, like webdataset's `wids`), so shards go through
              the same EpochSampler as folders: samples and augmentations are identical.

    ds = HandDataset(source, cfg, train=True, seed=0, indices=None)
    ds[(index, epoch)] -> {"image": (3, S, S) float, "joints3d": (21, 3) root-relative metres,
                           "joints2d": (21, 2) crop coordinates in [-0.5, 0.5], "is_right": int64,
                           "has_mano", "mano_pose": (16, 3), "mano_betas": (10,), "index"}
    # data.aug_device=device (train): "image" is the decoded (3, H, W) uint8 source, "resize" (2,) its
    # antialias pre-resize (w, h), "affine" (2, 3) crop pixel -> resized-source pixel, "color" (3,);
    # collate with lib.data.device_aug_hand.collate, finish with device_aug_hand.hand_train_batch on the GPU

Crop: the whole image (`crop: image`) or a square box around the projected joints times `bbox_scale`.
Training augmentation, a function of (seed, epoch, index) only: box scale, rotation (3D joints and the
MANO global rotation are rotated about the camera axis with the image), translation, colour, and
horizontal flip: the 3D joints are mirrored (x -> -x) and the hand changes side (`is_right`). MANO
labels are those of the right hand seen in the (possibly mirrored) crop, so a flip leaves them as
they are. Handedness comes from the label's `is_right` or, if absent, from the skeleton's chirality.
Validation is deterministic. `val_seed` seeds every random choice of what is validated: the random
held-out split (`split_mode: random`), the k-fold split (`folds`), and (train_hand.py) the RNG of
every validation pass, whatever the split mode, so two runs validate identically.

Splits (`split_indices`): a separate `val_split` folder, or `val_count` samples held out of the train
split (the last ones, or random ones); with `folds: k`, k-fold over the remaining training samples
(validate on fold `fold`; the held-out / val_split set stays unseen for the ensemble of the k models).
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lib.config import Frac, NonNegFloat, NonNegInt, PathStr, PosFloat, PosInt, Range, SubPath
from lib.data.common import kfold_indices, require_dir, sample_rng, split_key, to_tensor_normalized
from lib.errors import DataError, UserError

IMG_EXTS = (".jpg", ".jpeg", ".png")


@dataclass
class HandAugConfig:
    scale: Annotated[float, Range(ge=0, lt=1)] = 0.3  # box side x U[1 - scale, 1 + scale]
    rotation: Annotated[float, Range(ge=0, le=180)] = 30.0  # degrees, U[-rotation, rotation] ...
    rotation_prob: Frac = 0.6  # ... with this probability
    translate: NonNegFloat = 0.05  # box centre shift, U[-t, t] x box side
    color: Frac = 0.2  # per-channel factor U[1 - color, 1 + color]
    flip_prob: Frac = 0.5  # mirror image and joints, the hand changes side


@dataclass
class HandDataConfig:
    format: Literal["folder", "hand3d", "webdataset"] = "folder"
    root: PathStr = "tests/data/hand"
    train_split: SubPath = "training"  # folder / webdataset split name under root (hand3d: ignored)
    val_split: SubPath = "evaluation"
    val_count: NonNegInt = 0  # > 0: validate on this many samples held out of the train split instead
    split_mode: Literal["tail", "random"] = "tail"  # held-out samples: the last val_count, or random ones
    val_seed: NonNegInt = 42  # seeds the random / k-fold split and the RNG of each validation pass (every split mode)
    folds: NonNegInt = 0  # k >= 2: k-fold over the training samples, validate on fold `fold` (sweep.py --folds)
    fold: NonNegInt = 0
    img_size: PosInt = 224
    crop: Literal["image", "keypoints"] = "image"
    bbox_scale: PosFloat = 1.5  # keypoints crop: box side = longer side of the joints' 2D box x this
    aug: HandAugConfig = field(default_factory=HandAugConfig)
    # where the train crop + colour run: "cpu" = in the loader workers (PIL); "device" = workers decode, draw
    # the augmentation and compute the labels, lib.data.device_aug_hand.hand_train_batch does the image on the GPU
    aug_device: Literal["cpu", "device"] = "cpu"


# ----------------------------------------------------------------------------- sources
def _read_json(path: Path):
    if not path.is_file():
        raise DataError(f"label file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"cannot parse {path}: {e}") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e}") from None


class FolderSource:
    """FreiHAND-style folder split (see the module docstring)."""

    def __init__(self, root: str | Path, split: str):
        root = Path(root)
        rgb = require_dir(root / split / "rgb", "image")
        self.images = sorted(p for p in rgb.iterdir() if p.suffix.lower() in IMG_EXTS)
        self.K, self.xyz = _read_json(root / f"{split}_K.json"), _read_json(root / f"{split}_xyz.json")
        mano_path = root / f"{split}_mano.json"
        self.mano = _read_json(mano_path) if mano_path.is_file() else None
        if not self.images:
            raise DataError(f"no images in {rgb}")
        n = len(self.xyz)
        if len(self.K) != n or (self.mano is not None and len(self.mano) != n):
            raise DataError(f"{root}: {split}_K.json / _xyz.json / _mano.json have different lengths")
        if n == 0 or len(self.images) % n:
            raise DataError(f"{rgb}: {len(self.images)} images is not a multiple of the {n} labels in {split}_xyz.json")
        self.has_mano = self.mano is not None

    def __len__(self) -> int:
        return len(self.images)

    def meta(self, i: int) -> dict:
        j = i % len(self.xyz)
        out = {"K": self.K[j], "xyz": self.xyz[j], "name": self.images[i].name}
        if self.mano is not None:
            out["mano"] = np.asarray(self.mano[j], dtype=np.float64).reshape(-1)[:58].tolist()
        return out

    def raw(self, i: int) -> tuple[bytes, str, dict]:
        return _read_bytes(self.images[i]), self.images[i].suffix.lower().lstrip("."), self.meta(i)


class Hand3DSource:
    """The real-world hand3d test set (Ge et al. 2019), joints converted from cm to metres."""

    has_mano = False

    def __init__(self, root: str | Path):
        from scipy.io import loadmat

        root = Path(root)
        require_dir(root / "images", "image")
        try:
            params, gt = loadmat(str(root / "params.mat")), loadmat(str(root / "pose_gt.mat"))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {root}/params.mat or pose_gt.mat: {e}") from None
        self.root = root
        self.paths = [str(p).strip() for p in params["image_path"]]
        self.xyz = gt["pose_gt"].astype(np.float64) / 100.0  # (N, 21, 3) cm -> m
        cam, box = params["cam_param"].astype(np.float64), params["bbox"].astype(np.float64)
        s = 256.0 / box[:, 2]  # crops are 256 x 256
        self.K = np.zeros((len(cam), 3, 3))
        self.K[:, 0, 0], self.K[:, 1, 1] = cam[:, 0] * s, cam[:, 1] * s
        self.K[:, 0, 2], self.K[:, 1, 2] = (cam[:, 2] - box[:, 0]) * s, (cam[:, 3] - box[:, 1]) * s
        self.K[:, 2, 2] = 1.0
        if not len(self.paths) == len(self.xyz) == len(self.K):
            raise DataError(f"{root}: params.mat and pose_gt.mat disagree on the number of images")

    def __len__(self) -> int:
        return len(self.paths)

    def meta(self, i: int) -> dict:
        return {"K": self.K[i].tolist(), "xyz": self.xyz[i].tolist(), "name": Path(self.paths[i]).name}

    def raw(self, i: int) -> tuple[bytes, str, dict]:
        return _read_bytes(self.root / self.paths[i]), Path(self.paths[i]).suffix.lower().lstrip("."), self.meta(i)


class ShardSource:
    """WebDataset tar shards listed in <root>/<split>.json, read by member offsets (random access)."""

    def __init__(self, root: str | Path, split: str):
        root = Path(root)
        index = root / f"{split}.json"
        shards = [root / s["url"] for s in _read_json(index)["shardlist"]]
        self.members: list[dict[str, tuple[Path, int, int]]] = []  # per sample: ext -> (tar, offset, size)
        for tar in shards:
            try:
                with tarfile.open(tar, "r:") as tf:
                    samples: dict[str, dict] = {}
                    for m in tf:
                        if m.isfile():
                            key, _, ext = m.name.partition(".")
                            samples.setdefault(key, {})[ext] = (tar, m.offset_data, m.size)
            except (OSError, tarfile.TarError) as e:
                raise DataError(f"cannot read shard {tar}: {e}") from None
            self.members += [samples[k] for k in sorted(samples)]
        if not self.members:
            raise DataError(f"no samples in the shards of {index}")
        self.has_mano = "mano" in self.meta(0)

    def __len__(self) -> int:
        return len(self.members)

    def _read(self, i: int, ext: str) -> bytes:
        tar, offset, size = self.members[i][ext]
        with open(tar, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def meta(self, i: int) -> dict:
        return json.loads(self._read(i, "json"))

    def raw(self, i: int) -> tuple[bytes, str, dict]:
        ext = next((e for e in ("jpg", "jpeg", "png") if e in self.members[i]), None)
        if ext is None:
            raise DataError(f"shard sample {i} has no jpg/png member")
        return self._read(i, ext), ext, self.meta(i)


def make_source(cfg: HandDataConfig, split: str):
    if cfg.format == "hand3d":
        return Hand3DSource(cfg.root)
    if cfg.format == "webdataset":
        return ShardSource(cfg.root, split)
    return FolderSource(cfg.root, split)


def train_val_indices(n: int, cfg: HandDataConfig) -> tuple[list[int], list[int]]:
    """Hold out `val_count` of n samples: the last ones, or random ones seeded by `val_seed`."""
    if not 0 < cfg.val_count < n:
        raise DataError(f"data.val_count={cfg.val_count} must be between 1 and {n - 1} for {n} samples")
    order = np.arange(n) if cfg.split_mode == "tail" else np.random.default_rng(cfg.val_seed).permutation(n)
    return sorted(order[:-cfg.val_count].tolist()), sorted(order[-cfg.val_count:].tolist())


def split_indices(n: int, cfg: HandDataConfig) -> tuple[list[int] | None, list[int] | None]:
    """(train, val) indices into the train split's n samples; val None = validate on `val_split`.

    val_count > 0: hold-out of the train split (`train_val_indices`); folds = k: fold `fold` of the
    remaining training samples (seeded by val_seed) is validated on instead.
    """
    if cfg.val_count:
        train, val = train_val_indices(n, cfg)
    else:
        train, val = list(range(n)), None
    if cfg.folds:
        if cfg.folds < 2 or not 0 <= cfg.fold < cfg.folds:
            raise DataError(f"data.folds={cfg.folds} / data.fold={cfg.fold}: need folds >= 2 and 0 <= fold < folds")
        tr, va = kfold_indices(len(train), cfg.folds, cfg.fold, seed=cfg.val_seed)
        train, val = [train[i] for i in tr], [train[i] for i in va]
    return train, val


# ----------------------------------------------------------------------------- geometry
def project(xyz: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(J, 3) camera-space points -> (J, 2) pixels (pixel centres at integers)."""
    p = xyz @ K.T
    return p[:, :2] / p[:, 2:]


def is_right_hand(xyz: np.ndarray) -> bool:
    """Chirality of the skeleton: sign of det[thumb base, index base, pinky base] - wrist (> 0 = right)."""
    w = xyz[0]
    return bool(np.linalg.det(np.stack([xyz[1] - w, xyz[5] - w, xyz[17] - w])) > 0)


def rot_z(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _axis_angle_rotate(aa: np.ndarray, rot: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return (Rotation.from_matrix(rot) * Rotation.from_rotvec(aa)).as_rotvec()


def decode_image(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt or unreadable image {name}: {e}") from None


def crop_params(hw: tuple[int, int], center: np.ndarray, side: float, deg: float, flip: bool, out: int):
    """The geometry of `crop_affine` on an (h, w) image: (size, A, coeffs). size (w, h) of the
    antialias pre-resize (None = none), A (2, 3) source pixel -> crop pixel (centres at integers),
    coeffs (2, 3) PIL's AFFINE data: crop -> (resized) source, pixel centres at +0.5."""
    h, w = hw
    z = out / side
    size, pre = None, np.ones(2)  # resize factor per axis
    if z < 0.5:  # antialias: shrink the whole image first, then warp with a zoom near 1
        size = (max(round(w * 2 * z), 1), max(round(h * 2 * z), 1))
        pre = np.array([size[0] / w, size[1] / h])
    lin = z * rot_z(deg)[:2, :2] @ np.diag([-1.0 if flip else 1.0, 1.0])  # source offset -> crop offset
    c_out = (out - 1) / 2
    A = np.concatenate([lin, (c_out - lin @ center)[:, None]], 1)  # (2, 3)
    # PIL maps crop -> source in coordinates with pixel centres at +0.5: R = pre * (p + 0.5), Q = q + 0.5
    inv = np.linalg.inv(lin)
    coeffs = np.concatenate([pre[:, None] * inv, (pre * (center + 0.5 - inv @ np.full(2, out / 2)))[:, None]], 1)
    return size, A, coeffs


def crop_affine(img: np.ndarray, center: np.ndarray, side: float, deg: float, flip: bool, out: int):
    """Warp the square box (center, side) rotated by `deg` (and mirrored) to an out x out crop.

    Returns the crop and A (2, 3) mapping source pixels to crop pixels (centres at integers).
    Large zoom-outs first shrink the image with an antialiased resize.
    """
    size, A, coeffs = crop_params(img.shape[:2], center, side, deg, flip, out)
    pil = Image.fromarray(img)
    if size is not None:
        pil = pil.resize(size, Image.BILINEAR, reducing_gap=None)
    crop = pil.transform((out, out), Image.AFFINE, tuple(coeffs.reshape(-1)), resample=Image.BILINEAR)
    return np.array(crop), A


# ----------------------------------------------------------------------------- dataset
class HandDataset(torch.utils.data.Dataset):
    accepts_epoch_keys = True  # make_loader's EpochSampler hands (index, epoch) keys

    def __init__(self, source, cfg: HandDataConfig, train: bool, seed: int = 0, indices: list[int] | None = None):
        if cfg.aug_device not in ("cpu", "device"):
            raise UserError(f"data.aug_device must be cpu or device, got {cfg.aug_device!r}")
        self.source, self.cfg, self.train, self.seed = source, cfg, train, seed
        self.on_device = train and cfg.aug_device == "device"  # batch goes through device_aug_hand.hand_train_batch
        self.indices = list(range(len(source))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def joints(self, i: int) -> np.ndarray:
        """(21, 3) root-relative joints of sample i in metres, camera frame, no image read."""
        xyz = np.asarray(self.source.meta(self.indices[i])["xyz"], dtype=np.float64)
        return xyz - xyz[:1]

    def is_right(self, i: int) -> bool:
        """Handedness of un-augmented sample i from its labels (`is_right`, else the skeleton's chirality)."""
        meta = self.source.meta(self.indices[i])
        return bool(meta["is_right"]) if "is_right" in meta else is_right_hand(np.asarray(meta["xyz"]).reshape(21, 3))

    def __getitem__(self, key) -> dict:
        i, epoch = split_key(key)
        rng = sample_rng(self.seed, i, epoch) if self.train else None
        return self.item(i, rng)

    def item(self, i: int, rng: np.random.Generator | None = None) -> dict:
        """Sample i, augmented by `rng` (None = validation transform); with `on_device` (and an rng)
        the image is the uncropped uint8 source plus what device_aug_hand needs to crop it."""
        data, ext, meta = self.source.raw(self.indices[i])
        name = meta.get("name", f"sample {self.indices[i]}")
        img = decode_image(data, name)
        try:
            K = np.asarray(meta["K"], dtype=np.float64).reshape(3, 3)
            xyz = np.asarray(meta["xyz"], dtype=np.float64).reshape(21, 3)
        except (KeyError, ValueError) as e:
            raise DataError(f"bad labels for {name}: need K (3x3) and xyz (21x3): {e}") from None
        is_right = bool(meta["is_right"]) if "is_right" in meta else is_right_hand(xyz)
        uv = project(xyz, K)
        cfg, a = self.cfg, self.cfg.aug
        h, w = img.shape[:2]
        if cfg.crop == "image":
            center, side = np.array([(w - 1) / 2, (h - 1) / 2]), float(max(w, h))
        else:
            lo, hi = uv.min(0), uv.max(0)
            center, side = (lo + hi) / 2, float(max(hi - lo) * cfg.bbox_scale)
        deg, flip = 0.0, False
        color = np.ones(3)
        if rng is not None:  # always draw the same numbers, whatever is switched off
            u = rng.uniform(-1, 1, size=5)
            side *= 1 + a.scale * u[0]
            deg = a.rotation * u[1] if rng.random() < a.rotation_prob else 0.0
            center = center + a.translate * side * u[2:4]
            flip = bool(rng.random() < a.flip_prob)
            color = rng.uniform(1 - a.color, 1 + a.color, size=3)
        if self.on_device and rng is not None:  # image stays uint8 at its own size; device_aug_hand crops it
            size, A, coeffs = crop_params(img.shape[:2], center, side, deg, flip, cfg.img_size)
            # PIL's coefficients take and give pixel centres at +0.5: as pixel indices, t -> t + c @ 0.5 - 0.5
            affine = np.concatenate([coeffs[:, :2], (coeffs[:, 2] + coeffs[:, :2] @ np.full(2, 0.5) - 0.5)[:, None]], 1)
            image = {"image": torch.from_numpy(img).permute(2, 0, 1), "affine": torch.from_numpy(affine),
                     "resize": torch.tensor(size if size is not None else (w, h), dtype=torch.int64),
                     "color": torch.from_numpy(color if a.color > 0 else np.ones(3))}
        else:
            crop, A = crop_affine(img, center, side, deg, flip, cfg.img_size)
            if rng is not None and a.color > 0:
                crop = np.clip(crop * color, 0, 255).astype(np.uint8)
            image = {"image": to_tensor_normalized(crop)}
        uv_crop = uv @ A[:, :2].T + A[:, 2]
        rot = rot_z(deg) @ np.diag([-1.0 if flip else 1.0, 1.0, 1.0])
        joints3d = (xyz - xyz[:1]) @ rot.T  # root-relative, rotated / mirrored like the image
        is_right = is_right != flip
        mano = np.asarray(meta.get("mano", np.zeros(58)), dtype=np.float64)
        pose = mano[:48].reshape(16, 3).copy()
        if "mano" in meta and deg:  # labels are of the right hand in the crop: R for right, R^-1 for left
            pose[0] = _axis_angle_rotate(pose[0], rot_z(deg if is_right else -deg))
        return {
            **image,
            "joints3d": torch.tensor(joints3d, dtype=torch.float32),
            "joints2d": torch.tensor((uv_crop + 0.5) / cfg.img_size - 0.5, dtype=torch.float32),
            "is_right": torch.tensor(int(is_right)),
            "has_mano": torch.tensor(float("mano" in meta)),
            "mano_pose": torch.tensor(pose, dtype=torch.float32),
            "mano_betas": torch.tensor(mano[48:58], dtype=torch.float32),
            "index": torch.tensor(i),
        }


def mean_pose(ds: HandDataset) -> np.ndarray:
    """(21, 3) mean root-relative training skeleton in the right-hand frame (left hands mirrored), metres,
    from the labels only (no image read, no augmentation)."""
    mirror = np.array([-1.0, 1.0, 1.0])
    return np.mean([ds.joints(i) * (1.0 if ds.is_right(i) else mirror) for i in range(len(ds))], 0)


def label_stats(ds: HandDataset, max_samples: int = 512) -> dict[str, torch.Tensor]:
    """Mean right-hand-frame joints (21, 3) and weak-perspective camera (3,) of un-augmented samples.

    Left hands are mirrored into the right-hand frame. The camera (s, tx, ty) is the per-sample
    least-squares fit of joints2d = s * joints3d[:, :2] + t, averaged.
    """
    idx = np.linspace(0, len(ds) - 1, min(len(ds), max_samples)).round().astype(int)
    joints, cams = [], []
    for i in np.unique(idx):
        s = ds.item(int(i))
        j = s["joints3d"].double()
        sign = 1.0 if int(s["is_right"]) else -1.0
        joints.append(j * torch.tensor([sign, 1.0, 1.0], dtype=torch.float64))
        xy, uv = j[:, :2] - j[:, :2].mean(0), s["joints2d"].double()
        scale = (xy * (uv - uv.mean(0))).sum() / xy.pow(2).sum().clamp_min(1e-12)
        t = uv.mean(0) - scale * j[:, :2].mean(0)
        cams.append(torch.stack([scale, sign * t[0], t[1]]))
    return {"joints": torch.stack(joints).mean(0).float(), "cam": torch.stack(cams).mean(0).float()}
