"""Rotation helpers shared by models, losses and data code (torch, batched over leading dims).

    R = rot6d_to_rotmat(x)        # (..., 6) -> (..., 3, 3)  Gram-Schmidt on two columns (Zhou et al. 2019)
    R = axis_angle_to_rotmat(aa)  # (..., 3) -> (..., 3, 3)  Rodrigues
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rot6d_to_rotmat(x: torch.Tensor) -> torch.Tensor:
    """(..., 6) two columns -> (..., 3, 3) by Gram-Schmidt (Zhou et al. 2019)."""
    a1, a2 = x[..., :3], x[..., 3:]
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    return torch.stack([b1, b2, torch.cross(b1, b2, dim=-1)], dim=-1)


def axis_angle_to_rotmat(aa: torch.Tensor) -> torch.Tensor:
    """(..., 3) axis-angle -> (..., 3, 3) (Rodrigues)."""
    angle = aa.norm(dim=-1, keepdim=True).clamp_min(1e-8)  # (..., 1)
    k = aa / angle
    kx, ky, kz = k.unbind(-1)
    zero = torch.zeros_like(kx)
    kmat = torch.stack([zero, -kz, ky, kz, zero, -kx, -ky, kx, zero], -1).reshape(*aa.shape[:-1], 3, 3)
    s, c = torch.sin(angle)[..., None], torch.cos(angle)[..., None]
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand_as(kmat)
    return eye + s * kmat + (1 - c) * kmat @ kmat
