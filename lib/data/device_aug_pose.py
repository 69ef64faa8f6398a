"""Pose train affine crop on a batch, on the training device (`data.aug_device: device`).

With `aug_device: device` the loader workers only decode, draw every random choice of a person
(`CocoPoseDataset.draw`: center shift, flip, half body, scale, rotation) and build the heatmap
targets; the image stays uint8 at its own size and its crop travels as `batch["affine"]` (B, 2, 3),
crop pixel -> source pixel with the flip folded in. On the GPU, one call warps the whole batch:

    train_loader = make_loader(train_ds, ..., collate_fn=device_aug_pose.collate)
    for batch in train_loader:                      # batch["image"]: (B, 3, H, W) uint8, padded
        batch = device_aug_pose.pose_train_batch(batch, cfg.data.image_size)  # (B, 3, h, w) normalised

It computes what the CPU path (`lib.data.coco.warp_image`, PIL AFFINE bilinear = cv2.warpAffine
INTER_LINEAR) computes: F.affine_grid gives each crop pixel's source position (float64), F.grid_sample
interpolates bilinearly; as PIL, a position outside [-0.5, size - 0.5) of its own image is 0, one inside
reads the edge pixels clamped, and the value is truncated to uint8. Pixels agree with the CPU path
except for rare 1-level truncation flips (float rounding); an identity matrix gives the source exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from lib.data.common import IMAGENET_MEAN, IMAGENET_STD
from lib.data.device_aug import normalize_batch

# PIL truncates its float64 bilinear value to uint8; grid_sample's weights sum to 1 only up to ~1e-16, so an
# exact integer (flat region, identity) can come out as k - 1e-13: lift by far more than that, far less than a level
_TRUNC_EPS = 1e-6


def collate(items: list[dict]) -> dict:
    """Stack device-path samples; images of different sizes are zero-padded to the largest, each
    one's own (h, w) kept as `image_hw` (B, 2) (the warp never reads the padding)."""
    h = max(it["image"].shape[1] for it in items)
    w = max(it["image"].shape[2] for it in items)
    image = torch.zeros((len(items), 3, h, w), dtype=torch.uint8)
    for b, it in enumerate(items):
        image[b, :, : it["image"].shape[1], : it["image"].shape[2]] = it["image"]
    rest = default_collate([{k: v for k, v in it.items() if k != "image"} for it in items])
    hw = torch.tensor([it["image"].shape[1:] for it in items], dtype=torch.int64)  # (B, 2)
    return {"image": image, "image_hw": hw, **rest}


def warp_batch(image: torch.Tensor, affine: torch.Tensor, image_hw: torch.Tensor, out_size) -> torch.Tensor:
    """(B, 3, H, W) uint8 (padded; or float holding uint8 values), (B, 2, 3) crop pixel -> source pixel,
    (B, 2) each image's (h, w), out_size (w, h) -> (B, 3, h, w) float64 holding uint8 values:
    `warp_image` on every sample."""
    b, _, hin, win = image.shape
    ow, oh = out_size
    dev = image.device
    a = affine.to(dev, torch.float64)
    # affine_grid's output coordinates are normalised (align_corners=False): u = (2 i + 1) / ow - 1
    unnorm = torch.tensor([[ow / 2, 0, (ow - 1) / 2], [0, oh / 2, (oh - 1) / 2], [0, 0, 1]], dtype=torch.float64,
                          device=dev)
    grid = F.affine_grid(a @ unnorm, [b, 3, oh, ow], align_corners=False)  # (B, oh, ow, 2) source pixel (x, y)
    size = image_hw.to(dev).flip(-1).to(torch.float64)[:, None, None]  # (B, 1, 1, 2) (w, h)
    valid = ((grid >= -0.5) & (grid < size - 0.5)).all(-1)  # (B, oh, ow) PIL: 0 <= x + 0.5 < w
    grid = torch.minimum(grid.clamp(min=0), size - 1)  # PIL clamps the neighbours to the edge pixels
    canvas = torch.tensor([win, hin], dtype=torch.float64, device=dev)
    grid = (2 * grid + 1) / canvas - 1  # source pixel -> grid_sample's normalised coordinates of the padded canvas
    x = F.grid_sample(image.to(torch.float64), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = torch.floor(x + _TRUNC_EPS).clamp_(0, 255)  # (B, 3, oh, ow)
    return x * valid[:, None]


def pose_train_batch(batch: dict, out_size, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """Device-path batch (uint8 images + `affine`) -> the CPU path's batch: image (B, 3, h, w)
    normalised float32 (out_size = data.image_size (w, h)); targets and the rest unchanged. Runs
    on whatever device the batch is on, in float64 / float32 whatever autocast is active around it."""
    image = batch["image"]
    with torch.autocast(image.device.type, enabled=False):
        x = warp_batch(image, batch["affine"], batch["image_hw"], out_size).float()  # exact: uint8 values
    out = {k: v for k, v in batch.items() if k not in ("affine", "image_hw")}
    return {**out, "image": normalize_batch(x, mean, std)}
