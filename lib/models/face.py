"""Face recognition networks: backbone -> pooled features -> embedding (B, embed_dim); margin heads.

    model = FaceNet(FaceModelConfig(backbone="resnet18", embed_dim=512), num_classes=1000, heads=heads)
    emb = model(x)                         # (B, 3, H, W) -> (B, D) embedding (eval / verification)
    emb, logits = model(x, labels)         # training: + {head name: (B, num_classes) logits}
    count_params(model)                    # {"total": ..., "without_head": ...}  (budget counts the latter)

Backbones (all random init; weights only from a local file):
  * `resnet18` / `resnet34` (BasicBlock) and `resnet50` / `resnet101` (Bottleneck: 1x1 -> 3x3 -> 1x1,
    expansion 4): torchvision/timm ResNet with a width multiplier (stage widths round(64w),
    round(128w), ...; x4 out of a bottleneck) and optional SE or CBAM in every block. Keys are
    timm's (`conv1`, `layer1.0.conv2`, SE `se.fc1`, CBAM `se.channel.fc1`), so timm / torchvision
    ResNet weight files load as they are (`convert_state_dict`); at width 1 the parameter count
    equals timm's `resnet18` / `seresnet18` / `resnet50` / `seresnet50` (+ CBAM) with num_classes=0.
  * `efficientnet_b0`, `mobilenetv2_100`, `tiny_vit_11m_224` (any timm name): `timm.create_model(
    name, num_classes=0, **model.timm_kwargs)`; its own `forward_head(pre_logits=True)` pools (TinyViT:
    + its LayerNorm). EfficientNet-B0..B7 take `channel_multiplier` / `depth_multiplier` in
    `model.timm_kwargs` (the width multiplier: {channel_multiplier: 0.75}); timm's registered names fix
    them, so these two go to timm's EfficientNet generator with the variant's other settings.
Embedding: dropout -> Linear(C, D, bias=False) -> BatchNorm1d(D) (the "BN-FC-BN"-less, pooled variant
of ArcFace's output layer: no resolution-dependent flatten, so 112 and 224 inputs both work).
The classification weights live in `model.heads` (lib/losses/face.py): the "head" that the
parameter budget excludes is exactly the parameters under `heads.`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import timm
import torch
import torch.nn.functional as F
from timm.layers import make_divisible
from torch import nn

from lib.config import NonNegInt, PathStr, PosFloat, PosInt, Range
from lib.errors import ModelError

HEAD_PREFIX = "heads."
RESNETS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
           "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3))}
# EfficientNet compound scaling (channel, depth) of timm's registered names (Tan & Le 2019, Table 2 / timm)
EFFNET_SCALE = {"efficientnet_b0": (1.0, 1.0), "efficientnet_b1": (1.0, 1.1), "efficientnet_b2": (1.1, 1.2),
                "efficientnet_b3": (1.2, 1.4), "efficientnet_b4": (1.4, 1.8), "efficientnet_b5": (1.6, 2.2),
                "efficientnet_b6": (1.8, 2.6), "efficientnet_b7": (2.0, 3.1)}


@dataclass
class FaceModelConfig:
    backbone: str = "resnet18"  # resnet18/34/50/101 | efficientnet_b0 | mobilenetv2_100 | tiny_vit_11m_224 | timm name
    width: PosFloat = 1.0  # resnet channel multiplier (0.72 -> 46, 92, 184, 369 channels; x4 out of a bottleneck)
    attn: str = ""  # resnet block attention: "" | se | cbam
    stem_stride: Literal[2, 4] = 4  # resnet: 4 = 7x7/2 conv + max-pool (timm), 2 = 3x3/2 conv, no pool (more detail at 112 px)
    embed_dim: PosInt = 512
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0  # before the embedding layer
    drop_path_rate: Annotated[float, Range(ge=0, lt=1)] = 0.0  # timm backbones
    max_params: NonNegInt = 11_500_000  # budget without the classification head (0 = no check)
    backbone_weights: PathStr = ""  # local timm/torchvision-layout file for the backbone ("" = random init)
    frozen_stages: NonNegInt = 0  # resnet: freeze the stem and the first N stages (fine-tuning)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # timm backbones: create_model keyword arguments,
    # e.g. {channel_multiplier: 0.75} (EfficientNet width multiplier), {drop_rate: 0.2}


# ----------------------------------------------------------------------------- ResNet
class SE(nn.Module):
    """Squeeze-and-excitation (timm SEModule keys: fc1, fc2 with bias; reduction 1/16, multiple of 8)."""

    def __init__(self, ch: int):
        super().__init__()
        rd = make_divisible(ch / 16, 8, round_limit=0.0)
        self.fc1, self.fc2 = nn.Conv2d(ch, rd, 1), nn.Conv2d(rd, ch, 1)

    def forward(self, x):  # (B, C, H, W)
        return x * self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()


class ChannelAttn(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        rd = make_divisible(ch / 16, 1, round_limit=0.0)
        self.fc1, self.fc2 = nn.Conv2d(ch, rd, 1, bias=False), nn.Conv2d(rd, ch, 1, bias=False)

    def forward(self, x):  # (B, C, H, W)
        mlp = lambda p: self.fc2(F.relu(self.fc1(p)))  # noqa: E731
        return x * (mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True))).sigmoid()


class ConvBN(nn.Sequential):  # keys conv.*, bn.* as timm's ConvNormAct
    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)


class SpatialAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = ConvBN(2, 1, 7)

    def forward(self, x):  # (B, C, H, W)
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)  # (B, 2, H, W)
        return x * self.conv(pooled).sigmoid()


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al. 2018): channel then spatial attention (timm keys)."""

    def __init__(self, ch: int):
        super().__init__()
        self.channel, self.spatial = ChannelAttn(ch), SpatialAttn()

    def forward(self, x):
        return self.spatial(self.channel(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, attn: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.se = SE(cout) if attn == "se" else CBAM(cout) if attn == "cbam" else None
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 x4 channels, attention after the last BN (timm / torchvision ResNet-50 keys)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, attn: str):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.se = SE(cout) if attn == "se" else CBAM(cout) if attn == "cbam" else None
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):  # (B, C_in, H, W) -> (B, 4 planes, H/s, W/s)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """BasicBlock ResNet-18/34 or Bottleneck ResNet-50/101 without classifier; `width` scales every stage."""

    def __init__(self, depths=(2, 2, 2, 2), width: float = 1.0, attn: str = "", stem_stride: int = 4,
                 block: str = "basic"):
        super().__init__()
        if attn not in ("", "se", "cbam"):
            raise ModelError(f"model.attn must be '', 'se' or 'cbam', got '{attn}'")
        if stem_stride not in (2, 4):
            raise ModelError(f"model.stem_stride must be 2 or 4, got {stem_stride}")
        chs = [max(int(round(c * width)), 8) for c in (64, 128, 256, 512)]
        stem = chs[0]
        if stem_stride == 4:
            self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, stem, 3, 2, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem)
        cls, expansion = (Bottleneck, 4) if block == "bottleneck" else (BasicBlock, 1)
        cin = stem
        for i, (c, d) in enumerate(zip(chs, depths)):
            blocks = [cls(cin if j == 0 else c * expansion, c, 2 if (i > 0 and j == 0) else 1, attn) for j in range(d)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = c * expansion
        self.num_features = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # zero-init the last BN of each residual branch (timm / Goyal et al.)
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)
            elif isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward_features(self, x):  # (B, 3, H, W) -> (B, C, H/32, W/32)  (H/16 with stem_stride 2)
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x, pre_logits: bool = True):  # (B, C, h, w) -> (B, C)
        return x.mean((2, 3))

    def freeze_stages(self, n: int) -> None:
        """Freeze the stem and stages 1..n (weights and BN statistics stay as loaded)."""
        mods = [self.conv1, self.bn1] + [getattr(self, f"layer{i + 1}") for i in range(min(n, 4))]
        for m in mods:
            m.requires_grad_(False)
            for bn in [m] + list(m.modules()):
                if isinstance(bn, nn.BatchNorm2d):
                    bn.eval()  # re-applied by FaceNet.train()
        self._frozen = mods


