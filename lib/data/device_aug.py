"""Seg train augmentation on a batch, on the training device (`data.aug_device: device`).

With `aug_device: device` the loader workers only decode, draw every random choice of a sample
(`SegFolderDataset.draw`: rescale ratio, cat_max_ratio crop, flip, photometric) and crop the
label; the image stays uint8 at its own size and its choices travel as `batch["aug"]`
(B, len(AUG_FIELDS)). On the GPU, one call does the image part for the whole batch:

    train_loader = make_loader(train_ds, ..., collate_fn=device_aug.collate)
    for batch in train_loader:                      # batch["image"]: (B, 3, H, W) uint8, padded
        batch = device_aug.seg_train_batch(batch, cfg.data.crop_size)  # (B, 3, ch, cw) normalised

It computes what the CPU path (`SegFolderDataset.apply`, PIL) computes, in float32 tensors:
PIL's antialiased bilinear resample of the crop box written as two matrices per sample
(rows (B, ch, H), columns (B, cw, W)), PIL's uint8 rounding after each pass, flip folded into
the column matrix, then the photometric tables and PIL's own RGB <-> HSV formulas ported
elementwise. Pixels agree with the CPU path to within 1-2 grey levels on a fraction of a
percent of pixels (rounding); with no rescale, no flip and no photometric it is exact.
"""

from __future__ import annotations

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


def rgb_to_hsv_pil(rgb: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> HSV (Convert.c rgb2hsv_row) on (..., 3, H, W) float uint8 values, same C
    float/double steps; H, S, V in 0..255."""
    r, g, b = rgb.unbind(-3)
    maxc, minc = torch.maximum(r, torch.maximum(g, b)), torch.minimum(r, torch.minimum(g, b))
    cr = (maxc - minc).float()
    grey = cr == 0
    crs = torch.where(grey, torch.ones_like(cr), cr)
    s = cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / crs, (maxc - g) / crs, (maxc - b) / crs  # float32 as in C
    h = torch.where(r == maxc, (bc - gc).double(),
                    torch.where(g == maxc, 2.0 + rc.double() - bc.double(), 4.0 + gc.double() - rc.double()))
    h = torch.fmod(h.float().double() / 6.0 + 1.0, 1.0).float()  # C: float h = fmod(double)
    uh = torch.trunc(h.double() * 255.0).clamp(0, 255)
    us = torch.trunc(s.double() * 255.0).clamp(0, 255)
    uh, us = torch.where(grey, 0.0, uh), torch.where(grey, 0.0, us)
    return torch.stack([uh.float(), us.float(), maxc], -3)


def hsv_to_rgb_pil(hsv: torch.Tensor) -> torch.Tensor:
    """PIL's HSV -> RGB (Convert.c hsv2rgb), same C float/double steps and round-half-away."""
    h, s, v = hsv.unbind(-3)
    h6 = h.double() * 6.0 / 255.0
    i = torch.floor(h6)
    f = (h6 - i).float()
    fs = (s.double() / 255.0).float()
    v64 = v.double()
    p = torch.floor(v64 * (1.0 - fs.double()) + 0.5).clamp(0, 255)
    q = torch.floor(v64 * (1.0 - (fs * f).double()) + 0.5).clamp(0, 255)
    t = torch.floor(v64 * (1.0 - fs.double() * (1.0 - f.double())) + 0.5).clamp(0, 255)  # C: double here
    p, q, t = p.float(), q.float(), t.float()
    i = i.long() % 6
    sel = [torch.stack(c, -3) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
    out = sel[0]
    for k in range(1, 6):
        out = torch.where((i == k)[..., None, :, :], sel[k], out)
    return torch.where((s == 0)[..., None, :, :], torch.stack([v, v, v], -3), out)


def photometric(x: torch.Tensor, aug: dict) -> torch.Tensor:
    """Batched `lib.data.seg.photometric`: (B, 3, h, w) float uint8 values, per-sample parameters."""
    def per(k):  # (B, 1, 1, 1) float32, as numpy casts the Python float to float32
        return aug[k].float()[:, None, None, None]

    x = torch.floor(((x + per("brightness")) * per("contrast_before")).clamp(0, 255))
    do_hsv = aug["hsv"] > 0
    if do_hsv.any():
        hsv = rgb_to_hsv_pil(x)
        hue = torch.floor(torch.remainder(hsv[:, 0:1] + per("hue"), 255.0))
        sat = torch.floor((hsv[:, 1:2] * per("saturation")).clamp(0, 255))
        shifted = hsv_to_rgb_pil(torch.cat([hue, sat, hsv[:, 2:3]], 1))
        x = torch.where(do_hsv[:, None, None, None], shifted, x)
    return torch.floor((x * per("contrast_after")).clamp(0, 255))


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
    m = torch.tensor(mean, device=x.device)[:, None, None]
    s = torch.tensor(std, device=x.device)[:, None, None]
    return {**batch, "image": (x.div_(255) - m) / s}  # the arithmetic of common.to_tensor_normalized
