"""tests/toy_train.py plus a trivial predictor, for the `sweep.py compare` tests:

    python tests/toy_baseline.py --config X.yaml eval_only=true baseline=origin output_dir=runs/t

scores w = (0, 0) once (one metrics.jsonl record at step train.total_steps) without training, as
the real scripts' trivial baselines do through their own evaluation; anything else is toy_train.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib.config import parse_config, save_config  # noqa: E402
from tests import toy_train  # noqa: E402


def main() -> None:
    cfg = parse_config(toy_train.Config, sys.argv[1:], __doc__)
    if not (cfg.eval_only and cfg.baseline):
        return toy_train.main()
    if cfg.baseline != "origin":
        raise SystemExit(f"error: baseline={cfg.baseline!r}: the toy knows only 'origin'")
    run = Path(cfg.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    total = cfg.train.total_steps
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": total, "score": toy_train.score(cfg, [0.0, 0.0], total)}) + "\n")


if __name__ == "__main__":
    main()
