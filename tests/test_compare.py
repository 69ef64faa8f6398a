"""sweep.py compare: the paired interval against a hand computation, mean +- std and differences
of the arms table against the runs' own metrics.jsonl, an arm identical to the baseline (difference
exactly 0), trivial rows, reuse of finished runs and failed runs reported (tests/toy_baseline.py)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

import sweep
from lib.runs import paired_interval

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "tests" / "toy_baseline.py")


def read_csv(path: Path) -> dict[str, dict]:
    with open(path) as f:
        return {r["arm"]: r for r in csv.DictReader(f)}


def scores(run_dir: Path) -> list[float]:
    return [json.loads(x)["score"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_paired_interval_equals_hand_computation():
    # arm - baseline on 3 seeds: d = (1, 2, 3): mean 2, sd 1; with 2 degrees of freedom the t
    # quantile has a closed form, t_p = (2p - 1) / sqrt(2 p (1 - p)) = 4.302653 at p = 0.975
    d, lo, hi = paired_interval([4.0 - 3.0, 7.5 - 5.5, 2.0 - (-1.0)])
    t2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    assert d == 2.0 and t2 == pytest.approx(4.302653, abs=1e-6)
    assert (lo, hi) == pytest.approx((2 - t2 / math.sqrt(3), 2 + t2 / math.sqrt(3)), abs=1e-12)
    # 5 pairs: t_{0.975, 4} = 2.776445 (t table)
    diffs = [0.01, 0.04, 0.08, 0.02, -0.01]
    m = sum(diffs) / 5
    sd = math.sqrt(sum((x - m) ** 2 for x in diffs) / 4)
    d, lo, hi = paired_interval(diffs)
    assert d == pytest.approx(0.028, abs=1e-15) and hi - d == pytest.approx(2.776445 * sd / math.sqrt(5), rel=1e-6)
    assert paired_interval([0.0, 0.0, 0.0]) == (0.0, 0.0, 0.0)
    assert paired_interval([0.5]) == (0.5, None, None)  # one pair: no interval


def make_experiment(tmp_path: Path, **kw) -> Path:
    (tmp_path / "base.yaml").write_text("tracker: none\ntoy: {y: -0.5}\n")
    spec = {"script": TOY, "config": str(tmp_path / "base.yaml"), "metric": "score", "mode": "max",
            "overrides": ["train.total_steps=4", "train.eval_interval=2", "toy.noise=0.1"],
            "seeds": [0, 1, 2], "workers": 2, "out": str(tmp_path / "cmp"), "baseline": "base",
            "arms": [{"name": "base", "overrides": ["toy.x=0.3"]},
                     {"name": "same", "overrides": ["toy.x=0.3"]},       # identical to the baseline
                     {"name": "shifted", "overrides": ["toy.x=0.8"]},    # worse by 0.5^2 on every seed
                     {"name": "crash", "overrides": ["toy.crash_at=3"]}],
            "trivial": [{"name": "origin", "overrides": ["eval_only=true", "baseline=origin"]}]} | kw
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.slow
def test_compare_table_reuse_and_failures(tmp_path, capsys):
    path = make_experiment(tmp_path)
    out = tmp_path / "cmp"
    assert sweep.main(["compare", str(path)]) == 1  # the crash arm failed: non-zero exit, table written
    rows = read_csv(out / "compare.csv")
    assert list(rows) == ["base", "same", "shifted", "crash", "origin"]
    # mean +- std (n-1) over seeds of each run's best / final score, from the runs' own metrics.jsonl
    base = np.array([scores(out / "base" / f"seed_{s}") for s in range(3)])  # (seed, evaluation)
    for col, vals in (("best", base.max(1)), ("final", base[:, -1])):
        assert float(rows["base"][f"{col}_mean"]) == pytest.approx(vals.mean(), abs=1e-12)
        assert float(rows["base"][f"{col}_std"]) == pytest.approx(vals.std(ddof=1), abs=1e-12)
    assert float(rows["base"]["best_std"]) > 0.01  # the seeds differ
    assert rows["base"]["kind"] == "baseline" and rows["base"]["d_best"] == ""
    # an arm identical to the baseline: difference exactly 0, interval exactly 0
    assert [float(rows["same"][k]) for k in ("d_best", "d_best_lo", "d_best_hi", "d_final")] == [0.0] * 4
    assert rows["same"]["reading_best"] == "n.s."
    # paired by seed: the seed's noise cancels, the difference is -(0.8 - 0.3)^2 on every seed
    for k in ("d_best", "d_best_lo", "d_best_hi", "d_final_lo", "d_final_hi"):
        assert float(rows["shifted"][k]) == pytest.approx(-0.25, abs=1e-12)
    assert rows["shifted"]["reading_final"] == "worse" and rows["shifted"]["pairs"] == "3"
    # the trivial row: one evaluation of w = (0, 0), compared with each baseline seed
    origin = scores(out / "origin")
    assert len(origin) == 1 and not (out / "origin" / "checkpoints").exists()
    assert float(rows["origin"]["best_mean"]) == origin[0] and rows["origin"]["seeds_ok"] == "1"
    d, lo, hi = paired_interval(list(origin[0] - base.max(1)))
    assert [float(rows["origin"][k]) for k in ("d_best", "d_best_lo", "d_best_hi")] == pytest.approx([d, lo, hi])
    # failed runs are reported, not dropped
    assert rows["crash"]["seeds_ok"] == "0" and rows["crash"]["status"] == "seed 0 failed; seed 1 failed; seed 2 failed"
    md = (out / "compare.md").read_text()
    assert "| crash | 0/3 |" in md and "- crash seed 1: failed: RuntimeError: toy crash at step 3" in md
    assert "| same | 3/3 |" in md and "| 0 [0, 0] |" in md
    assert (out / "compare.png").stat().st_size > 5000
    runs = list(csv.DictReader(open(out / "compare_runs.csv")))
    assert [r["status"] for r in runs].count("failed") == 3 and len(runs) == 13

    # again: the 10 finished runs are reused untouched, the 3 failed ones run again
    ok = [out / "origin"] + [out / a / f"seed_{s}" for a in ("base", "same", "shifted") for s in range(3)]
    before = {d: ((d / "sweep_run.json").stat().st_mtime_ns, (d / "sweep_run.json").read_text(),
                  (d / "metrics.jsonl").stat().st_mtime_ns) for d in ok}
    crash_before = (out / "crash" / "seed_0" / "sweep_run.json").read_text()
    capsys.readouterr()
    assert sweep.main(["compare", str(path)]) == 1
    assert "10 of 13 runs finished already" in capsys.readouterr().out
    assert {d: ((d / "sweep_run.json").stat().st_mtime_ns, (d / "sweep_run.json").read_text(),
                (d / "metrics.jsonl").stat().st_mtime_ns) for d in ok} == before
    assert (out / "crash" / "seed_0.attempt1" / "sweep_run.json").read_text() == crash_before  # kept, re-run
    assert read_csv(out / "compare.csv")["shifted"] == rows["shifted"]
    # a fourth seed (key=value overrides experiment-file keys): only its 4 runs are new
    capsys.readouterr()
    assert sweep.main(["compare", str(path), "seeds=[0,1,2,3]"]) == 1
    assert "10 of 17 runs finished already" in capsys.readouterr().out  # the 3 crash runs again + 4 new
    assert read_csv(out / "compare.csv")["base"]["seeds_ok"] == "4"


def test_compare_file_errors(tmp_path, capsys):
    path = make_experiment(tmp_path, baseline="nope")
    assert sweep.main(["compare", str(path)]) == 1
    assert "baseline 'nope' is not one of the arms ['base', 'same', 'shifted', 'crash']" in capsys.readouterr().err
    path = make_experiment(tmp_path, arms=[{"name": "a"}, {"name": "a"}])
    assert sweep.main(["compare", str(path)]) == 1
    assert "arm name 'a' used twice" in capsys.readouterr().err
    path = make_experiment(tmp_path, arms=[{"name": "a", "overide": []}])
    assert sweep.main(["compare", str(path)]) == 1
    assert "unknown config key 'arms[0].overide'" in capsys.readouterr().err
