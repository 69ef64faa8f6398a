"""Seg train data pipeline, per loader worker: the old CPU path (commit fa3382b's lib/data/seg.py,
loaded from git into a temporary module) against this tree's, in one process, interleaved rounds.

    OMP_NUM_THREADS=1 python bench/data_pipeline_seg.py --data-root ../shared/data/camvid
Each round times n samples of `ds[(i, epoch)]` (decode + augment + normalise, 512x512 crops) for
old, new (A B, then B A, ...). Prints JSON: img/s per round and the median new/old ratio with its
min-max over rounds; plus the device path's worker half (decode + label crop) as the third entry.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import compare, dataset_step, ratio  # noqa: E402
OLD = "fa3382b"  # the pipeline before issue 14's work (15.2 img/s on the development box)


def old_module():
    src = subprocess.run(["git", "show", f"{OLD}:lib/data/seg.py"], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    path = Path(tempfile.mkdtemp()) / "seg_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("seg_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["seg_old"] = mod  # dataclasses look the module up
    spec.loader.exec_module(mod)
    return mod


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "camvid"))
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("-n", type=int, default=40, help="samples per round and pipeline")
    args = p.parse_args()
    torch.set_num_threads(1)
    import cv2
    cv2.setNumThreads(1)  # one loader worker = one thread
    from lib.config import build_config
    from lib.data.seg import SegDataConfig, SegFolderDataset

    old = old_module()
    kw = {"root": args.data_root, "crop_size": [512, 512]}
    pipes = {
        "old": old.SegFolderDataset(build_config(old.SegDataConfig, kw), "train", True),
        "new": SegFolderDataset(build_config(SegDataConfig, kw), "train", True),
        "device_worker": SegFolderDataset(build_config(SegDataConfig, {**kw, "aug_device": "device"}), "train", True),
    }
    # one sample per step, n per round, interleaved A B C / C B A ...; 3 warm-up samples each (file cache)
    res = compare({k: dataset_step(ds) for k, ds in pipes.items()}, 1, torch.device("cpu"), args.rounds, 3, args.n)
    print(json.dumps({"bench": "seg_data_pipeline_per_worker", "data_root": args.data_root, "n": args.n,
                      "img_per_s_rounds": {k: r["rounds"] for k, r in res.items()},
                      "img_per_s_median": {k: r["img_per_s"] for k, r in res.items()},
                      **{f"{k}_vs_old": ratio(res, k, "old") for k in ("new", "device_worker")}}, indent=1))


if __name__ == "__main__":
    main()
