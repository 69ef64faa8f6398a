"""Export an inference model: ONNX (opset >= 17, dynamic batch) or plain safetensors weights.

    path = export_model(model, (image,), out_dir, "onnx", input_names=["image"], output_names=["logits"])
    err = onnx_max_abs_diff(path, (image,), model(image))          # onnxruntime vs PyTorch

ONNX goes through torch.onnx's TorchScript exporter (`dynamo=False`): in torch 2.14 it exports our
models with a dynamic batch axis, while the torch.export-based exporter fails on some of them
(data-dependent shapes in interpolation). Every export writes `export.json` beside the model
(format, inputs, outputs, opset, metadata such as script / model / step).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from lib.errors import UserError

OPSET = 17


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def export_model(model: nn.Module, example_inputs, out_dir: str | Path, fmt: str,
                 input_names: list[str] | None = None, output_names: list[str] | None = None,
                 dynamic_batch: bool = True, metadata: dict | None = None, opset: int = OPSET) -> Path:
    """Write `model` (eval mode, on CPU) to out_dir/model.onnx or out_dir/model.safetensors; return the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    example_inputs = tuple(t.cpu() for t in _as_tuple(example_inputs))
    input_names = list(input_names or [f"input{i}" for i in range(len(example_inputs))])
    meta = {"format": fmt, "inputs": input_names, "metadata": {k: str(v) for k, v in (metadata or {}).items()}}
    if fmt == "safetensors":
        path = out_dir / "model.safetensors"
        sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(sd, str(path), metadata=meta["metadata"])
    elif fmt == "onnx":
        with torch.no_grad():
            outs = _as_tuple(model(*example_inputs))
        output_names = list(output_names or [f"output{i}" for i in range(len(outs))])
        axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
        path = out_dir / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(model, example_inputs, str(path), opset_version=opset, dynamo=False,
                              input_names=input_names, output_names=output_names, dynamic_axes=axes,
                              do_constant_folding=True)
        meta |= {"outputs": output_names, "opset": opset, "dynamic_batch": dynamic_batch}
    else:
        raise UserError(f"export: unknown format {fmt!r} (use onnx or safetensors)")
    (out_dir / "export.json").write_text(json.dumps(meta, indent=1))
    return path


def onnx_max_abs_diff(path: str | Path, example_inputs, torch_outputs) -> float:
    """Run the ONNX file with onnxruntime (CPU) on `example_inputs`; max |onnx - torch| over all outputs."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), _as_tuple(example_inputs))}
    outs = sess.run(None, feeds)
    ref = [t.detach().float().cpu().numpy() for t in _as_tuple(torch_outputs)]
    if len(outs) != len(ref):
        raise ValueError(f"onnx model has {len(outs)} outputs, torch gave {len(ref)}")
    return max(float(np.abs(o.astype(np.float32) - r).max()) for o, r in zip(outs, ref))
