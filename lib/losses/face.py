"""Face recognition losses: classification heads (they hold the class weights) and triplet mining.

    heads = build_heads(cfg, embed_dim, num_classes)     # nn.ModuleDict, lives in model.heads
    emb, logits = model(img, labels)                      # logits: {term: (B, K)} margin-adjusted
    losses = face_losses(emb, logits, labels, cfg)        # {"loss_arcface": w * ce, "loss_triplet": ...}

Terms (`cfg.terms`, weighted by `cfg.weights`, e.g. softmax + arcface 0.7 : 0.3):
  softmax   Linear(D, K) + cross-entropy
  arcface   s * cos(theta_y + m) for the target, s * cos(theta_j) otherwise (Deng et al. 2019);
            `sub_centers` > 1: sub-center ArcFace (Deng et al. 2020), max over k centres per class
  cosface   s * (cos(theta_y) - m) (Wang et al. 2018)
  adaface   margin adapted to the feature norm (image quality proxy) (Kim et al. 2022)
  triplet   squared distances of L2-normalised embeddings, margin; negatives mined as in
            clovaai/voxceleb_trainer: with probability hard_prob one of the hard_rank + 1 most
            similar negatives, else a random one; hard_rank < 0 = semi-hard negatives
With m = 0 the margin heads are plain softmax over s * cosine (normalised-softmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lib.config import Frac, NonNegFloat, NonNegInt, PosFloat, PosInt, Range

Term = Literal["softmax", "arcface", "cosface", "adaface", "triplet"]


@dataclass
class FaceLossConfig:
    terms: list[Term] = field(default_factory=lambda: ["arcface"])
    weights: list[NonNegFloat] = field(default_factory=list)  # one per term; [] = 1 each
    scale: PosFloat = 64.0  # s of arcface / cosface / adaface
    arcface_margin: NonNegFloat = 0.5
    cosface_margin: NonNegFloat = 0.35
    sub_centers: PosInt = 1  # arcface: k sub-centres per class (sub-center ArcFace, k=3 in the paper)
    adaface_margin: NonNegFloat = 0.4
    adaface_h: NonNegFloat = 0.333
    triplet_margin: NonNegFloat = 0.1
    hard_rank: NonNegInt = 10  # triplet: hard negatives are drawn from the hard_rank + 1 most similar
    hard_prob: Frac = 0.5  # triplet: probability of a hard (vs random) negative
    label_smoothing: Annotated[float, Range(ge=0, lt=1)] = 0.0  # softmax-type terms


def term_weights(cfg: FaceLossConfig) -> list[float]:
    if cfg.weights and len(cfg.weights) != len(cfg.terms):
        raise ValueError(f"loss.weights has {len(cfg.weights)} values for {len(cfg.terms)} loss.terms")
    return list(cfg.weights) if cfg.weights else [1.0] * len(cfg.terms)


class NormLinear(nn.Module):
    """Class weights (K * k, D) for cosine logits; cos(theta) = <x / |x|, w / |w|>."""

    def __init__(self, dim: int, num_classes: int, sub_centers: int = 1):
        super().__init__()
        self.num_classes, self.sub_centers = num_classes, sub_centers
        self.weight = nn.Parameter(torch.empty(num_classes * sub_centers, dim))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, K) in [-1, 1]
        cos = F.linear(F.normalize(emb.float(), dim=1), F.normalize(self.weight.float(), dim=1))
        if self.sub_centers > 1:
            cos = cos.view(-1, self.num_classes, self.sub_centers).amax(-1)  # nearest sub-centre
        return cos.clamp(-1, 1)


class SoftmaxHead(nn.Linear):
    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(emb)


class ArcFaceHead(NormLinear):
    def __init__(self, dim: int, num_classes: int, s: float = 64.0, m: float = 0.5, sub_centers: int = 1):
        super().__init__(dim, num_classes, sub_centers)
        self.s, self.m = s, m

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(emb)  # (B, K)
        if labels is None or labels.ndim != 1 or self.m == 0:
            return self.s * cos
        c = cos.gather(1, labels[:, None])  # (B, 1) target cosine
        sin = (1 - c * c).clamp_min(0).sqrt()
        target = c * math.cos(self.m) - sin * math.sin(self.m)  # cos(theta + m)
        # insightface: where theta + m > pi, cos(theta + m) is not monotonic; use cos(theta) - m sin(m)
        target = torch.where(c > math.cos(math.pi - self.m), target, c - math.sin(math.pi - self.m) * self.m)
        return self.s * cos.scatter(1, labels[:, None], target)


class CosFaceHead(NormLinear):
    def __init__(self, dim: int, num_classes: int, s: float = 64.0, m: float = 0.35):
        super().__init__(dim, num_classes)
        self.s, self.m = s, m

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(emb)
        if labels is None or labels.ndim != 1:
            return self.s * cos
        return self.s * (cos - self.m * F.one_hot(labels, cos.shape[1]))


class AdaFaceHead(NormLinear):
    """AdaFace (Kim et al., CVPR 2022; official mk-minchul/AdaFace head): the feature norm, standardised by
    running batch statistics, scales an angular and an additive margin (hard-to-recognise low-norm
    images get a smaller margin)."""

    def __init__(self, dim: int, num_classes: int, s: float = 64.0, m: float = 0.4, h: float = 0.333,
                 t_alpha: float = 0.01):
        super().__init__(dim, num_classes)
        self.s, self.m, self.h, self.t_alpha, self.eps = s, m, h, t_alpha, 1e-3
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(emb).clamp(-1 + self.eps, 1 - self.eps)  # (B, K)
        if labels is None or labels.ndim != 1:
            return self.s * cos
        norms = emb.detach().float().norm(dim=1, keepdim=True).clamp(0.001, 100)  # (B, 1)
        if self.training:
            with torch.no_grad():
                std = norms.std() if len(norms) > 1 else norms.new_tensor(0.0)
                self.batch_mean.mul_(1 - self.t_alpha).add_(self.t_alpha * norms.mean())
                self.batch_std.mul_(1 - self.t_alpha).add_(self.t_alpha * std)
        scaler = ((norms - self.batch_mean) / (self.batch_std + self.eps) * self.h).clamp(-1, 1)  # (B, 1)
        one_hot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        theta = cos.acos() + one_hot * (-self.m * scaler)  # angular margin g_angle = -m * scaler
        cos_m = theta.clamp(self.eps, math.pi - self.eps).cos()
        return self.s * (cos_m - one_hot * (self.m + self.m * scaler))  # additive margin g_add = m + m * scaler


def build_heads(cfg: FaceLossConfig, dim: int, num_classes: int) -> nn.ModuleDict:
    """One classification head per softmax-type term (triplet has none)."""
    heads = nn.ModuleDict()
    for t in cfg.terms:
        if t == "softmax":
            heads[t] = SoftmaxHead(dim, num_classes)
        elif t == "arcface":
            heads[t] = ArcFaceHead(dim, num_classes, cfg.scale, cfg.arcface_margin, cfg.sub_centers)
        elif t == "cosface":
            heads[t] = CosFaceHead(dim, num_classes, cfg.scale, cfg.cosface_margin)
        elif t == "adaface":
            heads[t] = AdaFaceHead(dim, num_classes, cfg.scale, cfg.adaface_margin, cfg.adaface_h)
    return heads


# ----------------------------------------------------------------------------- triplet
def mine_negatives(sim: torch.Tensor, neg_mask: torch.Tensor, pos_sim: torch.Tensor, hard_rank: int,
                   hard_prob: float, margin: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Index of one negative per anchor row (voxceleb_trainer's mineHardNegative, vectorised).

    sim: (N, M) similarity (higher = closer), neg_mask: (N, M) bool valid negatives (>= 1 per row),
    pos_sim: (N,) anchor-positive similarity. hard_rank >= 0: with probability hard_prob a uniform
    pick among the hard_rank + 1 most similar negatives, else a uniform pick among all negatives.
    hard_rank < 0: semi-hard (pos_sim - margin < sim < pos_sim), random negative if there is none.
    """
    n = sim.shape[0]
    rand = lambda *s: torch.rand(*s, generator=generator, device=sim.device)  # noqa: E731
    n_neg = neg_mask.sum(1)  # (N,)
    if hard_rank < 0:
        semi = neg_mask & (sim > pos_sim[:, None] - margin) & (sim < pos_sim[:, None])
        pool = torch.where(semi.any(1, keepdim=True), semi, neg_mask)
        return torch.where(pool, rand(sim.shape), -1.0).argmax(1)  # uniform among the pool
    order = sim.masked_fill(~neg_mask, float("-inf")).argsort(1, descending=True)  # negatives first, hardest first
    hard = (rand(n) * torch.clamp(n_neg, max=hard_rank + 1)).long()
    uniform = (rand(n) * n_neg).long()
    rank = torch.where(rand(n) < hard_prob, hard, uniform)
    return order.gather(1, rank[:, None])[:, 0]


def triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.1, hard_rank: int = 10,
                 hard_prob: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean relu(|a - p|^2 - |a - n|^2 + margin) over anchors with a positive and a negative in the batch.

    Embeddings are L2-normalised. The positive of an anchor is a random other image of its identity
    (with the P x K sampler: one of the K - 1 others), the negative is mined by `mine_negatives`.
    """
    x = F.normalize(emb.float(), dim=1)  # (N, D)
    d2 = torch.cdist(x, x).pow(2)  # (N, N) squared distances
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
    pos_mask, neg_mask = same & ~eye, ~same
    valid = pos_mask.any(1) & neg_mask.any(1)
    if not bool(valid.any()):
        return emb.sum() * 0.0
    rand = torch.rand(d2.shape, generator=generator, device=x.device)
    pos = torch.where(pos_mask, rand, -1.0).argmax(1)  # (N,) random positive
    pos_d2 = d2.gather(1, pos[:, None])[:, 0]
    neg = mine_negatives(-d2.detach(), neg_mask | ~valid[:, None], -pos_d2.detach(), hard_rank, hard_prob,
                         margin, generator)
    neg_d2 = d2.gather(1, neg[:, None])[:, 0]
    return F.relu(pos_d2 - neg_d2 + margin)[valid].mean()


# ----------------------------------------------------------------------------- combination
def face_losses(emb: torch.Tensor, logits: dict[str, torch.Tensor], labels: torch.Tensor,
                cfg: FaceLossConfig, targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Weighted loss terms {"loss_<term>": w * loss}. `targets` (B, K) soft labels (MixUp/CutMix) replace
    `labels` in the softmax term's cross-entropy."""
    out = {}
    for term, w in zip(cfg.terms, term_weights(cfg)):
        if term == "triplet":
            loss = triplet_loss(emb, labels, cfg.triplet_margin, cfg.hard_rank, cfg.hard_prob)
        else:
            soft = targets is not None and term == "softmax"  # already smoothed by timm's Mixup
            loss = F.cross_entropy(logits[term].float(), targets if soft else labels,
                                   label_smoothing=0.0 if soft else cfg.label_smoothing)
        out[f"loss_{term}"] = w * loss
    return out
