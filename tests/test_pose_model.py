"""TokenPose/SDPose model: preset sizes, shared-weight cycles, attention weights, SDPose key mapping."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lib.models.tokenpose import Attention, convert_state_dict, sine_position_embedding, tokenpose

# SDPose paper / model zoo: params, GFLOPs (mmcv get_flops: multiply-accumulates of conv and linear
# layers, one inference cycle, 256x192 input)
SDPOSE_SIZES = {"t": (4.4e6, 1.8e9), "s-v1": (6.6e6, 2.4e9), "s-v2": (6.2e6, 4.7e9)}


def tiny(**kw):
    return tokenpose("t", image_size=(48, 64), patch_size=(4, 4), dim=32, heads=2, depth=2, cycle_num=3, **kw)


@pytest.mark.parametrize("name", ["t", "s-v1", "s-v2"])
def test_preset_params_and_flops_match_sdpose(name):
    params, gflops = SDPOSE_SIZES[name]
    model = tokenpose(name).eval()
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / params - 1) < 0.05, n
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        outs = model(torch.randn(1, 3, 256, 192))
    assert len(outs) == 1 and outs[0]["heatmap"].shape == (1, 17, 64, 48)
    counts = fc.get_flop_counts()["Global"]
    macs = sum(v for op, v in counts.items() if str(op).split(".")[1] in ("convolution", "addmm", "mm")) / 2
    assert abs(macs / gflops - 1) < 0.05, macs


def test_cycles_share_weights_and_chain_tokens():
    torch.manual_seed(0)
    m2, m3 = tiny(), tokenpose("t", image_size=(48, 64), patch_size=(4, 4), dim=32, heads=2, depth=2, cycle_num=2)
    assert sum(p.numel() for p in m2.parameters()) == sum(p.numel() for p in m3.parameters())
    model = m2.eval()
    x = torch.randn(2, 3, 64, 48)
    outs = model(x, cycles=3)
    assert len(outs) == 3 and len(model(x)) == 1  # eval: test_cycle = 1
    tokens = model.embed(model.forward_features(x))
    for o in outs:  # cycle i+1 starts from the full token sequence of cycle i
        tokens, _ = model.run_cycle(tokens)
        torch.testing.assert_close(o["heatmap"], model.forward_head(tokens[:, :17]))
        torch.testing.assert_close(o["vis_token"], tokens[:, 17:])
    assert not torch.allclose(outs[0]["heatmap"], outs[1]["heatmap"])
    model.train()
    assert len(model(x)) == 3 and tokenpose("t", test_cycle=2).test_cycle == 2


def test_explicit_attention_weights_reproduce_sdpa():
    torch.manual_seed(0)
    attn = Attention(dim=16, heads=1)
    with torch.no_grad():  # identity output projection: the output is attention @ values
        attn.proj.weight.copy_(torch.eye(16))
        attn.proj.bias.zero_()
    x = torch.randn(2, 10, 16)
    out, weights = attn(x, attn_rows=4)
    assert weights.shape == (2, 4, 10) and not weights.requires_grad
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4))
    v = x @ attn.qkv.weight[32:].T
    torch.testing.assert_close(weights @ v, out[:, :4], atol=1e-5, rtol=1e-5)


def test_need_attn_does_not_change_outputs():
    torch.manual_seed(0)
    model = tiny().train()
    x = torch.randn(2, 3, 64, 48)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    b = model(x, need_attn=True)
    for oa, ob in zip(a, b):
        torch.testing.assert_close(oa["heatmap"], ob["heatmap"])
        assert oa["attn"] is None and ob["attn"].shape == (2, 17, 17 + 12)  # 16x12 map, 4x4 patches


def test_sine_position_embedding_values():
    pe = sine_position_embedding(2, 3, 8)  # (1, 6, 8): y half then x half, sin/cos interleaved
    assert pe.shape == (1, 6, 8)
    y1, x1 = 1 / 2 * 2 * torch.pi, 1 / 3 * 2 * torch.pi  # first row / column, normalised to 2 pi
    dim_t = 10000 ** (torch.tensor([0, 0, 2, 2]) / 4)
    expect_y = [torch.sin(y1 / dim_t[0]), torch.cos(y1 / dim_t[1]), torch.sin(y1 / dim_t[2]), torch.cos(y1 / dim_t[3])]
    torch.testing.assert_close(pe[0, 0, :4], torch.stack(expect_y), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pe[0, 0, 4], torch.sin(torch.tensor(x1)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pe[0, 3, 4:], pe[0, 0, 4:])  # same column, same x half


_OURS_TO_SDPOSE = [  # SDPose's module names (distilpose/models/heads/utils/tokenbase.py, StemNet backbone)
    (r"^stem\.", "backbone."),
    (r"^keypoint_token$", "keypoint_head.tokenpose.keypoint_token"),
    (r"^patch_embed\.", "keypoint_head.tokenpose.patch_to_embedding."),
    (r"^head\.", "keypoint_head.tokenpose.mlp_head."),
    (r"^blocks\.(\d+)\.norm1\.", r"keypoint_head.tokenpose.transformer_layer1.layers.\1.0.fn.norm."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"keypoint_head.tokenpose.transformer_layer1.layers.\1.0.fn.fn.to_qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"keypoint_head.tokenpose.transformer_layer1.layers.\1.0.fn.fn.to_out.0."),
    (r"^blocks\.(\d+)\.norm2\.", r"keypoint_head.tokenpose.transformer_layer1.layers.\1.1.fn.norm."),
    (r"^blocks\.(\d+)\.mlp\.0\.", r"keypoint_head.tokenpose.transformer_layer1.layers.\1.1.fn.fn.net.0."),
    (r"^blocks\.(\d+)\.mlp\.2\.", r"keypoint_head.tokenpose.transformer_layer1.layers.\1.1.fn.fn.net.3."),
]


def test_convert_sdpose_checkpoint_layout():
    torch.manual_seed(0)
    src = tiny().eval()
    sd = {}
    for k, v in src.state_dict().items():
        for pat, rep in _OURS_TO_SDPOSE:
            k = re.sub(pat, rep, k)
        sd[k] = v
    sd["keypoint_head.tokenpose.pos_embedding"] = src.pos_embed.clone()
    assert all(k.startswith(("backbone.", "keypoint_head.tokenpose.")) for k in sd)
    dst = tiny().eval()
    missing, unexpected = dst.load_state_dict(convert_state_dict(sd), strict=True)
    assert not missing and not unexpected
    x = torch.randn(1, 3, 64, 48)
    torch.testing.assert_close(dst(x)[0]["heatmap"], src(x)[0]["heatmap"])


def test_bad_sizes_are_errors():
    with pytest.raises(ValueError, match="divisible"):
        tokenpose("s-v1", image_size=(190, 256))
    with pytest.raises(ValueError, match="preset"):
        tokenpose("xl")
    with pytest.raises(ValueError, match="test_cycle"):
        tokenpose("s-v1", test_cycle=3)


def test_overfit_few_crops_loss_drops():
    """A tiny model fits the heatmaps of 4 sample crops well below the predict-zeros loss."""
    from lib.data.coco import CocoPoseDataset, PoseDataConfig
    from lib.losses.pose import joints_mse

    ds = CocoPoseDataset(PoseDataConfig(root="tests/data/pose", image_size=(64, 96)), "train", train=False)
    batch = [ds[i] for i in range(4)]
    img = torch.stack([b["image"] for b in batch])
    target, weight = torch.stack([b["target"] for b in batch]), torch.stack([b["target_weight"] for b in batch])
    zeros_loss = 2 * joints_mse(torch.zeros_like(target), target, weight).item()  # 2 cycles predicting 0
    torch.manual_seed(0)
    model = tokenpose("t", image_size=(64, 96), patch_size=(4, 4), dim=64, heads=4, depth=2, cycle_num=2,
                      stem_width=16).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = sum(joints_mse(o["heatmap"], target, weight) for o in model(img))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0] and losses[-1] < 0.5 * zeros_loss, (losses[0], losses[-1], zeros_loss)
