"""train.unit=epoch: resolve_units turns the epoch counts into optimizer steps, once, on a copy."""

import pytest

from lib.config import ConfigError, RunConfig, build_config, resolve_units


def test_epochs_become_steps():
    cfg = build_config(RunConfig, {"train": {"unit": "epoch", "total_steps": 10, "eval_interval": 2, "ckpt_interval": 5,
                                             "log_interval": 7},
                                   "sched": {"name": "multistep", "warmup_steps": 1, "milestones": [7, 9],
                                             "step_size": 3, "t_max": 0, "restart_period": 4},
                                   "ema": {"start_step": 11}})
    out = resolve_units(cfg, steps_per_epoch=25)
    t, s = out.train, out.sched
    assert (t.unit, t.total_steps, t.eval_interval, t.ckpt_interval) == ("step", 250, 50, 125)
    assert (s.warmup_steps, s.milestones, s.step_size, s.t_max, s.restart_period) == (25, [175, 225], 75, 0, 100)
    assert t.log_interval == 7 and out.ema.start_step == 11  # always steps
    assert cfg.train.unit == "epoch" and cfg.train.total_steps == 10 and cfg.sched.milestones == [7, 9]  # a copy
    assert resolve_units(out, 25) == out  # idempotent: already steps


def test_extra_script_keys_at_any_depth():
    from train_hand import HandConfig

    cfg = build_config(HandConfig, {}, ["train.unit=epoch", "model.handec.dropout_warmup_step=3", "sched.warmup_steps=2"])
    out = resolve_units(cfg, 7, extra=("model.handec.dropout_warmup_step",))
    assert (out.model.handec.dropout_warmup_step, out.sched.warmup_steps) == (21, 14)
    assert resolve_units(cfg, 7).model.handec.dropout_warmup_step == 3  # not listed: unchanged


def test_step_unit_is_unchanged_copy():
    cfg = build_config(RunConfig, {}, ["sched.t_max=30", "train.total_steps=40"])
    out = resolve_units(cfg, 100)
    assert out == cfg and out is not cfg and (out.sched.t_max, out.train.total_steps) == (30, 40)


def test_bad_unit_and_empty_epoch():
    with pytest.raises(ConfigError, match=r"train.unit: 'epochs' is not one of \['step', 'epoch'\]"):
        build_config(RunConfig, {}, ["train.unit=epochs"])
    with pytest.raises(ConfigError, match="an epoch has 0 optimizer steps"):
        resolve_units(build_config(RunConfig, {}, ["train.unit=epoch"]), 0)
