"""Hand train crop + colour on a batch, on the training device (`data.aug_device: device`).

With `aug_device: device` the loader workers only decode, draw every random choice of a sample
(box scale, rotation, translation, flip, colour: `HandDataset.item`) and compute the labels; the
image stays uint8 at its own size and its crop travels as `batch["resize"]` (B, 2) (w, h of the
antialias pre-resize, = the image size when there is none), `batch["affine"]` (B, 2, 3) (crop pixel
-> resized-source pixel) and `batch["color"]` (B, 3). On the GPU, one call does the whole batch:

    train_loader = make_loader(train_ds, ..., collate_fn=device_aug_hand.collate)
    for batch in train_loader:                      # batch["image"]: (B, 3, H, W) uint8, padded
        batch = device_aug_hand.hand_train_batch(batch, cfg.data.img_size)  # (B, 3, S, S) normalised

It computes what the CPU path (`lib.data.hand.crop_affine` + colour factor, PIL) computes: the
antialiased pre-resize of zoomed-out samples as PIL's BILINEAR resample matrices
(`lib.data.device_aug.resample_matrix`, rounding after each pass), the affine crop as
`lib.data.device_aug_pose.warp_batch` (PIL AFFINE bilinear, zeros outside, truncation), then the
per-channel colour factor, clipped and truncated as numpy's uint8 cast. Pixels agree with the CPU path
to within a few grey levels on a small fraction of pixels (PIL's fixed-point resize rounding); with
no pre-resize they agree except for rare 1-level flips, and an identity crop is exact.
"""

from __future__ import annotations

import torch

from lib.data.common import IMAGENET_MEAN, IMAGENET_STD
from lib.data.device_aug import normalize_batch, resample_matrix
from lib.data.device_aug_pose import collate, warp_batch  # noqa: F401 (collate: the same padding)


def resize_batch(image: torch.Tensor, image_hw: torch.Tensor, resize: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 (padded), (B, 2) each image's (h, w), (B, 2) target (w, h) -> (B, 3, h', w')
    float32 holding uint8 values (h', w' the largest target): PIL's `resize(BILINEAR, reducing_gap=None)`
    per sample, horizontal pass, round, vertical pass, round; a sample kept at its size is copied exactly."""
    if torch.equal(resize, image_hw.flip(-1)):  # no sample is resized
        return image.float()
    _, _, hin, win = image.shape
    hr, wr = int(resize[:, 1].max()), int(resize[:, 0].max())
    in_h, in_w = image_hw[:, 0].double(), image_hw[:, 1].double()
    out_w, out_h = resize[:, 0].double(), resize[:, 1].double()
    zero = torch.zeros_like(in_w)
    cols = resample_matrix(in_w, out_w, zero, out_w, zero, wr, win)  # (B, wr, W)
    rows = resample_matrix(in_h, out_h, zero, out_h, zero, hr, hin)  # (B, hr, H)
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # TF32 would move values across rounding steps
    try:
        x = torch.floor(torch.matmul(image.float(), cols.float().transpose(1, 2)[:, None]) + 0.5).clamp_(0, 255)
        return torch.floor(torch.matmul(rows.float()[:, None], x) + 0.5).clamp_(0, 255)  # (B, 3, hr, wr)
    finally:
        torch.set_float32_matmul_precision(prec)


def hand_train_batch(batch: dict, img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """Device-path batch (uint8 images + `resize`, `affine`, `color`) -> the CPU path's batch: image
    (B, 3, S, S) normalised float32 (S = data.img_size); labels unchanged. Runs on whatever device the
    batch is on, in float32 / float64 whatever autocast is active around it."""
    image = batch["image"]
    with torch.autocast(image.device.type, enabled=False):
        x = resize_batch(image, batch["image_hw"], batch["resize"])  # (B, 3, h', w')
        x = warp_batch(x, batch["affine"], batch["resize"].flip(-1), (img_size, img_size))  # (B, 3, S, S) float64
        x = torch.floor((x * batch["color"].to(x)[:, :, None, None]).clamp(0, 255)).float()  # numpy: uint8 cast
    out = {k: v for k, v in batch.items() if k not in ("affine", "image_hw", "resize", "color")}
    return {**out, "image": normalize_batch(x, mean, std)}
