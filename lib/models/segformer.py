"""SegFormer (Xie et al., NeurIPS 2021): Mix Transformer encoder MiT-B0..B5 + all-MLP decoder.

    model = SegFormer("b0", num_classes=19)
    feats = model.forward_features(x)     # 4 maps (B, C_i, H/4, W/4) ... (B, C_4, H/32, W/32)
    logits = model.forward_head(feats)    # (B, K, H/4, W/4)
    logits = model(x)                      # same

External weights (local files only), converted by `convert_state_dict` (layout auto-detected):
  * HF transformers `SegformerForSemanticSegmentation` / `SegformerModel` (v4 names
    `segformer.encoder.block.0.0.attention.self.query` and v5 names `segformer.stages.0.blocks...`),
  * NVlabs/SegFormer (mmseg 0.x based) `.pth`: `backbone.block1.0.attn.q`, `decode_head.linear_c4`,
  * MiT ImageNet backbone weights (`mit_b0.pth`: `patch_embed1`, `block1`, `norm1`, `head`).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from lib.errors import ModelError

MIT_SETTINGS = {  # embed dims, depths, decoder dim
    "b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256),
    "b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256),
    "b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768),
    "b3": ([64, 128, 320, 512], [3, 4, 18, 3], 768),
    "b4": ([64, 128, 320, 512], [3, 8, 27, 3], 768),
    "b5": ([64, 128, 320, 512], [3, 6, 40, 3], 768),
}
HEADS = [1, 2, 5, 8]
SR_RATIOS = [8, 4, 2, 1]
PATCH = [(7, 4), (3, 2), (3, 2), (3, 2)]  # (kernel, stride) of each overlapping patch embedding


class OverlapPatchEmbed(nn.Module):
    def __init__(self, in_ch: int, dim: int, kernel: int, stride: int, eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, kernel, stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):  # (B, C_in, H, W) -> (B, N, C), H', W'
        x = self.proj(x)
        h, w = x.shape[2:]
        return self.norm(rearrange(x, "b c h w -> b (h w) c")), h, w


class EfficientAttention(nn.Module):
    """Multi-head self-attention whose keys/values come from a spatially reduced (strided conv) map."""

    def __init__(self, dim: int, heads: int, sr_ratio: int, eps: float, attn_drop: float = 0.0):
        super().__init__()
        self.heads, self.attn_drop = heads, attn_drop
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, h: int, w: int):  # (B, N, C)
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        if self.sr_ratio > 1:
            r = rearrange(x, "b (h w) c -> b c h w", h=h, w=w)
            x = self.norm(rearrange(self.sr(r), "b c h w -> b (h w) c"))  # (B, N / sr^2, C)
        k, v = rearrange(self.kv(x), "b m (two h d) -> two b h m d", two=2, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class MixFFN(nn.Module):
    """Linear -> 3x3 depthwise conv (positional information) -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x, h: int, w: int):  # (B, N, C)
        x = self.fc1(x)
        x = rearrange(self.dwconv(rearrange(x, "b (h w) c -> b c h w", h=h, w=w)), "b c h w -> b (h w) c")
        return self.fc2(self.drop(F.gelu(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, sr_ratio, mlp_ratio, drop_path, eps, drop=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = EfficientAttention(dim, heads, sr_ratio, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MixFFN(dim, dim * mlp_ratio, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, h: int, w: int):
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixTransformer(nn.Module):
    """MiT encoder: 4 stages of overlapping patch embedding + efficient-attention blocks."""

    def __init__(self, dims, depths, in_chans=3, mlp_ratio=4, drop_path_rate=0.1, eps=1e-6, drop=0.0):
        super().__init__()
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.patch_embeds = nn.ModuleList()
        self.blocks = nn.ModuleList()
        self.norms = nn.ModuleList()
        cur, prev = 0, in_chans
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            self.patch_embeds.append(OverlapPatchEmbed(prev, dim, *PATCH[i], eps=eps))
            self.blocks.append(nn.ModuleList(
                Block(dim, HEADS[i], SR_RATIOS[i], mlp_ratio, dpr[cur + j], eps, drop) for j in range(depth)))
            self.norms.append(nn.LayerNorm(dim, eps=eps))
            cur, prev = cur + depth, dim
        self.grad_checkpointing = False

    def forward(self, x) -> list[torch.Tensor]:  # (B, 3, H, W) -> 4 x (B, C_i, H_i, W_i)
        outs = []
        for embed, blocks, norm in zip(self.patch_embeds, self.blocks, self.norms):
            x, h, w = embed(x)
            for blk in blocks:
                if self.grad_checkpointing and self.training:
                    x = checkpoint(blk, x, h, w, use_reentrant=False)
                else:
                    x = blk(x, h, w)
            x = rearrange(norm(x), "b (h w) c -> b c h w", h=h, w=w)
            outs.append(x)
        return outs


class SegFormerHead(nn.Module):
    """All-MLP decoder: per-stage linear to `dim`, upsample to 1/4, concat (c4..c1), fuse, classify."""

    def __init__(self, in_dims, dim, num_classes, dropout=0.1):
        super().__init__()
        self.linear_c = nn.ModuleList(nn.Linear(c, dim) for c in in_dims)
        self.linear_fuse = nn.Conv2d(dim * len(in_dims), dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.dropout = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(dim, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[2:]
        outs = []
        for f, lin in zip(feats, self.linear_c):
            y = rearrange(lin(rearrange(f, "b c h w -> b h w c")), "b h w c -> b c h w")
            if y.shape[2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            outs.append(y)
        x = F.relu(self.bn(self.linear_fuse(torch.cat(outs[::-1], dim=1))))  # (B, dim, H/4, W/4)
        return self.cls(self.dropout(x))  # (B, K, H/4, W/4)


class SegFormer(nn.Module):
    head_prefixes = ("decode_head.",)  # parameter names of the head (lib.optim.param_groups: optim.head_lr_mult)

    def __init__(self, variant: str = "b0", num_classes: int = 19, drop_path_rate: float = 0.1,
                 decoder_dropout: float = 0.1, ln_eps: float = 1e-6, in_chans: int = 3):
        super().__init__()
        if variant not in MIT_SETTINGS:
            raise ModelError(f"unknown SegFormer variant '{variant}' (choose from {list(MIT_SETTINGS)})")
        dims, depths, dec = MIT_SETTINGS[variant]
        self.dims, self.num_classes = dims, num_classes
        self.backbone = MixTransformer(dims, depths, in_chans, drop_path_rate=drop_path_rate, eps=ln_eps)
        self.decode_head = SegFormerHead(dims, dec, num_classes, decoder_dropout)
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(x)

    def forward_head(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.decode_head(feats)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """(B, 3, H, W) -> logits (B, K, H/4, W/4) [, the 4 stage features]. Distillation asks for the
        features through forward() (not forward_features) so that DDP sees one forward call."""
        feats = self.forward_features(x)
        logits = self.forward_head(feats)
        return (logits, feats) if return_features else logits

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return set()  # norms and biases are 1-d and already excluded by lib.optim


def _init_weights(m: nn.Module) -> None:  # NVlabs init
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, (2.0 / fan_out) ** 0.5)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- weight conversion
_HF_V4_TO_V5 = [  # transformers' own renaming of SegFormer keys (v4 files -> v5 names)
    (r"encoder\.patch_embeddings\.(\d+)\.", r"stages.\1.patch_embeddings."),
    (r"encoder\.block\.(\d+)\.", r"stages.\1.blocks."),
    (r"encoder\.layer_norm\.(\d+)", r"stages.\1.layer_norm"),
    (r"attention\.self\.query", "attention.q_proj"),
    (r"attention\.self\.key", "attention.k_proj"),
    (r"attention\.self\.value", "attention.v_proj"),
    (r"attention\.self\.sr", "attention.sequence_reduction.sequence_reduction"),
    (r"attention\.self\.layer_norm", "attention.sequence_reduction.layer_norm"),
    (r"attention\.output\.dense", "attention.o_proj"),
    (r"mlp\.dense1", "mlp.fc1"),
    (r"mlp\.dense2", "mlp.fc2"),
    (r"layer_norm_1", "layernorm_before"),
    (r"layer_norm_2", "layernorm_after"),
    (r"decode_head\.linear_c\.", "decode_head.linear_projections."),
]
_HF_V5_TO_OURS = [
    (r"^stages\.(\d+)\.patch_embeddings\.layer_norm\.", r"backbone.patch_embeds.\1.norm."),
    (r"^stages\.(\d+)\.patch_embeddings\.proj\.", r"backbone.patch_embeds.\1.proj."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"backbone.blocks.\1.\2."),
    (r"^stages\.(\d+)\.layer_norm\.", r"backbone.norms.\1."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.q_proj\.", ".attn.q."),
    (r"\.attention\.o_proj\.", ".attn.proj."),
    (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attn.sr."),
    (r"\.attention\.sequence_reduction\.layer_norm\.", ".attn.norm."),
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
    (r"^decode_head\.linear_projections\.(\d+)\.proj\.", r"decode_head.linear_c.\1."),
    (r"^decode_head\.batch_norm\.", "decode_head.bn."),
    (r"^decode_head\.classifier\.", "decode_head.cls."),
]
_NVLABS_TO_OURS = [
    (r"^backbone\.patch_embed(\d)\.", lambda m: f"backbone.patch_embeds.{int(m[1]) - 1}."),
    (r"^backbone\.block(\d)\.(\d+)\.", lambda m: f"backbone.blocks.{int(m[1]) - 1}.{m[2]}."),
    (r"^backbone\.norm(\d)\.", lambda m: f"backbone.norms.{int(m[1]) - 1}."),
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
    (r"^decode_head\.linear_c(\d)\.proj\.", lambda m: f"decode_head.linear_c.{int(m[1]) - 1}."),
    (r"^decode_head\.linear_fuse\.conv\.", "decode_head.linear_fuse."),
    (r"^decode_head\.linear_fuse\.bn\.", "decode_head.bn."),
    (r"^decode_head\.linear_pred\.", "decode_head.cls."),
]


def _rename(key: str, rules) -> str:
    for pat, rep in rules:
        key = re.sub(pat, rep, key)
    return key


def detect_layout(sd: dict) -> str:
    keys = list(sd)
    if any(k.startswith("backbone.patch_embeds.") for k in keys):
        return "ours"
    if any("patch_embeddings" in k for k in keys):
        return "hf"
    if any(re.match(r"^(backbone\.)?patch_embed1\.", k) for k in keys):
        return "nvlabs"
    if any(k.startswith("backbone.layers.") for k in keys):
        raise ModelError("mmseg 1.x SegFormer layout (backbone.layers.*, decode_head.convs.*) is not supported; "
                         "use the HF or NVlabs checkpoint of the same model")
    some = ", ".join(keys[:3])
    raise ModelError(f"unrecognised SegFormer weight layout (keys like {some}; expected HF transformers, NVlabs, "
                     "MiT backbone or this project's keys)")


def convert_state_dict(sd: dict) -> dict:
    """Any supported SegFormer/MiT layout -> this module's keys (classification heads dropped)."""
    layout = detect_layout(sd)
    if layout == "ours":
        return dict(sd)
    out: dict[str, torch.Tensor] = {}
    if layout == "hf":
        kv: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in sd.items():
            k = re.sub(r"^segformer\.", "", _rename(k, _HF_V4_TO_V5))
            if k.startswith("classifier."):
                continue
            k = _rename(k, _HF_V5_TO_OURS)
            m = re.match(r"(.*)\.attention\.(k|v)_proj\.(weight|bias)$", k)
            if m:
                kv.setdefault(f"{m[1]}.attn.kv.{m[3]}", {})[m[2]] = v
                continue
            out[k] = v
        for k, parts in kv.items():
            out[k] = torch.cat([parts["k"], parts["v"]], dim=0)
        return out
    for k, v in sd.items():  # nvlabs / mit imagenet
        if not k.startswith(("backbone.", "decode_head.", "auxiliary_head.")):
            k = "backbone." + k
        if k.startswith(("backbone.head.", "auxiliary_head.")):
            continue
        out[_rename(k, _NVLABS_TO_OURS)] = v
    return out
