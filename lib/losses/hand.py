"""Losses of the 3D hand regressor (HaMeR-like terms and default weights).

    losses = hand_losses(out, batch, LossWeights())   # {"loss_3d", "loss_2d", "loss_theta", "loss_beta"}, weighted
    total = sum(losses.values())

  loss_3d      L1 (or L2) on root-relative 3D joints in metres, summed over joints and xyz
  loss_2d      L1 (or L2) on 2D joints in crop coordinates [-0.5, 0.5], the 3D joints projected
               by the predicted weak-perspective camera (s, tx, ty): uv = s * xy + t
  loss_theta   MANO pose theta: global_orient x MSE on the global rotation matrix + hand_pose x MSE on
               the 15 finger rotation matrices, samples with MANO labels only
  loss_beta    MANO shape: MSE on the 10 betas, samples with MANO labels only
Per-sample sums are averaged over the batch. The MANO terms are always computed (zero when no
sample has labels) so every head output stays in the graph (DDP needs no unused-parameter search);
train_hand.py logs them when the training set has MANO labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lib.config import NonNegFloat
from lib.geometry import axis_angle_to_rotmat


@dataclass
class LossWeights:
    joints_3d: NonNegFloat = 0.05
    joints_2d: NonNegFloat = 0.01
    global_orient: NonNegFloat = 0.001
    hand_pose: NonNegFloat = 0.001
    betas: NonNegFloat = 0.0005
    kind: Literal["l1", "l2"] = "l1"  # keypoint terms


def project(joints: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """Weak perspective: (B, J, 3) joints, (B, 3) camera (s, tx, ty) -> (B, J, 2) crop coordinates."""
    return cam[:, None, :1] * joints[..., :2] + cam[:, None, 1:]


def keypoint_loss(pred: torch.Tensor, gt: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """(B, J, D) -> scalar: per-sample sum of |d| (l1) or d^2 (l2), mean over the batch."""
    d = pred.float() - gt.float()
    d = d.abs() if kind == "l1" else d.pow(2)
    return d.flatten(1).sum(1).mean()


def masked_mse(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample summed squared error, averaged over the samples where mask is 1 (0 if none)."""
    err = (pred.float() - gt.float()).pow(2).flatten(1).sum(1)  # (B,)
    return (err * mask).sum() / mask.sum().clamp_min(1)


def hand_losses(out: dict, batch: dict, w: LossWeights) -> dict[str, torch.Tensor]:
    """Weighted loss terms from the model output and a batch (see lib/data/hand.py for the keys)."""
    joints = out["joints"] - out["joints"][:, :1]  # root-relative (B, 21, 3)
    mask = batch["has_mano"].float()  # (B,)
    gt_rot = axis_angle_to_rotmat(batch["mano_pose"].float())  # (B, 16, 3, 3)
    return {
        "loss_3d": w.joints_3d * keypoint_loss(joints, batch["joints3d"], w.kind),
        "loss_2d": w.joints_2d * keypoint_loss(project(joints, out["cam"]), batch["joints2d"], w.kind),
        "loss_theta": w.global_orient * masked_mse(out["pose"][:, 0], gt_rot[:, 0], mask)
        + w.hand_pose * masked_mse(out["pose"][:, 1:], gt_rot[:, 1:], mask),
        "loss_beta": w.betas * masked_mse(out["betas"], batch["mano_betas"], mask),
    }
