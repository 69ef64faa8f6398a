"""Face training-step throughput: this repo's FaceNet vs the plain timm model, same run, same settings.

    python bench/face_throughput.py                       # GPU: ResNet-18 at 112 px, TinyViT-11M at 224 px, bf16
    python bench/face_throughput.py --models resnet18 --batch-size 512 --compile
    python bench/face_throughput.py --device cpu --tiny   # flow check (tests run this)
Both sides train the same step: backbone -> 512-d embedding -> ArcFace head (10k classes) -> CE,
AdamW. "ours" is lib.models.face.FaceNet (our ResNet, or timm's TinyViT wrapped with our pooled
embedding); "timm" is timm.create_model(name, num_classes=512) (timm's own pooling + fc as the
embedding). The models are timed interleaved (bench.common.compare, --rounds x --iters). Prints
JSON: per model img/s (median over rounds, min, max), step ms, peak memory, TFLOP/s; the ratio
ours / timm as median and min-max over rounds; the data pipeline's img/s for one worker.
"""

from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (base_parser, compare, count_train_flops, dataset_ips, environment,  # noqa: E402
                          peak_bf16_tflops, print_json, ratio)
from lib.losses.face import ArcFaceHead  # noqa: E402
from lib.models.face import FaceModelConfig, FaceNet  # noqa: E402

SETTINGS = {"resnet18": ("resnet18", 112), "tinyvit11m": ("tiny_vit_11m_224", 224)}  # ours -> (timm name, size)


def make_step(model, head, x, y, precision: str, device):
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
            loss = F.cross_entropy(head(model(x), y).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def data_pipeline_ips(n: int = 8) -> float:
    from lib.data.face import FaceDataConfig, IdentityFolder, build_transform

    root = Path(__file__).resolve().parents[1] / "tests" / "data" / "face" / "train"
    return dataset_ips(IdentityFolder(root, build_transform(FaceDataConfig(aug="aggressive"), train=True)), n)


def main():
    p = base_parser(__doc__)
    p.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--num-classes", type=int, default=10_000)
    p.add_argument("--embed-dim", type=int, default=512)
    args = p.parse_args()
    device = torch.device(args.device)
    if args.tiny:
        args.iters, args.warmup, args.rounds, args.num_classes = 2, 1, 3, 100
        args.precision = "fp32" if device.type == "cpu" else args.precision  # CPU bf16 autocast is very slow
    bs = args.batch_size or (2 if args.tiny else 256)
    peak = peak_bf16_tflops(device) if args.precision == "bf16" else None
    results = []
    for name in args.models:
        timm_name, size = SETTINGS[name]
        size = 64 if args.tiny else size
        x = torch.randn(bs, 3, size, size, device=device)
        y = torch.randint(0, args.num_classes, (bs,), device=device)
        row = {"model": name, "batch": bs, "size": size, "precision": args.precision}
        torch.manual_seed(0)
        impls = {
            "ours": FaceNet(FaceModelConfig(backbone=name if name == "resnet18" else timm_name,
                                            embed_dim=args.embed_dim, max_params=0)),
            "timm": timm.create_model(timm_name, num_classes=args.embed_dim),
        }
        steps, flops = {}, {}
        for impl, model in impls.items():
            model = model.to(device).train()
            head = ArcFaceHead(args.embed_dim, args.num_classes).to(device)
            f = None  # FLOPs on GPU only (one extra step under the FLOP counter)
            if device.type == "cuda" and not args.tiny:
                f = count_train_flops(make_step(model, head, x, y, "fp32", device))
            row[f"{impl}_params"] = sum(q.numel() for q in model.parameters())
            for compiled in ([False, True] if args.compile else [False]):
                key = impl + ("_compiled" if compiled else "")
                steps[key] = make_step(torch.compile(model) if compiled else model, head, x, y, args.precision, device)
                flops[key] = f
        row.update(compare(steps, bs, device, args.rounds, args.warmup, args.iters, flops, peak))
        row["ours_vs_timm"] = ratio(row, "ours", "timm")
        if args.compile:
            row["ours_compiled_vs_timm_compiled"] = ratio(row, "ours_compiled", "timm_compiled")
        results.append(row)
        del steps, impls
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_json({"bench": "face_train_step", **environment(device), "results": results,
                "data_pipeline_img_per_s_per_worker": data_pipeline_ips(2 if args.tiny else 32)})


if __name__ == "__main__":
    main()
