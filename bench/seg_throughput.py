"""SegFormer training-step throughput: this repo's model vs HF transformers', same run, same settings.

    python bench/seg_throughput.py                        # GPU: B0 and B2 at 512x512, batch 16, bf16, fused AdamW
    python bench/seg_throughput.py --variants b0 --compile
    python bench/seg_throughput.py --device cpu --tiny    # flow check (tests run this)
Prints JSON: img/s, step ms, peak memory, TFLOP/s per model and the ratio ours / HF; plus the
data pipeline's img/s for one worker (decode + augment) on the bundled sample.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (base_parser, count_train_flops, dataset_ips, environment, peak_bf16_tflops,  # noqa: E402
                          print_json, time_train_step)
from lib.models.segformer import MIT_SETTINGS, SegFormer  # noqa: E402


def hf_segformer(variant: str, num_classes: int):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    dims, depths, dec = MIT_SETTINGS[variant]
    cfg = SegformerConfig(num_labels=num_classes, hidden_sizes=dims, depths=depths, decoder_hidden_size=dec)
    return SegformerForSemanticSegmentation(cfg)


def make_step(model, logits_fn, x, y, precision: str, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
            logits = logits_fn(model, x)
            up = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(up.float(), y, ignore_index=255)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def data_pipeline_ips(n: int = 8) -> float:
    from lib.config import build_config
    from lib.data.seg import SegDataConfig, SegFolderDataset

    root = Path(__file__).resolve().parents[1] / "tests" / "data" / "seg"
    ds = SegFolderDataset(build_config(SegDataConfig, {"root": str(root), "crop_size": [512, 512]}), "train", True)
    return dataset_ips(ds, n)


def main():
    p = base_parser(__doc__)
    p.add_argument("--variants", nargs="+", default=["b0", "b2"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--num-classes", type=int, default=19)
    args = p.parse_args()
    device = torch.device(args.device)
    if args.tiny:
        args.variants, args.size, args.iters, args.warmup = ["b0"], 64, 2, 1
        args.precision = "fp32" if device.type == "cpu" else args.precision  # CPU bf16 autocast is very slow
    bs = args.batch_size or (2 if args.tiny else 16)
    peak = peak_bf16_tflops(device) if args.precision == "bf16" else None
    results = []
    for variant in args.variants:
        x = torch.randn(bs, 3, args.size, args.size, device=device)
        y = torch.randint(0, args.num_classes, (bs, args.size, args.size), device=device)
        row = {"variant": variant, "batch": bs, "size": args.size, "precision": args.precision}
        impls = {
            "ours": (SegFormer(variant, args.num_classes), lambda m, x: m(x)),
            "hf": (hf_segformer(variant, args.num_classes), lambda m, x: m(pixel_values=x).logits),
        }
        for name, (model, fn) in impls.items():
            model = model.to(device).train()
            flops = count_train_flops(make_step(model, fn, x, y, "fp32", device)) if not args.tiny else None
            for compiled in ([False, True] if args.compile else [False]):
                m = torch.compile(model) if compiled else model
                step = make_step(m, fn, x, y, args.precision, device)
                key = name + ("_compiled" if compiled else "")
                row[key] = time_train_step(step, bs, device, args.warmup, args.iters, flops, peak)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["speedup_vs_hf"] = round(row["ours"]["img_per_s"] / row["hf"]["img_per_s"], 3)
        if args.compile:
            row["speedup_compiled_vs_hf_compiled"] = round(
                row["ours_compiled"]["img_per_s"] / row["hf_compiled"]["img_per_s"], 3)
        results.append(row)
    print_json({"bench": "seg_train_step", **environment(device), "results": results,
                "data_pipeline_img_per_s_per_worker": data_pipeline_ips(2 if args.tiny else 16)})


if __name__ == "__main__":
    main()