# ----------------------------------------------------------------------------- face network
class Embedding(nn.Module):
    def __init__(self, cin: int, dim: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, dim, bias=False)
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x):  # (B, C) -> (B, D)
        return self.bn(self.fc(self.drop(x)))


def timm_backbone(name: str, drop_path_rate: float = 0.0, kwargs: dict | None = None) -> nn.Module:
    """timm model without classifier; `kwargs` pass through to timm (EfficientNet channel / depth multipliers
    go to timm's generator with the variant's config, as its registered names fix them)."""
    kwargs = dict(kwargs or {})
    try:
        if name in EFFNET_SCALE and {"channel_multiplier", "depth_multiplier"} & set(kwargs):
            from timm.models.efficientnet import _gen_efficientnet

            cm, dm = EFFNET_SCALE[name]
            cm, dm = kwargs.pop("channel_multiplier", cm), kwargs.pop("depth_multiplier", dm)
            return _gen_efficientnet(name, channel_multiplier=cm, depth_multiplier=dm, pretrained=False,
                                     num_classes=0, drop_path_rate=drop_path_rate, **kwargs)
        return timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **kwargs)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise ModelError(f"model.backbone: {e}") from None
    except TypeError as e:  # a keyword the timm model does not take
        raise ModelError(f"model.timm_kwargs {kwargs} for '{name}': {e}") from None


