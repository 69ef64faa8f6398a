"""Teacher -> student distillation losses for dense prediction.

All take student first, teacher second; the teacher is detached inside. Each is 0 when the
student equals the teacher, and its gradient moves the student towards the teacher.

  kl_div            pixel-wise KL(p_t || p_s) of class softmaxes at temperature T, times T^2
                    (Hinton et al. 2015), mean over valid pixels. Computed at the logit resolution
                    (H/4, W/4), as mmrazor's KLDivergence sees the decode head's logits; pixels whose
                    label is ignore_index are left out, like the CE: the label mask is downsampled
                    to the logit grid with nearest (the resampling that keeps label ids).
  channel_wise      CWD (Shu et al., ICCV 2021): per channel, a softmax over spatial positions at
                    temperature T; KL(teacher || student) summed over positions, times T^2,
                    mean over channels and batch.
  attention_transfer AT (Zagoruyko & Komodakis, ICLR 2017): spatial map sum_c |F|^p, flattened and
                    L2-normalised; mean squared difference. Works across different channel counts.
  similarity_preserving SP (Tung & Mori, ICCV 2019): batch Gram matrices of flattened features,
                    row-L2-normalised; squared Frobenius distance / B^2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _match_size(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if t.shape[-2:] != s.shape[-2:]:
        t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
    return t


def kl_div(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
           valid: torch.Tensor | None = None) -> torch.Tensor:
    """student, teacher: (B, K, h, w) logits; valid: optional (B, H, W) bool mask of pixels to use (e.g.
    label != ignore_index at label resolution; nearest-resized to (h, w)). No valid pixel -> 0."""
    teacher = _match_size(student, teacher.detach())
    log_ps = F.log_softmax(student.float() / temperature, dim=1)
    log_pt = F.log_softmax(teacher.float() / temperature, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(1)  # (B, H, W)
    if valid is not None:
        valid = F.interpolate(valid[:, None].float(), size=kl.shape[-2:], mode="nearest")[:, 0] > 0
        kl = kl[valid]
        if kl.numel() == 0:
            return student.sum() * 0
    return kl.mean() * temperature**2


def channel_wise(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """student, teacher: (B, C, H, W) (logits or features with the same channel count)."""
    teacher = _match_size(student, teacher.detach())
    s = student.float().flatten(2) / temperature  # (B, C, HW)
    t = teacher.float().flatten(2) / temperature
    log_pt, log_ps = F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # (B, C)
    return kl.mean() * temperature**2


def attention_map(feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W) L2-normalised spatial attention."""
    return F.normalize(feat.float().abs().pow(p).mean(1).flatten(1), dim=1)


def attention_transfer(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    teacher = _match_size(student, teacher.detach())
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


def similarity_preserving(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    b = student.shape[0]
    gs = F.normalize(student.float().flatten(1) @ student.float().flatten(1).t(), dim=1)  # (B, B)
    t = teacher.detach().float().flatten(1)
    gt = F.normalize(t @ t.t(), dim=1)
    return (gs - gt).pow(2).sum() / (b * b)
