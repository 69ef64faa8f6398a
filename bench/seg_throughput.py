"""SegFormer training-step throughput: this repo's model vs HF transformers', same run, same settings.

    python bench/seg_throughput.py                        # GPU: B0 and B2 at 512x512, batch 16, bf16, fused AdamW
    python bench/seg_throughput.py --variants b0 --compile
    python bench/seg_throughput.py --device cpu --tiny    # flow check (tests run this)
The models are timed interleaved (bench.common.compare: --rounds rounds of --iters steps each,
A B then B A ...). Prints JSON: per model img/s (median over rounds, min, max), step ms, peak
memory, TFLOP/s; the ratio ours / HF as median and min-max over rounds; and the data pipeline's
img/s per worker (CPU path; device path's worker half) plus the device path's batched half.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (base_parser, compare, count_train_flops, dataset_ips, environment,  # noqa: E402
                          peak_bf16_tflops, print_json, ratio)
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


def data_pipeline_ips(root: Path, n: int, device: torch.device, batch: int) -> dict:
    """img/s per loader worker at 512x512 crops: the CPU path (decode + PIL augment) and the device
    path's worker half (decode + label crop); and img/s of the device path's batched image half
    (lib.data.device_aug) on `device`."""
    from lib.config import build_config
    from lib.data import device_aug
    from lib.data.seg import SegDataConfig, SegFolderDataset

    kw = {"root": str(root), "crop_size": [512, 512]}
    cpu = SegFolderDataset(build_config(SegDataConfig, kw), "train", True)
    dev = SegFolderDataset(build_config(SegDataConfig, {**kw, "aug_device": "device"}), "train", True)
    out = {"cpu_path": dataset_ips(cpu, n), "device_path_worker": dataset_ips(dev, n)}
    items = device_aug.collate([dev[(i % len(dev), i // len(dev))] for i in range(batch)])
    items = {k: v.to(device) if torch.is_tensor(v) else v for k, v in items.items()}
    res = compare({"device_aug": lambda: device_aug.seg_train_batch(items, (512, 512))}, batch, device, rounds=3,
                  warmup=1, iters=2)
    out["device_aug_on_" + device.type] = res["device_aug"]["img_per_s"]
    return out


def main():
    p = base_parser(__doc__)
    p.add_argument("--variants", nargs="+", default=["b0", "b2"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--num-classes", type=int, default=19)
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[1] / "tests" / "data" / "seg"),
                   help="seg folder for the data pipeline numbers (e.g. ../shared/data/camvid)")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.tiny:
        args.variants, args.size, args.iters, args.warmup, args.rounds = ["b0"], 64, 2, 1, 3
        args.precision = "fp32" if device.type == "cpu" else args.precision  # CPU bf16 autocast is very slow
    bs = args.batch_size or (2 if args.tiny else 16)
    peak = peak_bf16_tflops(device) if args.precision == "bf16" else None
    results = []
    for variant in args.variants:
        x = torch.randn(bs, 3, args.size, args.size, device=device)
        y = torch.randint(0, args.num_classes, (bs, args.size, args.size), device=device)
        row = {"variant": variant, "batch": bs, "size": args.size, "precision": args.precision}
        torch.manual_seed(0)
        impls = {
            "ours": (SegFormer(variant, args.num_classes), lambda m, x: m(x)),
            "hf": (hf_segformer(variant, args.num_classes), lambda m, x: m(pixel_values=x).logits),
        }
        steps, flops = {}, {}
        for name, (model, fn) in impls.items():
            model = model.to(device).train()
            f = None  # FLOPs on GPU only (one extra step under the FLOP counter)
            if device.type == "cuda" and not args.tiny:
                f = count_train_flops(make_step(model, fn, x, y, "fp32", device))
            for compiled in ([False, True] if args.compile else [False]):
                key = name + ("_compiled" if compiled else "")
                steps[key] = make_step(torch.compile(model) if compiled else model, fn, x, y, args.precision, device)
                flops[key] = f
        row.update(compare(steps, bs, device, args.rounds, args.warmup, args.iters, flops, peak))
        row["ours_vs_hf"] = ratio(row, "ours", "hf")
        if args.compile:
            row["ours_compiled_vs_hf_compiled"] = ratio(row, "ours_compiled", "hf_compiled")
        results.append(row)
        del steps, impls
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_json({"bench": "seg_train_step", **environment(device), "results": results,
                "data_img_per_s": data_pipeline_ips(Path(args.data_root), 2 if args.tiny else 16, device,
                                                    2 if args.tiny else bs)})


if __name__ == "__main__":
    main()
