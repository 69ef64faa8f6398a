"""configs/compare/face.yaml: loads as a `sweep.py compare` experiment, and every run it would start
(3 arms x 3 seeds + the random-embedding row) is a valid train_face.py command line."""

import train_face
from lib.config import parse_config
from lib.runs import compare_jobs, load_compare
from tests.conftest import ROOT


def test_face_comparison_file_parses_into_valid_runs(monkeypatch):
    monkeypatch.chdir(ROOT)  # the file's paths are relative to the project root, as sweep.py is run there
    cfg, out = load_compare("configs/compare/face.yaml")
    jobs = compare_jobs(cfg, out)
    assert [a.name for a in cfg.arms] == ["softmax", "arcface", "softmax_triplet"] and cfg.baseline == "softmax"
    assert cfg.seeds == [0, 1, 2] and len(jobs) == 3 * 3 + 1 and (cfg.metric, cfg.mode) == ("EER", "min")
    parsed = {}
    for arm, seed, cmd, run_dir in jobs:
        args = cmd[cmd.index("train_face.py") + 1:]
        c = parse_config(train_face.FaceConfig, args)
        train_face.check_config(c)
        parsed[(arm, seed)] = c
        assert c.output_dir.endswith(str(run_dir))
    terms = {arm: c.loss.terms for (arm, _), c in parsed.items()}
    assert terms == {"random_embedding": ["softmax", "triplet"], "softmax": ["softmax"], "arcface": ["arcface"],
                     "softmax_triplet": ["softmax", "triplet"]}
    rnd = parsed[("random_embedding", None)]
    assert rnd.eval_only and rnd.baseline == "random"
    for (arm, seed), c in parsed.items():
        if seed is None:
            continue
        assert c.seed == seed and c.train.total_steps == 400 and c.train.eval_interval == 100
        assert c.data.train_folds == [1, 2, 3] and c.data.val_folds == [4, 5] and c.data.sampler == "pk"
        # same data, model and optimisation in every arm: only the loss keys differ
        base = parsed[("softmax", seed)]
        assert (c.data, c.model, c.optim, c.sched) == (base.data, base.model, base.optim, base.sched)
    assert parsed[("arcface", 0)].loss.scale == 32.0 and parsed[("arcface", 0)].loss.arcface_margin == 0.3
