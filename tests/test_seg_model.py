import re

import pytest
import torch

from lib.checkpoint import WeightFileError, load_weights
from lib.errors import ModelError
from lib.models.segformer import SegFormer, convert_state_dict

transformers = pytest.importorskip("transformers")


def _hf(num_labels=19, **kw):
    cfg = transformers.SegformerConfig(num_labels=num_labels, **kw)
    torch.manual_seed(0)
    return transformers.SegformerForSemanticSegmentation(cfg).eval()


def test_param_counts():
    assert sum(p.numel() for p in SegFormer("b0", 19).parameters()) / 1e6 == pytest.approx(3.7, abs=0.05)
    assert sum(p.numel() for p in SegFormer("b2", 19).parameters()) / 1e6 == pytest.approx(27.4, abs=0.1)


def test_hf_transformers_equivalence():
    hf = _hf()
    with torch.no_grad():  # non-trivial BN statistics
        hf.decode_head.batch_norm.running_mean.normal_()
        hf.decode_head.batch_norm.running_var.uniform_(0.5, 2)
    ours = SegFormer("b0", 19, ln_eps=1e-5).eval()  # HF LayerNorms use torch's default eps
    ours.load_state_dict(convert_state_dict(hf.state_dict()), strict=True)
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        ref, out = hf(pixel_values=x).logits, ours(x)
    assert out.shape == ref.shape == (2, 19, 32, 24)
    assert (out - ref).abs().max().item() < 1e-4


def test_hf_v4_file_names_map_too():
    """Files saved by transformers 4.x use encoder.block.* / attention.self.query names."""
    hf = _hf()
    v5_to_v4 = [(r"stages\.(\d+)\.patch_embeddings\.", r"encoder.patch_embeddings.\1."),
                (r"stages\.(\d+)\.blocks\.", r"encoder.block.\1."), (r"stages\.(\d+)\.layer_norm", r"encoder.layer_norm.\1"),
                (r"attention\.q_proj", "attention.self.query"), (r"attention\.k_proj", "attention.self.key"),
                (r"attention\.v_proj", "attention.self.value"), (r"attention\.o_proj", "attention.output.dense"),
                (r"attention\.sequence_reduction\.sequence_reduction", "attention.self.sr"),
                (r"attention\.sequence_reduction\.layer_norm", "attention.self.layer_norm"),
                (r"mlp\.fc1", "mlp.dense1"), (r"mlp\.fc2", "mlp.dense2"), ("layernorm_before", "layer_norm_1"),
                ("layernorm_after", "layer_norm_2"), (r"decode_head\.linear_projections\.", "decode_head.linear_c.")]
    v4 = {}
    for k, v in hf.state_dict().items():
        for a, b in v5_to_v4:
            k = re.sub(a, b, k)
        v4[k] = v
    assert "segformer.encoder.block.0.0.attention.self.query.weight" in v4
    a, b = convert_state_dict(v4), convert_state_dict(hf.state_dict())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nvlabs_layout_round_trip():
    """NVlabs/SegFormer .pth names (backbone.block1.0.attn.kv, decode_head.linear_c4.proj, linear_pred)."""
    ours = SegFormer("b0", 11).eval()
    ref = ours.state_dict()
    nv = {}
    for k, v in ref.items():
        k2 = re.sub(r"backbone\.patch_embeds\.(\d)\.", lambda m: f"backbone.patch_embed{int(m[1]) + 1}.", k)
        k2 = re.sub(r"backbone\.blocks\.(\d)\.", lambda m: f"backbone.block{int(m[1]) + 1}.", k2)
        k2 = re.sub(r"backbone\.norms\.(\d)\.", lambda m: f"backbone.norm{int(m[1]) + 1}.", k2)
        k2 = k2.replace(".mlp.dwconv.", ".mlp.dwconv.dwconv.")
        k2 = re.sub(r"decode_head\.linear_c\.(\d)\.", lambda m: f"decode_head.linear_c{int(m[1]) + 1}.proj.", k2)
        k2 = k2.replace("decode_head.linear_fuse.", "decode_head.linear_fuse.conv.")
        k2 = k2.replace("decode_head.bn.", "decode_head.linear_fuse.bn.").replace("decode_head.cls.", "decode_head.linear_pred.")
        nv[k2] = v
    assert "backbone.block1.0.attn.kv.weight" in nv and "decode_head.linear_c4.proj.weight" in nv
    back = convert_state_dict(nv)
    assert back.keys() == ref.keys() and all(torch.equal(back[k], ref[k]) for k in ref)
    # MiT ImageNet backbone file: no "backbone." prefix and a classification head to drop
    mit = {k[len("backbone."):]: v for k, v in nv.items() if k.startswith("backbone.")}
    mit["head.weight"] = torch.zeros(1000, 256)
    conv = convert_state_dict(mit)
    assert "backbone.head.weight" not in conv and len(conv) == sum(k.startswith("backbone.") for k in ref)


def test_wrong_weight_file_is_a_clear_error(tmp_path):
    model = SegFormer("b0", 11)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightFileError, match="cannot read weight file"):
        load_weights(model, bad, convert_state_dict)
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, other)
    with pytest.raises(WeightFileError, match="resnet.pth: unrecognised SegFormer weight layout"):
        load_weights(model, other, convert_state_dict)
    b2 = tmp_path / "b2.pth"
    torch.save(SegFormer("b2", 11).state_dict(), b2)
    with pytest.raises(WeightFileError, match="shape of"):
        load_weights(model, b2, convert_state_dict)
    with pytest.raises(WeightFileError, match="not found"):
        load_weights(model, tmp_path / "missing.safetensors")


def test_unknown_layout_is_a_model_error_and_one_line_on_the_command_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    with pytest.raises(ModelError, match="unrecognised SegFormer weight layout"):
        convert_state_dict({"conv1.weight": torch.zeros(1)})
    with pytest.raises(ModelError, match="unknown SegFormer variant 'b9'"):
        SegFormer("b9", 11)
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, other)
    r = subprocess.run([sys.executable, "train_seg.py", "--config", "configs/seg/sample.yaml", "tracker=none",
                        f"output_dir={tmp_path / 'run'}", "eval_only=true", f"load_from={other}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "resnet.pth: unrecognised SegFormer weight layout" in last, last
