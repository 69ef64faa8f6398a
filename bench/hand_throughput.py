"""Hand regressor training-step throughput: DINOv2 + handec head vs timm DINOv2 + a linear head.

    python bench/hand_throughput.py                        # GPU: DINOv2-L/14 at 224, batch 32, bf16, fused AdamW
    python bench/hand_throughput.py --backbone vit_small_patch14_dinov2 --compile
    python bench/hand_throughput.py --device cpu --tiny    # flow check (tests run this)
The models are timed interleaved (bench.common.compare, --rounds x --iters). Prints JSON: per
model img/s (median over rounds, min, max), step ms, peak memory, TFLOP/s and MFU (bf16 peak of
known GPUs), the ratio ours / reference as median and min-max over rounds, and the data
pipeline's img/s for one worker on the bundled sample.
The reference is the same timm backbone with a linear layer on the class token regressing the
21 x 3 joints: the difference is the cost of the handec decoder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (base_parser, compare, count_train_flops, dataset_ips, environment,  # noqa: E402
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


def data_pipeline_ips(n: int = 8, img_size: int = 224) -> float:
    from lib.data.hand import FolderSource, HandDataConfig, HandDataset

    root = Path(__file__).resolve().parents[1] / "tests" / "data" / "hand"
    cfg = HandDataConfig(root=str(root), img_size=img_size)
    return dataset_ips(HandDataset(FolderSource(root, "training"), cfg, train=True), n)


def main():
    p = base_parser(__doc__)
    p.add_argument("--backbone", default="vit_large_patch14_dinov2")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--grad-checkpointing", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
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
    print_json({"bench": "hand_train_step", **environment(device), "results": [row],
                "data_pipeline_img_per_s_per_worker": data_pipeline_ips(2 if args.tiny else 16, args.size)})


if __name__ == "__main__":
    main()
