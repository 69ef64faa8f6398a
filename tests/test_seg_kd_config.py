"""Every key of every per-term KD config changes the loss or is refused; pixel KL leaves out ignored pixels."""

import dataclasses

import pytest
import torch

import train_seg
from lib.config import ConfigError, build_config
from lib.errors import UserError
from lib.losses import seg_kd

ALL_ON = ["kd.kl.weight=1", "kd.cwd.weight=1", "kd.at.weight=1", "kd.sp.weight=1"]
CHANGED = {"weight": 2.5, "temperature": 2.0, "stages": [0, 1]}  # a value != the default for each field


def kd_losses(*overrides):
    cfg = build_config(train_seg.SegConfig, {}, [*ALL_ON, *overrides])
    g = torch.Generator().manual_seed(0)
    logits, t_logits = torch.randn(2, 5, 8, 8, generator=g), torch.randn(2, 5, 8, 8, generator=g)
    shapes = [(16, 16), (8, 8), (4, 4), (2, 2)]
    feats = [torch.randn(2, c, *s, generator=g) for c, s in zip((4, 8, 12, 16), shapes)]
    t_feats = [torch.randn(2, 2 * c, *s, generator=g) for c, s in zip((4, 8, 12, 16), shapes)]
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    valid[:, :16] = False
    return {k: v.item() for k, v in train_seg.distill_losses(cfg.kd, logits, feats, t_logits, t_feats, valid).items()}


def test_each_key_of_each_term_changes_its_loss():
    base = kd_losses()
    assert set(base) == {"loss_kl", "loss_cwd", "loss_at", "loss_sp"} and all(v > 0 for v in base.values())
    kd = train_seg.KDConfig()
    checked = []
    for term in ("kl", "cwd", "at", "sp"):
        for f in dataclasses.fields(getattr(kd, term)):
            value = CHANGED[f.name]
            assert value != getattr(getattr(kd, term), f.name)
            out = kd_losses(f"kd.{term}.{f.name}={value}")
            assert out[f"loss_{term}"] != pytest.approx(base[f"loss_{term}"], rel=1e-6), (term, f.name)
            assert all(out[k] == base[k] for k in base if k != f"loss_{term}"), (term, f.name)
            checked.append(f"{term}.{f.name}")
    assert checked == ["kl.weight", "kl.temperature", "cwd.weight", "cwd.temperature",
                       "at.weight", "at.stages", "sp.weight", "sp.stages"]
    assert kd_losses("kd.kl.weight=2")["loss_kl"] == pytest.approx(2 * base["loss_kl"])
    assert "loss_cwd" not in kd_losses("kd.cwd.weight=0")


@pytest.mark.parametrize("key", ["kd.at.temperature", "kd.sp.temperature", "kd.kl.stages", "kd.cwd.stages"])
def test_keys_a_term_does_not_use_are_refused(key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        build_config(train_seg.SegConfig, {}, [f"{key}=2"])
    section, term, name = key.split(".")
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        build_config(train_seg.SegConfig, {section: {term: {name: 2}}})


@pytest.mark.parametrize("item, message", [
    ("kd.at.stages=[0,4]", r"kd.at.stages\[1\]: 4 is out of range \(must be in \[0, 3\]\)"),
    ("kd.kl.weight=-1", r"kd.kl.weight: -1.0 is out of range"),
    ("kd.cwd.temperature=0", r"kd.cwd.temperature: 0.0 is out of range"),
    ("eval.scales=[1.0,0]", r"eval.scales\[1\]: 0.0 is out of range"),
])
def test_out_of_range_values_are_config_errors(item, message):
    with pytest.raises(ConfigError, match=message):
        build_config(train_seg.SegConfig, {}, [item])


@pytest.mark.parametrize("extra, message", [
    (["kd.sp.weight=1", "kd.sp.stages=[]"], "kd.sp.stages is empty"),
    (["kd.kl.weight=1"], "kd.kl.weight is set but kd.teacher_variant is empty"),
    (["kd.teacher_variant=b1", "kd.teacher_weights=x"], "kd.teacher_variant is set but every kd.*.weight is 0"),
])
def test_kd_settings_that_would_be_ignored_are_refused(tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        train_seg.main(["--config", "configs/seg/sample.yaml", "tracker=none", f"output_dir={tmp_path}", *extra])


def test_pixel_kl_leaves_out_ignored_pixels_at_logit_resolution():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 8, 8, generator=g), torch.randn(2, 5, 8, 8, generator=g)
    label = torch.randint(0, 5, (2, 32, 32), generator=g)  # label resolution = 4 x logit resolution
    label[:, :16] = 255  # top half ignored
    valid = label != 255
    masked = seg_kd.kl_div(s, t, 4.0, valid=valid)
    # nearest downsampling: logit row i sees label row 4i -> logit rows 0..3 are ignored
    assert masked.item() == pytest.approx(seg_kd.kl_div(s[:, :, 4:], t[:, :, 4:], 4.0).item(), rel=1e-6)
    assert masked.item() != pytest.approx(seg_kd.kl_div(s, t, 4.0).item(), rel=1e-3)
    none = torch.zeros_like(valid)
    s.requires_grad_(True)
    zero = seg_kd.kl_div(s, t, 4.0, valid=none)
    assert zero.item() == 0.0
    zero.backward()
    assert s.grad.abs().max().item() == 0.0
