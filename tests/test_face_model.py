"""Face backbones: parameter counts vs timm / hand formulas, timm-layout weights, budget, 112/224 inputs."""

from pathlib import Path

import pytest
import timm
import torch

from lib.config import load_yaml
from lib.losses.face import FaceLossConfig, build_heads
from lib.models.face import (FaceModelConfig, FaceNet, check_budget, convert_state_dict, count_params,
                              load_backbone)
from lib.errors import ModelError
from tests.conftest import ROOT


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def basic_resnet_count(chs, depths, stem_k=7):
    """Hand formula: stem conv + BN, then per block two 3x3 convs + 2 BNs (+ 1x1 conv + BN downsample)."""
    n = 3 * stem_k * stem_k * chs[0] + 2 * chs[0]
    cin = chs[0]
    for c, d in zip(chs, depths):
        for j in range(d):
            i = cin if j == 0 else c
            n += 9 * i * c + 9 * c * c + 4 * c
            if i != c:
                n += i * c + 2 * c
        cin = c
    return n


@pytest.mark.parametrize("backbone, attn, timm_name, timm_kw, known", [
    ("resnet18", "", "resnet18", {}, 11_176_512),
    ("resnet34", "", "resnet34", {}, 21_284_672),
    ("resnet18", "se", "seresnet18", {}, 11_266_624),
    ("resnet18", "cbam", "resnet18", {"block_args": {"attn_layer": "cbam"}}, 11_264_352),
    ("resnet50", "", "resnet50", {}, 23_508_032),  # Bottleneck blocks
    ("resnet50", "se", "seresnet50", {}, 26_039_024),
    ("resnet50", "cbam", "resnet50", {"block_args": {"attn_layer": "cbam"}}, 26_024_576),
])
def test_resnet_matches_timm_count_and_outputs(backbone, attn, timm_name, timm_kw, known):
    ref = timm.create_model(timm_name, num_classes=0, **timm_kw).eval()
    model = FaceNet(FaceModelConfig(backbone=backbone, attn=attn, embed_dim=512)).eval()
    assert n_params(ref) == known
    assert n_params(model.backbone) == known
    # a timm-layout file (with its classifier) loads into our keys and gives the same features
    sd = ref.state_dict() | {"fc.weight": torch.randn(10, 512), "fc.bias": torch.randn(10)}
    missing, unexpected = model.load_state_dict(convert_state_dict(sd), strict=False)
    assert unexpected == [] and all(k.startswith("embed.") for k in missing)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), ref.forward_features(x), atol=1e-5)
        assert torch.allclose(model.backbone.forward_head(model.forward_features(x)), ref(x), atol=1e-5)


def test_load_backbone_from_timm_pth_file(tmp_path):
    ref = timm.create_model("resnet18", num_classes=1000).eval()
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "resnet18.pth")
    model = FaceNet(FaceModelConfig(backbone="resnet18")).eval()
    msgs = []
    load_backbone(model, str(tmp_path / "resnet18.pth"), log=msgs.append)
    n = len(ref.state_dict()) - 2  # all but fc.weight, fc.bias
    assert msgs[0].startswith(f"loaded {n} tensors") and "missing" not in msgs[0]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), ref.forward_features(x), atol=1e-5)


def test_width_multiplier_and_stem_counts():
    m = FaceNet(FaceModelConfig(backbone="resnet34", width=0.72, embed_dim=512))
    chs = [46, 92, 184, 369]  # round(0.72 * [64, 128, 256, 512])
    assert n_params(m.backbone) == basic_resnet_count(chs, (3, 4, 6, 3))
    assert count_params(m)["without_head"] == basic_resnet_count(chs, (3, 4, 6, 3)) + 369 * 512 + 2 * 512
    m2 = FaceNet(FaceModelConfig(backbone="resnet18", width=0.5, stem_stride=2))
    assert n_params(m2.backbone) == basic_resnet_count([32, 64, 128, 256], (2, 2, 2, 2), stem_k=3)
    assert m2.forward_features(torch.randn(1, 3, 112, 112)).shape == (1, 256, 7, 7)  # 112 / 16


@pytest.mark.parametrize("name, known, feat", [
    ("efficientnet_b0", 4_007_548, 1280),
    ("mobilenetv2_100", 2_223_872, 1280),
    ("tiny_vit_11m_224", 10_547_972, 448),
])
def test_timm_backbones_count_embed_and_both_sizes(name, known, feat):
    heads = build_heads(FaceLossConfig(terms=["arcface"]), 256, 100)
    m = FaceNet(FaceModelConfig(backbone=name, embed_dim=256), heads).eval()
    c = count_params(m)
    assert n_params(m.backbone) == known
    assert c["without_head"] == known + feat * 256 + 2 * 256
    assert c["head"] == 100 * 256 and c["total"] == c["without_head"] + c["head"]
    with torch.no_grad():
        for s in (112, 224) if name == "tiny_vit_11m_224" else (112,):  # TinyViT: windows padded at 112
            assert m(torch.randn(1, 3, s, s)).shape == (1, 256)


