"""Seg train augmentation on a batch, on the training device (`data.aug_device: device`).

With `aug_device: device` the loader workers only decode, draw every random choice of a sample
(`SegFolderDataset.draw`: rescale ratio, cat_max_ratio crop, flip, photometric) and crop the
label; the image stays uint8 at its own size and its choices travel as `batch["aug"]`
(B, len(AUG_FIELDS)). On the GPU, one call does the image part for the whole batch:

    train_loader = make_loader(train_ds, ..., collate_fn=device_aug.collate)
    for batch in train_loader:                      # batch["image"]: (B, 3, H, W) uint8, padded
        batch = device_aug.seg_train_batch(batch, cfg.data.crop_size)  # (B, 3, ch, cw) normalised

It computes what the CPU path (`SegFolderDataset.apply`: PIL resample, OpenCV HSV) computes, in tensors:
PIL's antialiased bilinear resample of the crop box written as two matrices per sample
(rows (B, ch, H), columns (B, cw, W)), PIL's uint8 rounding after each pass, flip folded into
the column matrix, then the photometric tables and OpenCV's 8-bit RGB <-> HSV formulas
(cv2.COLOR_RGB2HSV / COLOR_HSV2RGB, hue 0..179, as mmseg) ported elementwise. Pixels agree with the
CPU path to within 1-2 grey levels on a fraction of a percent of pixels (rounding); with no rescale,
no flip and no photometric it is exact.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from lib.data.common import IMAGENET_MEAN, IMAGENET_STD

AUG_FIELDS = ("in_w", "in_h", "out_w", "out_h", "x0", "y0", "crop_w", "crop_h", "flip",
              "brightness", "contrast_before", "hsv", "saturation", "hue", "contrast_after")
NO_PHOTOMETRIC = {"brightness": 0.0, "contrast_before": 1.0, "hsv": 0.0, "saturation": 1.0, "hue": 0.0,
                  "contrast_after": 1.0}


def collate(items: list[dict]) -> dict:
    """Stack device-path samples; images of different sizes are zero-padded to the largest
    (the resample matrices give padding zero weight)."""
    h = max(it["image"].shape[1] for it in items)
    w = max(it["image"].shape[2] for it in items)
    image = torch.zeros((len(items), 3, h, w), dtype=torch.uint8)
    for b, it in enumerate(items):
        image[b, :, : it["image"].shape[1], : it["image"].shape[2]] = it["image"]
    return {"image": image, "label": torch.stack([it["label"] for it in items]),
            "aug": torch.stack([it["aug"] for it in items]), "name": [it["name"] for it in items]}


def resample_matrix(in_size: torch.Tensor, out_size: torch.Tensor, start: torch.Tensor, length: torch.Tensor,
                    flip: torch.Tensor, n_out: int, n_in: int) -> torch.Tensor:
    """(B, n_out, n_in) float64 weights of PIL's BILINEAR resize of a length-`in_size` axis to
    `out_size`, keeping output pixels start .. start+length-1 (then reversed where `flip`);
    rows >= length are zero (padding). Triangle filter stretched by the scale when shrinking
    (antialias), normalised over the pixels inside the image, as PIL's precompute_coeffs."""
    dev = in_size.device
    j = torch.arange(n_out, device=dev, dtype=torch.float64)[None]  # (1, n_out)
    length_ = length[:, None]
    src_j = torch.where(flip[:, None] > 0, length_ - 1 - j, j)  # flipped output column -> crop column
    scale = (in_size / out_size)[:, None]  # (B, 1)
    center = (start[:, None] + src_j + 0.5) * scale  # (B, n_out) source coordinate of each output pixel
    fscale = scale.clamp(min=1.0)
    x = torch.arange(n_in, device=dev, dtype=torch.float64)[None, None]  # (1, 1, n_in)
    wgt = (1 - ((x + 0.5 - center[..., None]) / fscale[..., None]).abs()).clamp(min=0)
    wgt = wgt * (x < in_size[:, None, None])
    wgt = wgt / wgt.sum(-1, keepdim=True).clamp(min=1e-12)
    return wgt * (j < length_)[..., None]


