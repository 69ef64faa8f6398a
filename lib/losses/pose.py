"""Pose losses: heatmap MSE with target weights, and SDPose token self-distillation with masking.

    loss_hm = sum(joints_mse(o["heatmap"], target, target_weight) for o in outs)   # every cycle
    vis_loss = MaskedTokenDistilLoss(loss_weight=5e-6, mask_ratio=0.3, mask_strategy="importance")
    vis_imp, kpt_imp = token_importance(teacher["attn"], num_joints)
    loss_vis = vis_loss(student["vis_token"], teacher["vis_token"], vis_imp)

Masked token distillation (no reference implementation exists; this is the design):

SDPose (Chen et al. CVPR 2024) runs one transformer for several cycles and distils, with a plain
MSE of weight 5e-6, the tokens of cycle i+1 (teacher, deeper) into those of cycle i (student),
separately for the visual tokens (`loss_vis_token_dist`) and the keypoint tokens
(`loss_kpt_token_dist`). `MaskedTokenDistilLoss` leaves a fraction `mask_ratio` of the token
positions out of that MSE. Per sample, exactly n = floor(mask_ratio * N + 0.5) of the N positions
are masked (N = HW visual tokens or J keypoint tokens); the MSE is the mean over the kept positions
and the channels, so `mask_ratio=0` is SDPose's TokenDistilLoss exactly.
  * `random`: the n masked positions are a uniform random subset, drawn anew per sample and step.
  * `importance`: the n positions the teacher cycle finds least important are masked, so the
    important ones are always distilled. Importance comes from the teacher cycle's last-layer
    attention of the keypoint queries over the visual keys, A (B, J, HW) (softmax weights averaged
    over heads, see `TokenPose(need_attn=True)`):
        visual token v:    sum_j A[j, v]   (how much the keypoints look at this patch)
        keypoint token j:  sum_v A[j, v]   (how much of its attention this keypoint spends on the image)
    Ties are broken by position (stable sort). The attention is a selection signal only: no
    gradient flows through it.
Visual and keypoint tokens have their own loss object, so strategy, ratio and weight may differ
(the "mixed" and "asymmetric" runs). By default the teacher tokens keep their gradient, as in
SDPose; `detach_teacher=True` makes the later cycle a fixed target.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


def joints_mse(pred: torch.Tensor, target: torch.Tensor, target_weight: torch.Tensor) -> torch.Tensor:
    """mmpose JointsMSELoss(use_target_weight=True): mean over joints of MSE(pred * w_j, target * w_j).

    pred, target: (B, J, H, W); target_weight: (B, J) or (B, J, 1).
    """
    w = target_weight.reshape(*target_weight.shape[:2], 1, 1).to(pred.dtype)
    return ((pred - target) * w).float().square().mean()


def num_masked(ratio: float, n: int) -> int:
    """Masked positions out of n: ratio * n rounded half up."""
    return min(n, max(0, int(ratio * n + 0.5)))


def token_importance(attn: torch.Tensor, num_joints: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keypoint-query attention (B, J, J + HW) -> (visual importance (B, HW), keypoint importance (B, J))."""
    kv = attn[:, :, num_joints:].float()  # (B, J, HW): keypoint queries over visual keys
    return kv.sum(dim=1), kv.sum(dim=2)


class MaskedTokenDistilLoss(nn.Module):
    """MSE between student and teacher tokens over the positions left after masking (see module doc)."""

    def __init__(self, loss_weight: float = 5e-6, mask_ratio: float = 0.0,
                 mask_strategy: Literal["random", "importance"] = "random", detach_teacher: bool = False):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if mask_strategy not in ("random", "importance"):
            raise ValueError(f"mask_strategy must be 'random' or 'importance', got '{mask_strategy}'")
        self.loss_weight, self.mask_ratio, self.mask_strategy = loss_weight, mask_ratio, mask_strategy
        self.detach_teacher = detach_teacher

    @property
    def needs_attention(self) -> bool:
        return self.mask_strategy == "importance" and num_masked(self.mask_ratio, 1000) > 0 and self.loss_weight > 0

    def keep_mask(self, b: int, n: int, importance: torch.Tensor | None = None, device=None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, N) bool, False at exactly num_masked(mask_ratio, N) positions per row."""
        k = num_masked(self.mask_ratio, n)
        keep = torch.ones(b, n, dtype=torch.bool, device=device)
        if k == 0:
            return keep
        if self.mask_strategy == "importance":
            if importance is None:
                raise ValueError("mask_strategy='importance' needs the teacher's attention (model need_attn=True)")
            order = torch.sort(importance.float(), dim=1, stable=True).indices  # ascending: least important first
        else:
            order = torch.rand(b, n, device=device, generator=generator).argsort(dim=1)
        return keep.scatter(1, order[:, :k].to(keep.device), False)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, importance: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """student, teacher: (B, N, C); importance: (B, N) for the importance strategy."""
        if self.detach_teacher:
            teacher = teacher.detach()
        b, n, c = student.shape
        keep = self.keep_mask(b, n, importance, student.device, generator)  # (B, N)
        sq = (student.float() - teacher.float()).square().sum(dim=-1)  # (B, N)
        return self.loss_weight * (sq * keep).sum() / (keep.sum() * c).clamp(min=1)
