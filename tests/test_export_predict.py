"""lib/export.py and lib/predict.py on a tiny model and made-up folders."""

import pytest
import torch
from PIL import Image
from torch import nn

from lib.errors import DataError, UserError
from lib.export import export_model, onnx_max_abs_diff
from lib.predict import list_inputs, shard


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):  # (B, 3, H, W) -> (B, 4, H/2, W/2)
        return nn.functional.interpolate(self.bn(self.conv(x)).relu(), scale_factor=0.5, mode="bilinear")


def test_onnx_matches_torch_with_dynamic_batch(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    m = Tiny().eval()
    path = export_model(m, (torch.randn(1, 3, 16, 16),), tmp_path, "onnx", ["image"], ["out"], metadata={"step": 3})
    x = torch.randn(5, 3, 16, 16)  # another batch size than the export example
    with torch.no_grad():
        ref = m(x)
    assert onnx_max_abs_diff(path, (x,), ref) < 1e-5
    assert (tmp_path / "export.json").read_text().count('"step": "3"') == 1


def test_safetensors_export_and_bad_format(tmp_path):
    from safetensors.torch import load_file

    m = Tiny()
    path = export_model(m, (torch.randn(1, 3, 8, 8),), tmp_path, "safetensors")
    sd = load_file(str(path))
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    with pytest.raises(UserError, match="unknown format"):
        export_model(m, (torch.randn(1, 3, 8, 8),), tmp_path, "tflite")


def test_list_inputs_file_folder_glob(tmp_path):
    for name in ("b.png", "a.jpg", "c.txt"):
        p = tmp_path / name
        Image.new("RGB", (4, 4)).save(p) if name.endswith(("png", "jpg")) else p.write_text("x")
    assert [p.name for p in list_inputs(str(tmp_path))] == ["a.jpg", "b.png"]
    assert [p.name for p in list_inputs(str(tmp_path / "b.png"))] == ["b.png"]
    assert [p.name for p in list_inputs(str(tmp_path / "*.jpg"))] == ["a.jpg"]
    with pytest.raises(DataError, match="no images match"):
        list_inputs(str(tmp_path / "*.bmp"))
    with pytest.raises(DataError, match="not an image, a folder or a glob"):
        list_inputs(str(tmp_path / "missing.png"))
    assert shard(list(range(7)), 1, 3) == [1, 4] and sum(len(shard(list(range(7)), r, 3)) for r in range(3)) == 7
