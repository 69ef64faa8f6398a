"""Every numeric key with a range refuses values outside it (and NaN / inf) in one line naming key and range."""

import math
from dataclasses import dataclass, field
from typing import Annotated

import pytest

from lib.config import ConfigError, Frac, PosInt, Range, RunConfig, build_config, parse_config, to_dict
from lib.errors import UserError


@dataclass
class Toy:
    ratio: float = 0.5  # a plain float: any finite number
    count: PosInt = 3
    keep: Frac = 0.5
    scale: Annotated[float, Range(gt=0, finite=False)] = 1.0
    cap: float = math.inf  # a non-finite default: inf / nan allowed


@dataclass
class Cfg(RunConfig):
    toy: Toy = field(default_factory=Toy)


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "train.batch_size: 0 is out of range (must be >= 1)"),
    ("optim.lr=nan", "optim.lr: nan is out of range (must be a finite number > 0)"),
    ("optim.lr=0", "optim.lr: 0.0 is out of range (must be a finite number > 0)"),
    ("optim.lr=inf", "optim.lr: inf is out of range (must be a finite number > 0)"),
    ("optim.weight_decay=-0.1", "optim.weight_decay: -0.1 is out of range (must be a finite number >= 0)"),
    ("optim.betas=[0.9,1.0]", "optim.betas[1]: 1.0 is out of range (must be a finite number in [0, 1))"),
    ("optim.momentum=1.5", "optim.momentum: 1.5 is out of range (must be a finite number in [0, 1])"),
    ("sched.warmup_start_factor=-1", "sched.warmup_start_factor: -1.0 is out of range (must be a finite number in [0, 1])"),
    ("sched.milestones=[10,-2]", "sched.milestones[1]: -2 is out of range (must be >= 0)"),
    ("sched.eta_min=-1e-6", "sched.eta_min: -1e-06 is out of range (must be a finite number >= 0)"),
    ("sched.restart_mult=0.5", "sched.restart_mult: 0.5 is out of range (must be a finite number >= 1)"),
    ("sched.step_size=0", "sched.step_size: 0 is out of range (must be >= 1)"),
    ("train.eval_interval=0", "train.eval_interval: 0 is out of range (must be >= 1)"),
    ("train.grad_accum_steps=-1", "train.grad_accum_steps: -1 is out of range (must be >= 0)"),
    ("ema.decay=1", "ema.decay: 1.0 is out of range (must be a finite number in [0, 1))"),
    ("seed=-3", "seed: -3 is out of range (must be >= 0)"),
    ("toy.ratio=nan", "toy.ratio: nan is out of range (must be a finite number)"),
    ("toy.ratio=-inf", "toy.ratio: -inf is out of range (must be a finite number)"),
    ("toy.count=0", "toy.count: 0 is out of range (must be >= 1)"),
    ("toy.keep=1.01", "toy.keep: 1.01 is out of range (must be a finite number in [0, 1])"),
    ("toy.scale=-1", "toy.scale: -1.0 is out of range (must be > 0)"),
])
def test_out_of_range_is_one_line_naming_key_and_range(override, message):
    with pytest.raises(ConfigError) as e:
        build_config(Cfg, {}, [override])
    assert str(e.value) == message
    with pytest.raises(SystemExit) as e:  # the script's exit line
        parse_config(Cfg, [override])
    assert str(e.value.code) == "config error: " + message and "\n" not in str(e.value.code)


def test_in_range_values_and_allowed_non_finite():
    cfg = build_config(Cfg, {"sched": {"eta_min": 0.0}}, [
        "train.batch_size=1", "optim.lr=1e-9", "optim.betas=[0.0,0.999]", "sched.warmup_start_factor=1",
        "ema.decay=0.9999", "toy.scale=inf", "toy.cap=nan", "train.grad_accum_steps=0", "sched.eta_min=null"])
    assert (cfg.train.batch_size, cfg.optim.lr, cfg.optim.betas, cfg.sched.warmup_start_factor) == (1, 1e-9, (0.0, 0.999), 1.0)
    assert cfg.toy.scale == math.inf and math.isnan(cfg.toy.cap) and cfg.sched.eta_min is None
    assert build_config(Cfg, {"sched": {"eta_min": 1e-5}}).sched.eta_min == 1e-5


def test_yaml_nan_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  lr: .nan\n")
    with pytest.raises(SystemExit, match=r"^config error: optim.lr: nan is out of range \(must be a finite number > 0\)$"):
        parse_config(Cfg, ["--config", str(tmp_path / "c.yaml")])


def test_config_error_is_a_user_error_and_a_value_error():
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("script, name", [("train_seg", "SegConfig"), ("train_face", "FaceConfig"),
                                          ("train_pose", "PoseConfig"), ("train_hand", "HandConfig")])
def test_script_defaults_are_inside_their_ranges(script, name):
    cls = getattr(__import__(script), name)
    assert to_dict(build_config(cls, to_dict(cls()))) == to_dict(build_config(cls))
