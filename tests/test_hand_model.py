"""Hand regressor: DINOv2 key mapping (HF transformers v4/v5, facebookresearch hub) against the
reference models built with random init, lr groups, checkpointing, MANO layer, handedness."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2Model

from lib.checkpoint import load_weights
from lib.config import OptimConfig
from lib.errors import ModelError, UserError
from lib.geometry import axis_angle_to_rotmat, rot6d_to_rotmat
from lib.models.hand import MANO_TIPS, MANO_TO_OURS, HandRegressor, ManoLayer, convert_state_dict
from lib.optim import param_groups
from tests.conftest import ROOT

SMALL = dict(embed_dim=48, depth=2, num_heads=3)
HEAD = dict(dim=32, depth=1, heads=2, dim_head=16, mlp_dim=32)


def _hf(swiglu: bool) -> Dinov2Model:
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, image_size=56, patch_size=14,
                       use_swiglu_ffn=swiglu, layerscale_value=0.5)
    hf = Dinov2Model(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    return hf


def _ours(swiglu: bool, img_size: int) -> HandRegressor:
    name = "vit_giant_patch14_dinov2" if swiglu else "vit_small_patch14_dinov2"
    return HandRegressor(name, img_size=img_size, backbone_overrides=SMALL, **HEAD).eval()


def _to_hf_v4(sd: dict) -> dict:
    """transformers v5 key names -> the v4 names of files saved before the rename."""
    out = {}
    for k, v in sd.items():
        k = k.replace("attention.q_proj", "attention.attention.query").replace(
            "attention.k_proj", "attention.attention.key").replace("attention.v_proj", "attention.attention.value")
        k = k.replace("attention.o_proj", "attention.output.dense").replace("mlp.down_proj", "mlp.weights_out")
        if "mlp.up_proj" in k:
            continue
        if "mlp.gate_proj" in k:
            v = torch.cat([v, sd[k.replace("gate_proj", "up_proj")]], 0)
            k = k.replace("gate_proj", "weights_in")
        out[k] = v
    return out


@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("version", ["v5", "v4"])
def test_hf_dinov2_converted_matches_reference(swiglu, version):
    hf = _hf(swiglu)
    sd = hf.state_dict() if version == "v5" else _to_hf_v4(hf.state_dict())
    for img_size in (56, 84):  # same grid as HF's position table, and a resampled one (HF interpolates)
        ours = _ours(swiglu, img_size)
        missing, unexpected = ours.load_state_dict(convert_state_dict(sd, ours), strict=False)
        assert not unexpected and not [k for k in missing if k.startswith("backbone.")]
        x = torch.randn(2, 3, img_size, img_size)
        with torch.no_grad():
            ref = hf(pixel_values=x).last_hidden_state  # (B, 1 + N, C)
            out = ours.backbone.forward_features(x)
            feats = ours.forward_features(x)
        assert (ref - out).abs().max().item() < 1e-4
        assert torch.equal(feats, out[:, 1:]) and feats.shape == (2, (img_size // 14) ** 2, 48)


@pytest.mark.parametrize("swiglu", [False, True])
def test_hub_layout_round_trip(swiglu, tmp_path):
    """facebookresearch/dinov2 names: chunked blocks, mask_token, SwiGLU w12 / w3."""
    torch.manual_seed(0)
    src = _ours(swiglu, 56)
    hub = {"mask_token": torch.zeros(1, 48)}
    for k, v in src.backbone.state_dict().items():
        k = re.sub(r"^blocks\.(\d+)\.", r"blocks.\1.\1.", k)  # chunks of 1 block: blocks.<chunk>.<i>.
        hub[k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3") if swiglu else k] = v
    assert any(k.startswith("blocks.1.1.") for k in hub)
    save_file(hub, str(tmp_path / "hub.safetensors"))
    dst = _ours(swiglu, 56)
    load_weights(dst, tmp_path / "hub.safetensors", lambda sd: convert_state_dict(sd, dst), log=lambda m: None)
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(dst.backbone.state_dict()[k], v), k


def test_unknown_layout_is_a_one_line_user_error(tmp_path):
    with pytest.raises(ModelError, match="unrecognised DINOv2 weight layout"):
        convert_state_dict({"foo.weight": torch.zeros(3)})
    save_file({"foo.weight": torch.zeros(3)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(UserError, match="x.safetensors: unrecognised DINOv2 weight layout"):
        load_weights(_ours(False, 28), tmp_path / "x.safetensors", convert_state_dict)


def _layer_decay_groups(model, cfg, layer_decay):
    return param_groups(model, cfg, model.head_prefixes, layer_id=model.layer_id, layer_decay=layer_decay,
                        num_layers=model.num_layers)


def test_layer_decay_groups_lrs():
    """lib.optim.param_groups with the model's layer ids (the model file holds no optimizer code)."""
    model = _ours(False, 28)
    cfg = OptimConfig(lr=1.0, head_lr_mult=1.0, backbone_lr_mult=0.1)
    groups = _layer_decay_groups(model, cfg, layer_decay=0.5)
    lr_of = {}
    for g in groups:
        for p in g["params"]:
            lr_of[id(p)] = g["lr"]
    named = dict(model.named_parameters())
    # depth 2: embeddings layer 0 -> 0.1 * 0.5^3, block 0 -> 0.5^2, block 1 -> 0.5, final norm -> 1, head 1.0
    assert lr_of[id(named["backbone.patch_embed.proj.weight"])] == pytest.approx(0.1 * 0.125)
    assert lr_of[id(named["backbone.blocks.0.attn.qkv.weight"])] == pytest.approx(0.1 * 0.25)
    assert lr_of[id(named["backbone.blocks.1.mlp.fc1.weight"])] == pytest.approx(0.1 * 0.5)
    assert lr_of[id(named["backbone.norm.weight"])] == pytest.approx(0.1)
    assert lr_of[id(named["head.dec.joints.weight"])] == pytest.approx(1.0)
    assert len(lr_of) == sum(1 for p in model.parameters() if p.requires_grad)  # every param exactly once
    assert len(_layer_decay_groups(model, cfg, 1.0)) == 4  # off: lib.optim.param_groups unchanged
    plain = param_groups(model, cfg, model.head_prefixes)
    assert [(g["name"], g["lr"], len(g["params"])) for g in plain] == \
        [(g["name"], g["lr"], len(g["params"])) for g in _layer_decay_groups(model, cfg, 1.0)]
    assert model.num_layers == 3 and model.layer_id("backbone.cls_token") == 0


