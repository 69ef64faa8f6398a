"""3D hand regressor: DINOv2 ViT backbone (timm) + "handec" transformer decoder head (HaMeR-style).

    model = HandRegressor("vit_small_patch14_dinov2", img_size=224)
    feats = model.forward_features(x)          # (B, N, C) patch tokens
    out = model.forward_head(feats, is_right)  # dict: joints (B, 21, 3) root-relative metres, cam (B, 3),
                                                #       pose (B, 16, 3, 3) rotations, betas (B, 10)
    out = model(x, is_right)                    # same

Head: learned query token(s) + a handedness embedding cross-attend to the patch tokens in `depth`
decoder layers (self-attention, cross-attention, MLP; pre-norm; SDPA). Linear decoders add
deltas to an initial state (mean joints / camera set from the training labels, identity pose,
zero betas), `ief_iters` times (iterative error feedback; 1 = direct regression). The state is
kept in the right-hand frame; for left hands the joints are mirrored (x -> -x) at the end, so
a flipped image gives a mirrored skeleton. With a MANO file (`mano_path`) the joints come from
MANO(pose, betas) instead of the direct joint regressor.

Progressive dropout: the training script computes p for each step (train_hand.py, with
lib.schedules); `model.set_dropout(p)` only writes it into every dropout of the head. Layer-wise
lr decay: the model names a layer per parameter (`layer_id(name)`, `num_layers`); lib.optim
builds the groups.

External backbone weights (local files only), converted by `convert_state_dict` (layout
auto-detected): timm `vit_*_patch14_dinov2`, facebookresearch/dinov2 hub `.pth` (`blocks.*`,
chunked `blocks.<chunk>.<i>.*`, `mask_token`, SwiGLU `w12`/`w3`), HF transformers `Dinov2Model`
(v4 names `attention.attention.query`, `mlp.weights_in` and v5 names `attention.q_proj`,
`mlp.gate_proj`); position embeddings are resampled (bicubic, as HF and the hub do) to the
model's grid.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import resample_abs_pos_embed
from torch import nn
from torch.utils.checkpoint import checkpoint

from lib.errors import ModelError
from lib.geometry import axis_angle_to_rotmat, rot6d_to_rotmat  # noqa: F401  (re-exported)

BACKBONES = ("vit_small_patch14_dinov2", "vit_base_patch14_dinov2", "vit_large_patch14_dinov2",
             "vit_giant_patch14_dinov2")
NUM_JOINTS = 21  # wrist, then thumb, index, middle, ring, pinky, each base to tip


# ----------------------------------------------------------------------------- dropout
def set_dropout(module: nn.Module, p: float) -> None:
    """Write p into every nn.Dropout of `module` and into the SDPA `attn_drop` of its attention layers."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(m, Attention):
            m.attn_drop = p