def test_budget_check_fires_and_grid_configs_fit():
    big = count_params(FaceNet(FaceModelConfig(backbone="resnet34", embed_dim=512)))
    with pytest.raises(ModelError, match="over the budget model.max_params=11,500,000"):
        check_budget(big, 11_500_000)
    check_budget(big, 0)  # 0 = no budget
    se512 = count_params(FaceNet(FaceModelConfig(backbone="resnet18", attn="se", embed_dim=512)))
    assert se512["without_head"] == 11_266_624 + 512 * 512 + 1024 > 11_500_000  # hence 256-d in its config
    for name in ["resnet18_arcface", "resnet34_w0.72_arcface", "se_resnet18_cosface", "tinyvit11m_arcface",
                 "effnetb0_softmax", "mobilenetv2_triplet", "lfw"]:
        mc = load_yaml(ROOT / "configs" / "face" / f"{name}.yaml")["model"]
        cfg = FaceModelConfig(**mc)
        n = count_params(FaceNet(cfg))["without_head"]
        assert 0 < n <= cfg.max_params == 11_500_000, (name, n)


def test_frozen_stages_and_head_prefix():
    m = FaceNet(FaceModelConfig(backbone="resnet18", width=0.25, frozen_stages=2),
                build_heads(FaceLossConfig(terms=["softmax", "cosface"]), 512, 7))
    m.train()
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1", "backbone.layer2"))
                          for n in frozen)
    assert not m.backbone.layer1[0].bn1.training and m.backbone.layer3[0].bn1.training
    assert count_params(m)["head"] == 7 * 512 + 7 + 7 * 512  # softmax (weight + bias) + cosface weight
    emb, logits = m(torch.randn(2, 3, 64, 64), torch.tensor([0, 3]))
    assert emb.shape == (2, 512) and set(logits) == {"softmax", "cosface"} and logits["cosface"].shape == (2, 7)


def test_unknown_backbone_is_a_user_error():
    with pytest.raises(ModelError, match="model.backbone"):
        FaceNet(FaceModelConfig(backbone="no_such_net"))
    with pytest.raises(ModelError, match="resnet18/resnet34/resnet50/resnet101 only"):
        FaceNet(FaceModelConfig(backbone="mobilenetv2_100", attn="se"))
    with pytest.raises(ModelError, match="model.timm_kwargs apply to timm backbones"):
        FaceNet(FaceModelConfig(backbone="resnet50", timm_kwargs={"channel_multiplier": 0.5}))
    with pytest.raises(ModelError, match="model.timm_kwargs .*no_such_kwarg"):
        FaceNet(FaceModelConfig(backbone="mobilenetv2_100", timm_kwargs={"no_such_kwarg": 1}))


def bottleneck_resnet_count(planes, depths):
    """Hand formula: 7x7 stem + BN, then per block 1x1, 3x3, 1x1 (x4) convs + 3 BNs (+ 1x1 conv + BN shortcut)."""
    n = 3 * 49 * planes[0] + 2 * planes[0]
    cin = planes[0]
    for c, d in zip(planes, depths):
        for j in range(d):
            i = cin if j == 0 else 4 * c
            n += i * c + 9 * c * c + c * 4 * c + 2 * c + 2 * c + 8 * c
            if i != 4 * c:
                n += i * 4 * c + 8 * c
        cin = 4 * c
    return n


def test_bottleneck_resnet_width_multiplier_and_budget():
    m = FaceNet(FaceModelConfig(backbone="resnet50", width=0.5, embed_dim=256))
    planes = [32, 64, 128, 256]  # round(0.5 * [64, 128, 256, 512]), x4 out of each block
    assert m.backbone.num_features == 1024
    assert n_params(m.backbone) == bottleneck_resnet_count(planes, (3, 4, 6, 3))
    assert bottleneck_resnet_count([64, 128, 256, 512], (3, 4, 6, 3)) == 23_508_032  # the formula at width 1 = timm
    assert count_params(m)["without_head"] == n_params(m.backbone) + 1024 * 256 + 2 * 256 < 11_500_000
    assert m(torch.randn(2, 3, 112, 112)).shape == (2, 256)
    se = FaceNet(FaceModelConfig(backbone="resnet50", width=0.5, attn="se"))
    assert n_params(se.backbone) > n_params(m.backbone)


def test_efficientnet_width_multiplier_through_timm_kwargs():
    # timm's registered efficientnet_b2 is B0's blocks at channel 1.1 x depth 1.2: the same network
    b2 = FaceNet(FaceModelConfig(backbone="efficientnet_b0",
                                 timm_kwargs={"channel_multiplier": 1.1, "depth_multiplier": 1.2}))
    assert n_params(b2.backbone) == n_params(timm.create_model("efficientnet_b2", num_classes=0)) == 7_700_994
    slim = FaceNet(FaceModelConfig(backbone="efficientnet_b0", timm_kwargs={"channel_multiplier": 0.75}))
    assert n_params(slim.backbone) == 2_371_440 < 4_007_548  # B0 at width 0.75 < B0
    assert slim.backbone.num_features == 960  # the 1280-channel head conv is scaled too
    other = FaceNet(FaceModelConfig(backbone="mobilenetv2_100", timm_kwargs={"drop_rate": 0.3}))  # plain pass-through
    assert other.backbone.drop_rate == 0.3
