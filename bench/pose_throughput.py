"""SDPose-S-V1 training-step throughput (256x192, 2 cycles, heatmap + token self-distillation losses, Adam).

    python bench/pose_throughput.py                       # GPU: batch 64 (SDPose's per-GPU batch), bf16
    python bench/pose_throughput.py --preset t --compile
    python bench/pose_throughput.py --device cpu --tiny   # flow check (tests run this)
    python bench/pose_throughput.py --data-only --data-config configs/pose/coco_mini.yaml  # data paths only
Prints JSON: img/s, step ms, peak memory, TFLOP/s for
  ours             the model as trained (attention through F.scaled_dot_product_attention),
  ours_importance  + importance masking (explicit keypoint-query attention weights of each cycle's last layer),
  reference        the same weights with SDPose's attention math (einsum -> softmax -> einsum, as in
                   SDPose's tokenbase.py); no TokenPose/SDPose implementation is installable here,
and the data pipeline's img/s for one worker (decode + augment + targets; --data-config, default the
bundled sample): the CPU path (PIL affine crop) and the device path's worker half (data.aug_device=device:
decode + draw + targets), interleaved, plus the device path's batched crop (lib.data.device_aug_pose) on --device.
All are timed interleaved (bench.common.compare, --rounds x --iters); ratios are medians over
rounds with min-max.
"""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import torch
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (aug_paths_ips, base_parser, compare, count_train_flops, dataset_ips, environment,  # noqa: E402
                          peak_bf16_tflops, print_json, ratio)
from lib.losses.pose import MaskedTokenDistilLoss, joints_mse, token_importance  # noqa: E402
from lib.models.tokenpose import tokenpose  # noqa: E402


def sdpose_attention(self, x, attn_rows: int = 0):
    """SDPose's Attention.forward: explicit scores and softmax for every query."""
    q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
    attn = (torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5).softmax(dim=-1)
    out = rearrange(torch.einsum("bhij,bhjd->bhid", attn, v), "b h n d -> b n (h d)")
    return self.proj(out), (attn[:, :, :attn_rows].mean(1).detach() if attn_rows else None)


def make_step(model, x, target, weight, precision: str, device, masking: str = ""):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    dist = MaskedTokenDistilLoss(5e-6, 0.3 if masking else 0.0, masking or "random")
    j = model.num_joints

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
            outs = model(x, need_attn=bool(masking))
        loss = sum(joints_mse(o["heatmap"], target, weight) for o in outs)
        for s, t in zip(outs[:-1], outs[1:]):
            vis_imp, kpt_imp = token_importance(t["attn"], j) if masking else (None, None)
            loss = loss + dist(s["vis_token"], t["vis_token"], vis_imp) + dist(s["kpt_token"], t["kpt_token"], kpt_imp)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def data_pipeline_ips(data_config: str, n: int, device: torch.device, batch: int, rounds: int) -> tuple[dict, dict]:
    """img/s per loader worker of the train set (`data_config`: a pose yaml, "" = the bundled sample):
    CPU path and device path's worker half timed interleaved (`rounds` x `n` samples), and img/s of
    the device path's batched half (device_aug_pose.pose_train_batch) on `device` -> (medians, with
    min / max / ratio)."""
    import dataclasses

    from lib.config import build_config, load_yaml
    from lib.data import device_aug_pose
    from lib.data.coco import CocoPoseDataset, PoseDataConfig

    root = Path(__file__).resolve().parents[1]
    if data_config:
        from train_pose import PoseConfig

        cfg = build_config(PoseConfig, load_yaml(Path(data_config))).data
    else:
        cfg = PoseDataConfig(root=str(root / "tests" / "data" / "pose"))
    paths = {m: CocoPoseDataset(dataclasses.replace(cfg, aug_device=m), "train", train=True) for m in ("cpu", "device")}

    detail = aug_paths_ips(paths, device_aug_pose.collate, lambda b: device_aug_pose.pose_train_batch(b, cfg.image_size), batch, device, rounds, n)
    dev = paths["device"]
    detail["train_set"] = f"{cfg.root} ({len(dev)} persons, {cfg.image_size[1]}x{cfg.image_size[0]} crops)"
    return {k: v["img_per_s"] for k, v in detail.items() if isinstance(v, dict) and "img_per_s" in v}, detail


def main():
    p = base_parser(__doc__)
    p.add_argument("--preset", default="s-v1", choices=["t", "s-v1", "s-v2"])
    p.add_argument("--data-config", default="", help="pose yaml whose train set times the data paths (default: sample)")
    p.add_argument("--data-only", action="store_true", help="only the data pipeline (no model steps)")
    p.add_argument("--data-samples", type=int, default=32, help="samples per path per round")
    p.add_argument("--data-batch", type=int, default=32, help="batch of the device path's crop")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.tiny:
        args.data_samples, args.data_batch = 2, 2
    data = lambda: data_pipeline_ips(args.data_config, args.data_samples, device, args.data_batch,  # noqa: E731
                                     3 if args.tiny else max(args.rounds, 5))
    if args.data_only:
        medians, detail = data()
        print_json({"bench": "pose_data", **environment(device), "data_pipeline_img_per_s_per_worker": medians,
                    "data_pipeline": detail})
        return
    size, extra = (192, 256), {}
    if args.tiny:
        size, extra, args.iters, args.warmup, args.rounds = (48, 64), dict(depth=1, dim=32, heads=2), 2, 1, 3
        args.precision = "fp32" if device.type == "cpu" else args.precision  # CPU bf16 autocast is very slow
    bs = args.batch_size or (2 if args.tiny else 64)
    peak = peak_bf16_tflops(device) if args.precision == "bf16" else None
    x = torch.randn(bs, 3, size[1], size[0], device=device)
    target = torch.rand(bs, 17, size[1] // 4, size[0] // 4, device=device)
    weight = torch.ones(bs, 17, device=device)
    row = {"preset": args.preset, "batch": bs, "size": f"{size[1]}x{size[0]}", "precision": args.precision}
    torch.manual_seed(0)
    model = tokenpose(args.preset, image_size=size, **extra).to(device).train()
    flops = None  # FLOPs on GPU only (one extra step under the FLOP counter)
    if device.type == "cuda" and not args.tiny:
        flops = count_train_flops(make_step(model, x, target, weight, "fp32", device))
    reference = copy.deepcopy(model)  # same weights, SDPose's explicit attention
    for blk in reference.blocks:
        blk.attn.forward = types.MethodType(sdpose_attention, blk.attn)
    steps = {}
    for name, net, masking in (("ours", model, ""), ("ours_importance", model, "importance"),
                               ("reference", reference, "")):
        for compiled in ([False, True] if args.compile else [False]):
            steps[name + ("_compiled" if compiled else "")] = make_step(torch.compile(net) if compiled else net, x,
                                                                        target, weight, args.precision, device, masking)
    row.update(compare(steps, bs, device, args.rounds, args.warmup, args.iters, {k: flops for k in steps}, peak))
    row["ours_vs_reference"] = ratio(row, "ours", "reference")
    if args.compile:
        row["ours_compiled_vs_reference_compiled"] = ratio(row, "ours_compiled", "reference_compiled")
    medians, detail = data()
    print_json({"bench": "pose_train_step", **environment(device), "results": [row],
                "data_pipeline_img_per_s_per_worker": medians, "data_pipeline": detail})


if __name__ == "__main__":
    main()
