"""Hand regressor training-step throughput: DINOv2 + handec head vs timm DINOv2 + a linear head.

    python bench/hand_throughput.py                        # GPU: DINOv2-L/14 at 224, batch 32, bf16, fused AdamW
    python bench/hand_throughput.py --backbone vit_small_patch14_dinov2 --compile
    python bench/hand_throughput.py --device cpu --tiny    # flow check (tests run this)
    python bench/hand_throughput.py --data-only --data-config configs/hand/hand3d_vits.yaml  # data paths only
The models are timed interleaved (bench.common.compare, --rounds x --iters). Prints JSON: per
model img/s (median over rounds, min, max), step ms, peak memory, TFLOP/s and MFU (bf16 peak of
known GPUs), the ratio ours / reference as median and min-max over rounds, and the data
pipeline's img/s for one worker (--data-config, default the bundled sample): the CPU path (PIL crop +
colour) and the device path's worker half (data.aug_device=device: decode + draw + labels), interleaved,
plus the device path's batched crop (lib.data.device_aug_hand) on --device.
The reference is the same timm backbone with a linear layer on the class token regressing the
21 x 3 joints: the difference is the cost of the handec decoder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (aug_paths_ips, base_parser, compare, count_train_flops, dataset_ips, environment,  # noqa: E402
                          peak_bf16_tflops, print_json, ratio)
from lib.models.hand import HandRegressor  # noqa: E402

TINY_BACKBONE = dict(embed_dim=48, depth=1, num_heads=3)


class LinearHead(torch.nn.Module):
    """timm DINOv2 + Linear(class token -> 21 x 3 joints)."""

    def __init__(self, backbone: str, img_size: int, **overrides):
        super().__init__()
        self.backbone = timm.create_model(backbone, pretrained=False, img_size=img_size, num_classes=0, **overrides)
        self.fc = torch.nn.Linear(self.backbone.embed_dim, 63)

    def forward(self, x, is_right):
        return {"joints": self.fc(self.backbone(x)).reshape(-1, 21, 3)}


def make_step(model, x, is_right, target, precision: str, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
            joints = model(x, is_right)["joints"]
        (joints.float() - target).abs().sum((1, 2)).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def data_pipeline_ips(data_config: str, img_size: int, n: int, device: torch.device, batch: int,
                      rounds: int) -> tuple[dict, dict]:
    """img/s per loader worker of the train split (`data_config`: a hand yaml, "" = the bundled sample;
    crops of `img_size`, 0 = the config's): CPU path and device path's worker half timed interleaved
    (`rounds` x `n` samples), and img/s of the device path's batched half (device_aug_hand.hand_train_batch)
    on `device` -> (medians, with min / max / ratio)."""
    import dataclasses

    from lib.config import build_config, load_yaml
    from lib.data import device_aug_hand
    from lib.data.hand import HandDataConfig, HandDataset, make_source

    if data_config:
        from train_hand import HandConfig

        cfg = build_config(HandConfig, load_yaml(Path(data_config))).data
    else:
        cfg = HandDataConfig(root=str(Path(__file__).resolve().parents[1] / "tests" / "data" / "hand"))
    cfg = dataclasses.replace(cfg, img_size=img_size or cfg.img_size)
    src = make_source(cfg, cfg.train_split)
    paths = {m: HandDataset(src, dataclasses.replace(cfg, aug_device=m), train=True) for m in ("cpu", "device")}

    detail = aug_paths_ips(paths, device_aug_hand.collate, lambda b: device_aug_hand.hand_train_batch(b, cfg.img_size), batch, device, rounds, n)
    dev = paths["device"]
    detail["train_set"] = f"{cfg.root} ({cfg.format}, {len(dev)} images, {cfg.img_size}x{cfg.img_size} crops)"
    return {k: v["img_per_s"] for k, v in detail.items() if isinstance(v, dict) and "img_per_s" in v}, detail


def main():
    p = base_parser(__doc__)
    p.add_argument("--backbone", default="vit_large_patch14_dinov2")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--data-config", default="", help="hand yaml whose train split times the data paths "
                   "(default: the bundled sample)")
    p.add_argument("--data-img-size", type=int, default=0, help="crop size of the data paths (0: the config's, "
                   "else --size)")
    p.add_argument("--data-only", action="store_true", help="only the data pipeline (no model steps)")
    p.add_argument("--data-samples", type=int, default=32, help="samples per path per round")
    p.add_argument("--data-batch", type=int, default=32, help="batch of the device path's crop")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.tiny:
        args.data_samples, args.data_batch = 2, 2
    data_size = args.data_img_size or (0 if args.data_config else (28 if args.tiny else args.size))
    data = lambda: data_pipeline_ips(args.data_config, data_size, args.data_samples, device,  # noqa: E731
                                     args.data_batch, 3 if args.tiny else max(args.rounds, 5))
    if args.data_only:
        medians, detail = data()
        print_json({"bench": "hand_data", **environment(device), "data_pipeline_img_per_s_per_worker": medians,
                    "data_pipeline": detail})
        return
    overrides, head = {}, {}
    if args.tiny:
        args.size, args.iters, args.warmup, args.rounds = 28, 2, 1, 3
        overrides, head = TINY_BACKBONE, dict(dim=32, depth=1, heads=2, dim_head=16, mlp_dim=32)
        args.precision = "fp32" if device.type == "cpu" else args.precision  # CPU bf16 autocast is very slow
    bs = args.batch_size or (2 if args.tiny else 32)
    peak = peak_bf16_tflops(device) if args.precision == "bf16" else None
    x = torch.randn(bs, 3, args.size, args.size, device=device)
    is_right = torch.randint(0, 2, (bs,), device=device)
    target = torch.randn(bs, 21, 3, device=device) * 0.05
    row = {"backbone": args.backbone, "batch": bs, "size": args.size, "precision": args.precision}
    impls = {
        "ours": lambda: HandRegressor(args.backbone, args.size, backbone_overrides=overrides, **head),
        "timm_linear": lambda: LinearHead(args.backbone, args.size, **overrides),
    }
    steps, flops = {}, {}
    for name, build in impls.items():
        torch.manual_seed(0)
        model = build().to(device).train()
        if args.grad_checkpointing:
            model.backbone.set_grad_checkpointing(True)
        row[f"{name}_params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        f = None  # FLOPs on GPU only (one extra step under the FLOP counter)
        if device.type == "cuda" and not args.tiny:
            f = count_train_flops(make_step(model, x, is_right, target, "fp32", device))
        for compiled in ([False, True] if args.compile else [False]):
            key = name + ("_compiled" if compiled else "")
            steps[key] = make_step(torch.compile(model) if compiled else model, x, is_right, target, args.precision,
                                   device)
            flops[key] = f
    row.update(compare(steps, bs, device, args.rounds, args.warmup, args.iters, flops, peak))
    row["ours_vs_timm_linear"] = ratio(row, "ours", "timm_linear")
    if args.compile:
        row["ours_compiled_vs_timm_linear_compiled"] = ratio(row, "ours_compiled", "timm_linear_compiled")
    medians, detail = data()
    print_json({"bench": "hand_train_step", **environment(device), "results": [row],
                "data_pipeline_img_per_s_per_worker": medians, "data_pipeline": detail})


if __name__ == "__main__":
    main()