# ----------------------------------------------------------------------------- handec head
class Attention(nn.Module):
    """Multi-head attention of queries x (B, Q, D) over a context (B, N, C) (x itself if None)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.attn_drop = heads, dropout
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x, context=None):
        q = rearrange(self.to_q(x), "b q (h d) -> b h q d", h=self.heads)
        k, v = rearrange(self.to_kv(x if context is None else context), "b n (two h d) -> two b h n d",
                         two=2, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.to_out(rearrange(out, "b h q d -> b q (h d)"))  # (B, Q, D)


class DecoderLayer(nn.Module):
    """Pre-norm: self-attention among queries, cross-attention to the patch tokens, MLP."""

    def __init__(self, dim, context_dim, heads, dim_head, mlp_dim, dropout):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dim_head, dropout=dropout)
        self.cross_attn = Attention(dim, heads, dim_head, context_dim, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, dim), nn.Dropout(dropout))

    def forward(self, x, context):  # (B, Q, D), (B, N, C)
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.mlp(self.norm3(x))


class Handec(nn.Module):
    """Query-token transformer decoder regressing pose / betas / camera / 21 joints."""

    def __init__(self, context_dim: int, dim: int = 1024, depth: int = 6, heads: int = 8, dim_head: int = 64,
                 mlp_dim: int = 1024, dropout: float = 0.0, num_queries: int = 1, ief_iters: int = 1,
                 pose_repr: str = "6d", predict_joints: bool = True):
        super().__init__()
        if pose_repr not in ("6d", "aa"):
            raise ModelError(f"model.handec.pose_repr must be '6d' or 'aa', got {pose_repr!r}")
        self.pose_repr, self.ief_iters, self.predict_joints = pose_repr, ief_iters, predict_joints
        pd = 6 if pose_repr == "6d" else 3
        self.sizes = {"pose": 16 * pd, "betas": 10, "cam": 3} | ({"joints": NUM_JOINTS * 3} if predict_joints else {})
        self.query = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.hand_embed = nn.Embedding(2, dim)  # 0 left, 1 right
        self.state_embed = nn.Linear(sum(self.sizes.values()), dim) if ief_iters > 1 else None
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(DecoderLayer(dim, context_dim, heads, dim_head, mlp_dim, dropout)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.dec = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in self.sizes.items()})
        for lin in self.dec.values():  # small deltas around the initial state (HaMeR: gain 0.01)
            nn.init.xavier_uniform_(lin.weight, gain=0.01)
            nn.init.zeros_(lin.bias)
        pose0 = torch.tensor([1.0, 0, 0, 0, 1, 0]).repeat(16) if pd == 6 else torch.zeros(48)
        self.register_buffer("init_pose", pose0)
        self.register_buffer("init_betas", torch.zeros(10))
        self.register_buffer("init_cam", torch.tensor([2.5, 0.0, 0.0]))  # (s, tx, ty) weak perspective
        self.register_buffer("init_joints", torch.zeros(NUM_JOINTS * 3))  # right-hand frame, metres
        self.grad_checkpointing = False

    def forward(self, context: torch.Tensor, is_right: torch.Tensor) -> dict[str, torch.Tensor]:
        b = context.shape[0]
        state = {k: getattr(self, f"init_{k}").expand(b, -1) for k in self.sizes}  # each (B, n)
        token = self.query[None] + self.hand_embed(is_right.long())[:, None]  # (B, Q, D)
        for _ in range(self.ief_iters):
            x = token
            if self.state_embed is not None:
                x = x + self.state_embed(torch.cat(list(state.values()), -1))[:, None]
            x = self.drop(x)
            for layer in self.layers:
                if self.grad_checkpointing and self.training:
                    x = checkpoint(layer, x, context, use_reentrant=False)
                else:
                    x = layer(x, context)
            x = self.norm(x).mean(1)  # (B, D)
            state = {k: v + self.dec[k](x) for k, v in state.items()}
        pose = state["pose"].reshape(b, 16, -1)
        pose = rot6d_to_rotmat(pose) if self.pose_repr == "6d" else axis_angle_to_rotmat(pose)
        out = {"pose": pose, "betas": state["betas"], "cam": state["cam"]}  # (B,16,3,3), (B,10), (B,3)
        if self.predict_joints:
            out["joints"] = state["joints"].reshape(b, NUM_JOINTS, 3)
        return out


# ----------------------------------------------------------------------------- optional MANO layer
MANO_TIPS = [745, 317, 444, 556, 673]  # thumb, index, middle, ring, pinky fingertip vertices
MANO_TO_OURS = [0, 13, 14, 15, 16, 1, 2, 3, 17, 4, 5, 6, 18, 10, 11, 12, 19, 7, 8, 9, 20]


class ManoLayer(nn.Module):
    """Right-hand MANO (Romero et al. 2017) with linear blend skinning, rotations given as matrices.

    Reads a user-supplied file (.npz, or a .pkl without chumpy objects) with v_template (778, 3),
    shapedirs (778, 3, 10), posedirs (778, 3, 135), J_regressor (16, 778), weights (778, 16),
    kintree_table (2, 16). Pose = absolute rotations (flat-hand mean). Returns 21 joints in our order.
    """

    def __init__(self, path: str | Path):
        super().__init__()
        data = _read_mano(Path(path))
        for k in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights"):
            self.register_buffer(k, torch.as_tensor(np.asarray(data[k], dtype=np.float32)), persistent=False)
        self.parents = [int(p) for p in np.asarray(data["kintree_table"])[0]]
        self.parents[0] = -1

    def forward(self, pose: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
        """pose (B, 16, 3, 3), betas (B, 10) -> joints (B, 21, 3) in metres."""
        b = pose.shape[0]
        v = self.v_template + torch.einsum("vcs,bs->bvc", self.shapedirs[..., :betas.shape[1]], betas)  # (B, 778, 3)
        j = torch.einsum("jv,bvc->bjc", self.J_regressor, v)  # (B, 16, 3)
        eye = torch.eye(3, dtype=pose.dtype, device=pose.device)
        v = v + torch.einsum("vcp,bp->bvc", self.posedirs, (pose[:, 1:] - eye).reshape(b, -1))
        rel = j.clone()
        rel[:, 1:] -= j[:, self.parents[1:]]
        local = torch.cat([torch.cat([pose, rel[..., None]], -1),
                           torch.tensor([0, 0, 0, 1.0], device=pose.device).expand(b, 16, 1, 4)], -2)  # (B,16,4,4)
        world = [local[:, 0]]
        for i in range(1, 16):
            world.append(world[self.parents[i]] @ local[:, i])
        world = torch.stack(world, 1)  # (B, 16, 4, 4)
        joints = world[:, :, :3, 3]  # (B, 16, 3) posed joint positions
        world = world.clone()
        world[:, :, :3, 3] -= (world[:, :, :3, :3] @ j[..., None])[..., 0]  # rest -> posed transforms
        t = torch.einsum("vj,bjxy->bvxy", self.weights, world)  # (B, 778, 4, 4)
        verts = (t[..., :3, :3] @ v[..., None])[..., 0] + t[..., :3, 3]
        return torch.cat([joints, verts[:, MANO_TIPS]], 1)[:, MANO_TO_OURS]  # (B, 21, 3)


def _read_mano(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(f"MANO file not found: {path}")
    try:
        if path.suffix == ".npz":
            data = dict(np.load(path, allow_pickle=False))
        else:
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1")
    except ModuleNotFoundError as e:
        raise ModelError(f"{path} holds {e.name} objects; convert it to .npz (arrays v_template, shapedirs, "
                              "posedirs, J_regressor, weights, kintree_table) where chumpy is installed") from None
    except Exception as e:  # noqa: BLE001 - any read failure is a bad MANO file
        raise ModelError(f"cannot read MANO file {path}: {type(e).__name__}: {e}") from None
    if hasattr(data.get("J_regressor"), "toarray"):  # scipy sparse in the official pkl
        data["J_regressor"] = data["J_regressor"].toarray()
    missing = [k for k in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table")
               if k not in data]
    if missing:
        raise ModelError(f"MANO file {path} lacks {missing}")
    return data


# ----------------------------------------------------------------------------- full model
class HandRegressor(nn.Module):
    head_prefixes = ("head.",)

    def __init__(self, backbone: str = "vit_small_patch14_dinov2", img_size: int = 224, drop_path_rate: float = 0.0,
                 dim: int = 1024, depth: int = 6, heads: int = 8, dim_head: int = 64, mlp_dim: int = 1024,
                 dropout: float = 0.0, num_queries: int = 1, ief_iters: int = 1, pose_repr: str = "6d",
                 mano_path: str = "", backbone_overrides: dict | None = None):
        super().__init__()
        if backbone not in BACKBONES:
            raise ModelError(f"unknown backbone '{backbone}' (choose from {list(BACKBONES)})")
        self.backbone = timm.create_model(backbone, pretrained=False, img_size=img_size, num_classes=0,
                                          drop_path_rate=drop_path_rate, **(backbone_overrides or {}))
        self.mano = ManoLayer(mano_path) if mano_path else None
        self.head = Handec(self.backbone.embed_dim, dim, depth, heads, dim_head, mlp_dim, dropout, num_queries,
                           ief_iters, pose_repr, predict_joints=self.mano is None)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, N, C)
        return self.backbone.forward_features(x)[:, self.backbone.num_prefix_tokens:]

    def forward_head(self, feats: torch.Tensor, is_right: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.head(feats, is_right)
        if self.mano is not None:  # MANO joints relative to the wrist, in the right-hand frame
            j = self.mano(out["pose"], out["betas"])
            out["joints"] = j - j[:, :1]
        sign = torch.where(is_right.bool(), 1.0, -1.0).to(out["joints"].dtype)[:, None]  # (B, 1)
        out["joints"] = out["joints"] * torch.cat([sign, torch.ones_like(sign), torch.ones_like(sign)], 1)[:, None]
        out["cam"] = out["cam"] * torch.cat([torch.ones_like(sign), sign, torch.ones_like(sign)], 1)
        return out

    def forward(self, x: torch.Tensor, is_right: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if is_right is None:
            is_right = torch.ones(x.shape[0], dtype=torch.long, device=x.device)
        return self.forward_head(self.forward_features(x), is_right)

    @torch.no_grad()
    def set_init(self, joints: torch.Tensor | None = None, cam: torch.Tensor | None = None) -> None:
        """Initial state of the regressor: mean right-hand joints (21, 3) and camera (3,) of the training set."""
        if joints is not None and self.head.predict_joints:
            self.head.init_joints.copy_(joints.reshape(-1))
        if cam is not None:
            self.head.init_cam.copy_(cam)

    def set_dropout(self, p: float) -> None:
        set_dropout(self.head, p)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)
        self.head.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"backbone.pos_embed", "backbone.cls_token", "backbone.reg_token", "head.query", "head.hand_embed"}

    @property
    def num_layers(self) -> int:
        """Layer ids of the backbone run 0 (embeddings) .. num_layers (final norm) = depth + 1."""
        return len(self.backbone.blocks) + 1

    def layer_id(self, name: str) -> int:
        """Layer of a backbone parameter for layer-wise lr decay (lib.optim.param_groups): 0 = patch /
        position embeddings and tokens, i + 1 = block i, num_layers = final norm (and anything else)."""
        m = re.match(r"backbone\.blocks\.(\d+)\.", name)
        if m:
            return int(m[1]) + 1
        return 0 if re.match(r"backbone\.(cls_token|reg_token|pos_embed|patch_embed)", name) else self.num_layers


# ----------------------------------------------------------------------------- weight conversion
_HF_TO_TIMM = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),  # v4
    (r"\.attention\.o_proj\.", ".attn.proj."),  # v5
    (r"\.layer_scale(\d)\.lambda1$", r".ls\1.gamma"),
    (r"\.mlp\.weights_in\.", ".mlp.fc1."),  # v4 SwiGLU (gate; up) packed
    (r"\.mlp\.(weights_out|down_proj)\.", ".mlp.fc2."),
    (r"^layernorm\.", "norm."),
]


def detect_layout(sd: dict) -> str:
    keys = list(sd)
    if any(k.startswith(("backbone.blocks.", "head.layers.")) for k in keys):
        return "ours"
    if any(k.startswith(("embeddings.", "dinov2.embeddings.")) for k in keys):
        return "hf"
    if any(k.startswith("blocks.") for k in keys) and "pos_embed" in sd:
        return "timm"  # timm and facebookresearch hub share names (hub: chunks, mask_token, w12/w3)
    raise ModelError("unrecognised DINOv2 weight layout (expected timm, facebookresearch hub, HF transformers "
                          "Dinov2Model or this project's keys)")


def convert_state_dict(sd: dict, model: HandRegressor | None = None) -> dict:
    """Any supported DINOv2 layout -> this module's keys; pos_embed resampled to `model`'s patch grid."""
    layout = detect_layout(sd)
    if layout == "ours":
        return dict(sd)
    if any("register_tokens" in k for k in sd):
        raise ModelError("DINOv2 weights with registers are not supported; use a vit_*_patch14_dinov2 file")
    out: dict[str, torch.Tensor] = {}
    if layout == "hf":
        qkv: dict[str, dict[str, torch.Tensor]] = {}
        gate_up: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in sd.items():
            k = re.sub(r"^dinov2\.", "", k)
            if k.startswith(("classifier.", "embeddings.mask_token")):
                continue
            for pat, rep in _HF_TO_TIMM:
                k = re.sub(pat, rep, k)
            m = re.match(r"(blocks\.\d+)\.attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)$", k)
            if m:
                qkv.setdefault(f"{m[1]}.attn.qkv.{m[3]}", {})[m[2][0]] = v
                continue
            m = re.match(r"(blocks\.\d+)\.mlp\.(gate_proj|up_proj)\.(weight|bias)$", k)
            if m:
                gate_up.setdefault(f"{m[1]}.mlp.fc1.{m[3]}", {})[m[2]] = v
                continue
            out[k] = v
        for k, p in qkv.items():
            out[k] = torch.cat([p["q"], p["k"], p["v"]], 0)
        for k, p in gate_up.items():  # timm GluMlp(gate_last=False): silu(first half) * second half
            out[k] = torch.cat([p["gate_proj"], p["up_proj"]], 0)
    else:
        for k, v in sd.items():
            if k == "mask_token" or k.startswith("head."):
                continue
            k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # hub block chunks: blocks.<chunk>.<i>.
            k = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k))
            out[k] = v
    if model is not None and "pos_embed" in out:
        grid = model.backbone.patch_embed.grid_size
        if out["pos_embed"].shape[1] != grid[0] * grid[1] + 1:
            out["pos_embed"] = resample_abs_pos_embed(out["pos_embed"], list(grid), num_prefix_tokens=1,
                                                      antialias=False)
    return {"backbone." + k: v for k, v in out.items()}