def test_model_file_imports_no_training_code():
    src = (ROOT / "lib" / "models" / "hand.py").read_text()
    assert not re.search(r"^from lib\.(optim|schedules|config|checkpoint|losses)", src, re.M)
    assert "import lib.models" not in (ROOT / "lib" / "losses" / "hand.py").read_text()
    assert "lib.models" not in (ROOT / "lib" / "losses" / "hand.py").read_text()


def test_grad_checkpointing_same_output_and_grads():
    torch.manual_seed(0)
    model = _ours(False, 28).train()
    x, right = torch.randn(2, 3, 28, 28), torch.tensor([1, 0])
    out = model(x, right)["joints"].sum()
    out.backward()
    g = model.backbone.blocks[0].attn.qkv.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out2 = model(x, right)["joints"].sum()
    out2.backward()
    assert torch.allclose(out, out2, atol=1e-6)
    assert torch.allclose(g, model.backbone.blocks[0].attn.qkv.weight.grad, atol=1e-6)


def test_left_hand_output_is_mirrored_right_hand():
    torch.manual_seed(0)
    model = _ours(False, 28)
    model.set_init(joints=torch.randn(21, 3) * 0.05, cam=torch.tensor([3.0, 0.1, 0.2]))
    with torch.no_grad():
        model.head.hand_embed.weight.zero_()  # same image evidence for both sides
        x = torch.randn(1, 3, 28, 28).repeat(2, 1, 1, 1)
        out = model(x, torch.tensor([1, 0]))
    j, cam = out["joints"], out["cam"]
    assert torch.allclose(j[1], j[0] * torch.tensor([-1.0, 1.0, 1.0]), atol=1e-6)
    assert torch.allclose(cam[1], cam[0] * torch.tensor([1.0, -1.0, 1.0]), atol=1e-6)
    assert torch.allclose(model.head.init_cam, torch.tensor([3.0, 0.1, 0.2]))


def test_rotation_helpers():
    aa = torch.tensor([[0.0, 0.0, np.pi / 2]])
    r = axis_angle_to_rotmat(aa)[0]
    assert torch.allclose(r @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    six = torch.tensor([[2.0, 0.0, 0.0, 0.5, 3.0, 0.0]])  # columns (x, y) not orthonormal
    assert torch.allclose(rot6d_to_rotmat(six)[0], torch.eye(3), atol=1e-6)


def _fake_mano(path, seed=0):
    rng = np.random.default_rng(seed)
    parents = [-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14]
    w = rng.random((778, 16))
    np.savez(path, v_template=rng.normal(0, 0.05, (778, 3)), shapedirs=rng.normal(0, 0.01, (778, 3, 10)),
             posedirs=rng.normal(0, 0.001, (778, 3, 135)), J_regressor=rng.dirichlet(np.ones(778), 16),
             weights=w / w.sum(1, keepdims=True), kintree_table=np.array([[4294967295] + parents[1:], list(range(16))]))
    return path


def test_mano_layer_rest_pose_and_global_rotation(tmp_path):
    mano = ManoLayer(_fake_mano(tmp_path / "mano.npz"))
    data = np.load(tmp_path / "mano.npz")
    eye = torch.eye(3).expand(1, 16, 3, 3)
    j = mano(eye, torch.zeros(1, 10))[0].double()
    rest = np.concatenate([data["J_regressor"] @ data["v_template"], data["v_template"][MANO_TIPS]])[MANO_TO_OURS]
    assert np.abs(j.numpy() - rest).max() < 1e-5  # identity pose, zero betas: the template's joints
    rot = axis_angle_to_rotmat(torch.tensor([0.3, -0.5, 0.8]))
    pose = eye.clone()
    pose[:, 0] = rot
    jr = mano(pose, torch.zeros(1, 10))[0]
    assert torch.allclose(jr - jr[:1], (j - j[:1]).float() @ rot.T, atol=1e-5)  # rotation about the wrist


def test_model_with_mano_takes_joints_from_mano(tmp_path):
    model = HandRegressor("vit_small_patch14_dinov2", img_size=28, backbone_overrides=SMALL,
                          mano_path=str(_fake_mano(tmp_path / "m.npz")), **HEAD)
    assert "joints" not in model.head.dec
    out = model(torch.randn(2, 3, 28, 28), torch.tensor([1, 1]))
    assert out["joints"].shape == (2, 21, 3) and out["joints"][:, 0].abs().max() == 0  # wrist-relative
    with pytest.raises(ModelError, match="MANO file not found"):
        ManoLayer(tmp_path / "missing.pkl")