class FaceNet(nn.Module):
    head_prefixes = (HEAD_PREFIX,)  # parameters of the classification heads (optimizer groups, budget)

    def __init__(self, cfg: FaceModelConfig, heads: nn.ModuleDict | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.backbone in RESNETS:
            if cfg.timm_kwargs:
                raise ModelError(f"model.timm_kwargs apply to timm backbones, not '{cfg.backbone}' "
                                 "(use model.width / model.attn)")
            block, depths = RESNETS[cfg.backbone]
            self.backbone = ResNet(depths, cfg.width, cfg.attn, cfg.stem_stride, block)
        else:
            if cfg.attn or cfg.width != 1.0:
                raise ModelError(f"model.attn / model.width apply to {'/'.join(RESNETS)} only, not '{cfg.backbone}'"
                                 " (timm backbones: model.timm_kwargs, e.g. {channel_multiplier: 0.75})")
            self.backbone = timm_backbone(cfg.backbone, cfg.drop_path_rate, cfg.timm_kwargs)
        if cfg.frozen_stages:
            if not isinstance(self.backbone, ResNet):
                raise ModelError(f"model.frozen_stages is supported for {'/'.join(RESNETS)} backbones only")
            self.backbone.freeze_stages(cfg.frozen_stages)
        self.embed = Embedding(self.backbone.num_features, cfg.embed_dim, cfg.dropout)
        self.heads = heads if heads is not None else nn.ModuleDict()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, C, h, w)
        return self.backbone.forward_features(x)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, D)
        return self.embed(self.backbone.forward_head(feats, pre_logits=True))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        emb = self.forward_head(self.forward_features(x))  # (B, D)
        if labels is None:
            return emb
        return emb, {name: head(emb, labels) for name, head in self.heads.items()}  # name -> (B, K)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in getattr(self.backbone, "_frozen", []):  # frozen stages keep their BN statistics
            m.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        return {"backbone." + k for k in getattr(self.backbone, "no_weight_decay", lambda: set())()}


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameter counts: total, and without the classification head (`heads.*`, the budget's count)."""
    total = head = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if name.startswith(HEAD_PREFIX) or f".{HEAD_PREFIX}" in name:
            head += p.numel()
    return {"total": total, "without_head": total - head, "head": head}


def check_budget(counts: dict[str, int], max_params: int) -> None:
    """ModelError when the parameters without the head exceed `max_params` (0 = no budget)."""
    if max_params and counts["without_head"] > max_params:
        raise ModelError(f"model has {counts['without_head']:,} parameters without the head, over the budget "
                        f"model.max_params={max_params:,} (reduce model.width / embed_dim or pick a smaller backbone)")


# ----------------------------------------------------------------------------- weight conversion
_CLASSIFIER = re.compile(r"^(fc|classifier|head\.fc|head)\.(weight|bias)$")


def load_backbone(model: FaceNet, path: str, log=print) -> None:
    """A local timm / torchvision-layout backbone file (e.g. resnet18 .pth / .safetensors) into `model.backbone`."""
    from lib.checkpoint import load_weights

    prefix = "backbone."
    load_weights(model.backbone, path, log=log, convert=lambda sd: {
        k[len(prefix):]: v for k, v in convert_state_dict(sd).items() if k.startswith(prefix)})


def convert_state_dict(sd: dict) -> dict:
    """This script's checkpoints as they are; a timm / torchvision backbone file (resnet, efficientnet,
    mobilenetv2, tiny_vit: keys `layer1.0.conv1.weight`, `blocks.0...`) -> `backbone.*`, classifier dropped."""
    if any(k.startswith(("backbone.", "embed.", "heads.")) for k in sd):
        return dict(sd)
    return {"backbone." + k: v for k, v in sd.items() if not _CLASSIFIER.match(k)}
