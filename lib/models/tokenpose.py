"""TokenPose / SDPose students: StemNet + keypoint tokens + one transformer run for several cycles.

    model = tokenpose("s-v1")                       # presets: t, s-v1, s-v2 (SDPose, COCO 256x192)
    outs = model(img)                               # list, one dict per cycle run:
    outs[i]["heatmap"]    (B, J, 64, 48)            #   heatmaps from the keypoint tokens of cycle i
    outs[i]["kpt_token"]  (B, J, C)                 #   keypoint tokens after cycle i
    outs[i]["vis_token"]  (B, HW, C)                #   visual (patch) tokens after cycle i
    outs[i]["attn"]       (B, J, J + HW) | None     #   keypoint-query attention of the cycle's last layer
                                                    #   (head-averaged; only with need_attn=True)

Architecture (TokenPose, Li et al. ICCV 2021; SDPose, Chen et al. CVPR 2024):
  StemNet (two stride-2 3x3 convs + 4 bottlenecks, 256 channels, 1/4 resolution)
  -> patch embedding (linear on ph x pw patches of the feature map) + 2D sine position embedding
  -> J learnable keypoint tokens prepended
  -> one transformer (dim 192, 8 heads, MLP ratio 3, pre-norm) run `cycle_num` times with the same
     weights; the full token sequence of cycle i is the input of cycle i+1 ("sine-full": the
     position embedding is added again to the visual tokens before every layer but the first)
  -> heatmap head (LayerNorm, Linear, LayerNorm, Linear to H*W) on each cycle's keypoint tokens.
Training runs all cycles (SDPose distils cycle i+1 into cycle i); evaluation runs `test_cycle`
cycles (default 1, as SDPose) and predicts from the last of them.

Attention goes through F.scaled_dot_product_attention. The keypoint-query attention weights that
importance masking needs (lib/losses/pose.py) are computed explicitly, without gradient, only when
`need_attn=True` and only for the last layer of each cycle.

Preset sizes (params / GMACs of one inference cycle, conv + linear layers, as SDPose reports them):
  t     patch 4x3, depth 6,  3 cycles   4.4M / 1.8     s-v1  patch 4x3, depth 12, 2 cycles  6.6M / 2.4
  s-v2  patch 2x2, depth 12, 2 cycles   6.2M / 4.7     (checked in tests/test_pose_model.py)

External weights: `convert_state_dict` maps SDPose's mmpose checkpoints (`backbone.*` StemNet +
`keypoint_head.tokenpose.transformer_layer1.layers.*`) to this module. (The original TokenPose-T/S
repository scales attention by dim^-0.5 instead of head_dim^-0.5, so its weights do not fit.)
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import trunc_normal_
from torch import nn

PRESETS = {  # SDPose configs (sdpose_{t, s_v1_stemnet, s_v2_stemnet}_coco_256x192.py)
    "t": dict(patch_size=(4, 3), depth=6, cycle_num=3),
    "s-v1": dict(patch_size=(4, 3), depth=12, cycle_num=2),
    "s-v2": dict(patch_size=(2, 2), depth=12, cycle_num=2),
}
COCO_NUM_JOINTS = 17


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if in_ch != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out, 1, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):  # (B, C_in, H, W) -> (B, 4 * planes, H, W)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class StemNet(nn.Module):
    """conv3x3/2 -> conv3x3/2 -> 4 bottlenecks: (B, 3, H, W) -> (B, 256, H/4, W/4)."""

    def __init__(self, width: int = 64, blocks: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(*[Bottleneck(width if i == 0 else width * 4, width) for i in range(blocks)])
        self.out_channels = width * 4

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.layer1(x)


def sine_position_embedding(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR-style 2D sine embedding of an h x w grid, coordinates normalised to (0, 2 pi]: (1, h*w, dim)."""
    y = torch.arange(1, h + 1, dtype=torch.float32)[:, None].expand(h, w) / (h + 1e-6) * 2 * math.pi
    x = torch.arange(1, w + 1, dtype=torch.float32)[None, :].expand(h, w) / (w + 1e-6) * 2 * math.pi
    half = dim // 2
    dim_t = temperature ** (2 * (torch.arange(half) // 2) / half)  # (half,)

    def embed(c):  # (h, w) -> (h, w, half): sin on even, cos on odd channels, interleaved
        p = c[..., None] / dim_t
        return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2)

    return rearrange(torch.cat([embed(y), embed(x)], dim=-1), "h w c -> 1 (h w) c")


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_rows: int = 0):
        """(B, N, C) -> (B, N, C) and, if attn_rows > 0, the head-averaged attention weights of the
        first `attn_rows` queries (B, attn_rows, N), computed explicitly without gradient."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))
        attn = None
        if attn_rows:
            with torch.no_grad():
                logits = q[:, :, :attn_rows].float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
                attn = logits.softmax(dim=-1).mean(dim=1)  # (B, attn_rows, N)
        return out, attn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x, attn_rows: int = 0):
        y, attn = self.attn(self.norm1(x), attn_rows)
        x = x + y
        return x + self.mlp(self.norm2(x)), attn


class TokenPose(nn.Module):
    """TokenPose/SDPose student. Sizes: image (w, h), heatmap = image / 4, patch (ph, pw) on the
    1/4-resolution stem map (SDPose order)."""

    head_prefixes = ("head.",)

    def __init__(self, num_joints: int = COCO_NUM_JOINTS, image_size=(192, 256), patch_size=(4, 3),
                 dim: int = 192, depth: int = 12, heads: int = 8, mlp_ratio: int = 3, cycle_num: int = 2,
                 test_cycle: int = 1, stem_width: int = 64):
        super().__init__()
        if not 1 <= test_cycle <= cycle_num:
            raise ValueError(f"test_cycle {test_cycle} must be in 1..cycle_num ({cycle_num})")
        fw, fh = image_size[0] // 4, image_size[1] // 4  # stem map = heatmap size
        ph, pw = patch_size
        if fh % ph or fw % pw:
            raise ValueError(f"feature map {fh}x{fw} (image {image_size[1]}x{image_size[0]} / 4) "
                             f"is not divisible by patch {ph}x{pw}")
        self.num_joints, self.patch_size, self.heatmap_size = num_joints, (ph, pw), (fh, fw)
        self.cycle_num, self.test_cycle = cycle_num, test_cycle
        self.stem = StemNet(stem_width)
        self.patch_embed = nn.Linear(self.stem.out_channels * ph * pw, dim)
        self.register_buffer("pos_embed", sine_position_embedding(fh // ph, fw // pw, dim), persistent=False)
        self.keypoint_token = nn.Parameter(torch.zeros(1, num_joints, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        hidden = fh * fw // 8
        if dim <= hidden // 2:  # TokenPose's two-layer head when the heatmap is large enough
            self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.LayerNorm(hidden),
                                      nn.Linear(hidden, fh * fw))
        else:
            self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, fh * fw))
        self.apply(_init_weights)
        trunc_normal_(self.keypoint_token, std=0.02)

    # ---- timm-like interface
    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> stem feature map (B, 256, H/4, W/4)."""
        return self.stem(img)

    def embed(self, feat: torch.Tensor) -> torch.Tensor:
        """(B, 256, h, w) -> token sequence (B, J + HW, C): keypoint tokens, then visual tokens."""
        ph, pw = self.patch_size
        x = self.patch_embed(rearrange(feat, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=ph, p2=pw))
        x = x + self.pos_embed.to(x.dtype)
        return torch.cat([self.keypoint_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)

    def run_cycle(self, x: torch.Tensor, need_attn: bool = False):
        """One pass of the shared transformer: (B, N, C) -> (B, N, C), keypoint attention of the last layer."""
        j, attn = self.num_joints, None
        for i, blk in enumerate(self.blocks):
            if i > 0:  # "sine-full": position embedding re-added to the visual tokens before each layer
                x = torch.cat([x[:, :j], x[:, j:] + self.pos_embed.to(x.dtype)], dim=1)
            last = need_attn and i == len(self.blocks) - 1
            x, a = blk(x, attn_rows=j if last else 0)
            attn = a if last else attn
        return x, attn

    def forward_head(self, kpt_token: torch.Tensor) -> torch.Tensor:
        """(B, J, C) -> heatmaps (B, J, H/4, W/4)."""
        h, w = self.heatmap_size
        return rearrange(self.head(kpt_token), "b j (h w) -> b j h w", h=h, w=w)

    def forward(self, img: torch.Tensor, cycles: int | None = None, need_attn: bool = False) -> list[dict]:
        """Run `cycles` cycles (default: cycle_num when training, test_cycle in eval mode); one dict per cycle."""
        cycles = cycles or (self.cycle_num if self.training else self.test_cycle)
        x = self.embed(self.forward_features(img))
        outs = []
        for _ in range(cycles):
            x, attn = self.run_cycle(x, need_attn)
            kpt, vis = x[:, :self.num_joints], x[:, self.num_joints:]
            outs.append({"heatmap": self.forward_head(kpt), "kpt_token": kpt, "vis_token": vis, "attn": attn})
        return outs

    def no_weight_decay(self) -> set[str]:
        return {"keypoint_token"}


def _init_weights(m: nn.Module) -> None:  # TokenPose init: trunc-normal linears, kaiming convs
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def tokenpose(name: str = "s-v1", **overrides) -> TokenPose:
    """A preset (t, s-v1, s-v2) with keyword overrides (e.g. cycle_num=3, image_size=(96, 128))."""
    key = name.lower().replace("_", "-")
    if key not in PRESETS:
        raise ValueError(f"unknown TokenPose preset '{name}' (choose from {list(PRESETS)})")
    return TokenPose(**{**PRESETS[key], **{k: v for k, v in overrides.items() if v is not None}})


# ----------------------------------------------------------------------------- weight conversion
_SDPOSE_TO_OURS = [  # SDPose (mmpose 0.x TopDown + SDPoseHead) key names -> ours
    (r"^module\.", ""),
    (r"^backbone\.", "stem."),
    (r"^keypoint_head\.tokenpose\.", ""),
    (r"^patch_to_embedding\.", "patch_embed."),
    (r"^mlp_head\.", "head."),
    (r"^transformer_layer1\.layers\.(\d+)\.0\.fn\.norm\.", r"blocks.\1.norm1."),
    (r"^transformer_layer1\.layers\.(\d+)\.0\.fn\.fn\.to_qkv\.", r"blocks.\1.attn.qkv."),
    (r"^transformer_layer1\.layers\.(\d+)\.0\.fn\.fn\.to_out\.0\.", r"blocks.\1.attn.proj."),
    (r"^transformer_layer1\.layers\.(\d+)\.1\.fn\.norm\.", r"blocks.\1.norm2."),
    (r"^transformer_layer1\.layers\.(\d+)\.1\.fn\.fn\.net\.0\.", r"blocks.\1.mlp.0."),
    (r"^transformer_layer1\.layers\.(\d+)\.1\.fn\.fn\.net\.3\.", r"blocks.\1.mlp.2."),
]


def convert_state_dict(sd: dict) -> dict:
    """SDPose checkpoint -> this module's keys (its fixed sine `pos_embedding` is dropped: a buffer here)."""
    if any(k.startswith("blocks.") for k in sd):
        return dict(sd)
    out = {}
    for k, v in sd.items():
        for pat, rep in _SDPOSE_TO_OURS:
            k = re.sub(pat, rep, k)
        if k.endswith("pos_embedding") or k.endswith("num_batches_tracked"):
            continue
        out[k] = v
    return out
