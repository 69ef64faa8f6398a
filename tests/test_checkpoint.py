"""lib/checkpoint.py: self-describing checkpoints, best kept over a resume, one-line weight-file errors."""

import argparse
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lib.checkpoint import (BestCheckpoint, WeightFileError, add_safetensors_metadata, checkpoint_info,
                            config_diff, load_weights, read_state_dict)
from lib.errors import UserError
from tests.test_runtime import mini


def scores(run):
    return [json.loads(x)["score"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_checkpoints_describe_themselves(tmp_path):
    run = tmp_path / "run"
    mini(run, "train.total_steps=4", "train.eval_interval=2", "train.ckpt_interval=2", "mini.hidden=6")
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    best = checkpoint_info(run / "checkpoints" / "best")
    top = max(recs, key=lambda r: r["score"])
    assert best["step"] == top["step"] and best["metrics"]["score"] == top["score"]  # repr round-trip: exact
    assert best["metrics"]["val_loss"] == top["val_loss"]
    assert best["script"] == "mini_train.py" and best["model"] == "Sequential"
    assert best["config"]["mini"]["hidden"] == 6 and best["config"]["train"]["total_steps"] == 4
    step2 = checkpoint_info(run / "checkpoints" / "step_2")
    assert step2["step"] == 2 and step2["script"] == "mini_train.py" and step2["config"]["mini"]["hidden"] == 6
    assert step2["metrics"]["score"] == recs[0]["score"]
    # the header rewrite keeps the tensors: best (step 4 here) equals step_4's weights bit for bit
    a, b = load_file(run / "checkpoints" / "best" / "model.safetensors"), load_file(run / "checkpoints" / f"step_{top['step']}" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_add_metadata_keeps_tensors_and_alignment(tmp_path):
    path = tmp_path / "m.safetensors"
    t = {"a": torch.arange(7, dtype=torch.float16), "b": torch.randn(3, 5)}
    save_file(t, str(path), metadata={"format": "pt"})
    add_safetensors_metadata(path, {"script": "x.py", "step": 12})
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert n % 8 == 0
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "script": "x.py", "step": "12"}
    back = load_file(str(path))
    assert all(torch.equal(back[k], t[k]) for k in t)


def test_resume_then_worse_eval_keeps_the_best_weights(tmp_path):
    run = tmp_path / "run"
    common = ["train.eval_interval=2", "train.ckpt_interval=2", "mini.scores=[5.0,1.0,0.5,9.0]"]
    mini(run, *common, "train.total_steps=4")
    best = run / "checkpoints" / "best"
    saved = (best / "model.safetensors").read_bytes()
    assert json.loads((best / "trainer_state.json").read_text())["step"] == 2
    assert BestCheckpoint(run, "score", "max").restore() == 5.0
    mini(run, *common, "train.total_steps=6", "resume=auto")  # step 6 scores 0.5 < 5.0
    assert scores(run) == [5.0, 1.0, 0.5]
    assert (best / "model.safetensors").read_bytes() == saved
    assert checkpoint_info(best)["step"] == 2
    mini(run, *common, "train.total_steps=8", "resume=auto")  # step 8 scores 9.0: a new best
    assert checkpoint_info(best)["step"] == 8 and checkpoint_info(best)["metrics"]["score"] == 9.0


def test_best_checkpoint_rules(tmp_path):
    b = BestCheckpoint(tmp_path, "EER", "min")
    assert b.restore() is None and b.is_better(0.3) and not b.is_better(float("nan"))
    with pytest.raises(UserError, match=r"train.best_metric=EER is not a metric of this evaluation \(available: acc, tar\)"):
        b.update(None, None, 1, {"acc": 0.9, "tar": 0.5, "curve": [1, 2]})
    with pytest.raises(UserError, match="best_mode"):
        BestCheckpoint(tmp_path, "EER", "lowest")


def test_resume_with_a_changed_architecture_names_the_key(tmp_path, capsys):
    run = tmp_path / "run"
    mini(run, "train.total_steps=2", "train.ckpt_interval=2", "train.eval_interval=2")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        mini(run, "train.total_steps=4", "train.ckpt_interval=2", "train.eval_interval=2", "resume=auto", "mini.hidden=16")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: resume: checkpoint {run / 'checkpoints' / 'step_2'} was saved with "
                             f"mini.hidden=8, now 16 (size mismatch for 0.weight")
    assert len(err[0]) < 400


def test_config_diff():
    saved = {"model": {"variant": "b0", "stages": [1, 2]}, "optim": {"lr": 0.1}, "gone": 1}
    now = {"model": {"variant": "b2", "stages": (1, 2)}, "optim": {"lr": 0.1}, "new": 2}
    assert config_diff(saved, now) == [("model.variant", "b0", "b2"), ("gone", 1, "<absent>"), ("new", "<absent>", 2)]


def test_bad_weight_files_are_one_line(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(WeightFileError) as e:
        read_state_dict(junk)
    msg = str(e.value)
    assert msg.startswith(f"{junk} is not a weight file (cannot read weight file: UnpicklingError:")
    assert "\n" not in msg and "Please file an issue" not in msg and len(msg) < 300, msg
    pickled = tmp_path / "args.pth"
    torch.save({"args": argparse.Namespace(lr=1)}, pickled)
    with pytest.raises(WeightFileError, match=r"holds Python objects \(argparse.Namespace\)") as e:
        read_state_dict(pickled)
    assert "\n" not in str(e.value)


def test_checkpoint_of_another_script_names_it(tmp_path):
    run = tmp_path / "run"
    mini(run, "train.total_steps=2", "train.eval_interval=2", "train.ckpt_interval=2")
    other = nn.Conv2d(3, 4, 3)  # keys weight / bias: none match the MLP's 0.weight ...
    with pytest.raises(WeightFileError, match=r"none of its 4 keys match the model .*\(saved by mini_train.py, model Sequential\)"):
        load_weights(other, run / "checkpoints" / "best")

    def convert(sd):  # a model's key mapping that does not know the layout
        raise ValueError("unrecognised Conv weight layout")

    with pytest.raises(WeightFileError, match=r"unrecognised Conv weight layout \(saved by mini_train.py"):
        load_weights(other, run / "checkpoints" / "best", convert)
