"""A fake training script with the real scripts' interface, as the objective of the sweep tests.

    python tests/toy_train.py --config X.yaml toy.x=0.3 output_dir=runs/toy  [key=value ...]

Its "model" is the vector w = (x, y). Each evaluation (every train.eval_interval steps) appends
{"step", "score", "loss"} to metrics.jsonl, where
    score(step) = -(x - 0.3)^2 - (y + 0.5)^2 - 0.2 * [opt != "b"] - 1 / step + noise(seed) + 0.01 * fold
rises with the step towards its optimum 0 at x = 0.3, y = -0.5, opt = b. Writes config.yaml and
checkpoints/best/model.safetensors (w) like the real scripts; `eval_only=true ensemble=[...]`
scores the mean w of the members and reports member<i>_score beside it. Failure switches:
toy.nan_at=N (NaN loss at step N: exits 1 with "error: non-finite loss ..."), toy.crash_at=N
(an exception), toy.nan_above=X (NaN loss at step 2 when x > X), toy.sleep (seconds per step).
"""

from __future__ import annotations

import json
import math
import random
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib.config import RunConfig, parse_config, save_config  # noqa: E402


@dataclass
class ToyConfig:
    x: float = 0.0
    y: float = 0.0
    opt: str = "a"
    noise: float = 0.0  # seed-dependent offset of the score: noise * N(0, 1)[seed]
    sleep: float = 0.0  # seconds per step
    nan_at: int = 0
    crash_at: int = 0
    nan_above: float = math.inf


@dataclass
class DataConfig:
    folds: int = 0
    fold: int = 0


@dataclass
class Config(RunConfig):
    toy: ToyConfig = field(default_factory=ToyConfig)
    data: DataConfig = field(default_factory=DataConfig)


def score(cfg: Config, w: list[float], step: int) -> float:
    offset = cfg.toy.noise * random.Random(cfg.seed).gauss(0, 1) + 0.01 * cfg.data.fold
    return -(w[0] - 0.3) ** 2 - (w[1] + 0.5) ** 2 - 0.2 * (cfg.toy.opt != "b") - 1.0 / step + offset


def save_w(w: list[float], folder: Path) -> None:
    """model.safetensors holding one float64 tensor "w" (the format written by hand: no numpy/torch
    import, so that a toy trial starts in a tenth of a second)."""
    header = json.dumps({"w": {"dtype": "F64", "shape": [len(w)], "data_offsets": [0, 8 * len(w)]}}).encode()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + struct.pack(f"<{len(w)}d", *w))


def load_w(folder: str) -> list[float]:
    data = (Path(folder) / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    shape = json.loads(data[8:8 + n])["w"]["shape"]
    return list(struct.unpack(f"<{shape[0]}d", data[8 + n:]))


def main() -> None:
    cfg = parse_config(Config, sys.argv[1:], __doc__)
    run = Path(cfg.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    log = open(run / "metrics.jsonl", "a")
    w = [cfg.toy.x, cfg.toy.y]
    total = cfg.train.total_steps
    if cfg.eval_only:
        members = [load_w(p) for p in cfg.ensemble]
        mean = [sum(m[i] for m in members) / len(members) for i in range(2)]
        rec = {"step": total, "score": score(cfg, mean, total)}
        rec |= {f"member{i}_score": score(cfg, m, total) for i, m in enumerate(members)}
        log.write(json.dumps(rec) + "\n")
        return
    best = -math.inf
    for step in range(1, total + 1):
        time.sleep(cfg.toy.sleep)
        loss = 1.0 / step
        if step == cfg.toy.nan_at or (step == 2 and cfg.toy.x > cfg.toy.nan_above):
            loss = float("nan")
        if step == cfg.toy.crash_at:
            raise RuntimeError(f"toy crash at step {step}")
        if not math.isfinite(loss):
            print(f"error: non-finite loss at step {step}: loss = {loss}", file=sys.stderr)
            raise SystemExit(1)
        if step % cfg.train.eval_interval == 0 or step == total:
            s = score(cfg, w, step)
            log.write(json.dumps({"step": step, "score": s, "loss": loss}) + "\n")
            log.flush()
            if s > best:
                best = s
                save_w(w, run / "checkpoints" / "best")


if __name__ == "__main__":
    main()