def _round_u8(x: torch.Tensor) -> torch.Tensor:
    """PIL's fixed-point resample rounding: half up, clipped to 0..255 (values stay float)."""
    return torch.floor(x + 0.5).clamp_(0, 255)


def resize_crop_flip(image: torch.Tensor, aug: dict, crop_size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 3, ch, cw) float32 holding uint8 values: rescale, crop, flip, pad 0."""
    ch, cw = crop_size
    _, _, hin, win = image.shape
    cols = resample_matrix(aug["in_w"], aug["out_w"], aug["x0"], aug["crop_w"], aug["flip"], cw, win)
    rows = resample_matrix(aug["in_h"], aug["out_h"], aug["y0"], aug["crop_h"], torch.zeros_like(aug["flip"]),
                           ch, hin)
    x = image.float()
    # PIL: horizontal pass, round to uint8, vertical pass, round. (B, 3, H, W) @ (B, 1, W, cw)
    x = _round_u8(torch.matmul(x, cols.float().transpose(1, 2)[:, None]))  # (B, 3, H, cw)
    return _round_u8(torch.matmul(rows.float()[:, None], x))  # (B, 3, ch, cw)


_HSV_SHIFT = 12  # OpenCV RGB2HSV_b: fixed-point reciprocal tables, round-to-nearest (no ties occur)
_SDIV = [0] + [round((255 << _HSV_SHIFT) / i) for i in range(1, 256)]
_HDIV = [0] + [round((180 << _HSV_SHIFT) / (6 * i)) for i in range(1, 256)]  # hue range 0..179
_F32 = {k: float(v) for k, v in {"1/255": np.float32(1) / np.float32(255), "1/6": np.float32(1) / np.float32(6),
                                  "6/180": np.float32(6) / np.float32(180)}.items()}  # C's 1.0f / 255.0f, ...


def rgb_to_hsv_cv(rgb: torch.Tensor) -> torch.Tensor:
    """OpenCV's 8-bit RGB -> HSV (cv2.COLOR_RGB2HSV, RGB2HSV_b; what mmseg's PhotoMetricDistortion
    uses): integer arithmetic on (..., 3, H, W) float uint8 values; H in 0..179, S, V in 0..255."""
    r, g, b = rgb.round().to(torch.int32).unbind(-3)
    v, vmin = torch.maximum(r, torch.maximum(g, b)), torch.minimum(r, torch.minimum(g, b))
    diff = v - vmin
    sdiv = torch.tensor(_SDIV, dtype=torch.int32, device=rgb.device)
    hdiv = torch.tensor(_HDIV, dtype=torch.int32, device=rgb.device)
    half = 1 << (_HSV_SHIFT - 1)
    s = torch.bitwise_right_shift(diff * sdiv[v.long()] + half, _HSV_SHIFT)
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = torch.bitwise_right_shift(h * hdiv[diff.long()] + half, _HSV_SHIFT)  # arithmetic shift: floor
    h = torch.where(h < 0, h + 180, h).clamp_(0, 255)
    return torch.stack([h, s, v], -3).float()


def hsv_to_rgb_cv(hsv: torch.Tensor) -> torch.Tensor:
    """OpenCV's 8-bit HSV -> RGB (cv2.COLOR_HSV2RGB, HSV2RGB_b's SIMD body) on (..., 3, H, W) float
    uint8 values: the same float32 steps, 1 - s*f as one fused multiply-add (as the x86 builds
    compile it), truncation to uint8. OpenCV's scalar tail (pixels after the last full SIMD
    block of a row) rounds instead: `lib.data.seg.photometric` converts the image as one row."""
    h, s, v = hsv.float().unbind(-3)
    f32 = functools.partial(torch.tensor, dtype=torch.float32, device=hsv.device)
    s, v = s * f32(_F32["1/255"]), v * f32(_F32["1/255"])
    h = h * f32(_F32["6/180"])
    pre = torch.trunc(h)
    f = h - pre
    one = f32(1.0)

    def one_minus(a, b):  # fma(-a, b, 1) in float32: the float64 product of two float32 is exact
        return (1.0 - a.double() * b.double()).float()

    tab = [v, v * (one - s), v * one_minus(s, f), v * one_minus(s, one - f)]
    sector = pre - torch.trunc(pre * f32(_F32["1/6"])) * f32(6.0)
    # (r, g, b) as indices into tab per sector (OpenCV's sector_data, read as RGB)
    order = ((0, 3, 1), (2, 0, 1), (1, 0, 3), (1, 2, 0), (3, 1, 0), (0, 1, 2))
    out = [tab[c] for c in order[0]]
    for k in range(1, 6):
        out = [torch.where(sector == k, tab[c], o) for c, o in zip(order[k], out)]
    return torch.trunc(torch.stack(out, -3) * f32(255.0)).clamp_(0, 255)


def photometric(x: torch.Tensor, aug: dict) -> torch.Tensor:
    """Batched `lib.data.seg.photometric`: (B, 3, h, w) float uint8 values, per-sample parameters."""
    def per(k):  # (B, 1, 1, 1) float32, as numpy casts the Python float to float32
        return aug[k].float()[:, None, None, None]

    x = torch.floor(((x + per("brightness")) * per("contrast_before")).clamp(0, 255))
    do_hsv = aug["hsv"] > 0
    if do_hsv.any():
        hsv = rgb_to_hsv_cv(x)
        hue = torch.remainder(torch.floor(torch.remainder(hsv[:, 0:1] + per("hue"), 180.0)), 180.0)  # seg.hue_table
        sat = torch.floor((hsv[:, 1:2] * per("saturation")).clamp(0, 255))
        shifted = hsv_to_rgb_cv(torch.cat([hue, sat, hsv[:, 2:3]], 1))
        x = torch.where(do_hsv[:, None, None, None], shifted, x)
    return torch.floor((x * per("contrast_after")).clamp(0, 255))


def normalize_batch(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(B, 3, h, w) float holding uint8 values -> normalised, the arithmetic of common.to_tensor_normalized
    (in place on x: / 255, - mean, / std); shared by the seg, pose and hand device paths."""
    m = torch.tensor(mean, device=x.device)[:, None, None]
    s = torch.tensor(std, device=x.device)[:, None, None]
    return (x.div_(255) - m) / s


def seg_train_batch(batch: dict, crop_size: tuple[int, int], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """Device-path batch (uint8 images + `aug`) -> the CPU path's batch: image (B, 3, ch, cw)
    normalised float32, label (B, ch, cw) unchanged. Runs on whatever device the batch is on,
    in float32 whatever autocast / TF32 setting is active around it."""
    image = batch["image"]
    aug = {k: batch["aug"][:, n] for n, k in enumerate(AUG_FIELDS)}
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # TF32 would move values across rounding steps
    try:
        with torch.autocast(image.device.type, enabled=False):
            x = resize_crop_flip(image, aug, crop_size)  # (B, 3, ch, cw)
            x = photometric(x, aug)
    finally:
        torch.set_float32_matmul_precision(prec)
    ch, cw = crop_size
    valid = ((torch.arange(ch, device=x.device)[None, :, None] < aug["crop_h"][:, None, None])
             & (torch.arange(cw, device=x.device)[None, None, :] < aug["crop_w"][:, None, None]))
    x = torch.where(valid[:, None], x, 0.0)  # pad: 0 after photometric, as the CPU path
    return {**batch, "image": normalize_batch(x, mean, std)}
