from dataclasses import dataclass, field

import pytest

from lib.config import ConfigError, RunConfig, TrainConfig, build_config, load_yaml, parse_config, to_dict


@dataclass
class Sub:
    size: tuple[int, int] = (4, 5)
    names: list[str] = field(default_factory=list)


@dataclass
class Cfg(RunConfig):
    sub: Sub = field(default_factory=Sub)
    ratio: float = 0.5


def test_overrides_types_and_nesting():
    cfg = build_config(Cfg, {"sub": {"names": ["a"]}}, ["optim.lr=3e-5", "train.total_steps=7", "sub.size=[1,2]",
                                                        "sched.milestones=[10,20]", "eval_only=true", "ratio=1"])
    assert cfg.optim.lr == pytest.approx(3e-5) and isinstance(cfg.optim.lr, float)
    assert cfg.train.total_steps == 7 and cfg.sub.size == (1, 2) and cfg.sub.names == ["a"]
    assert cfg.sched.milestones == [10, 20] and cfg.eval_only is True and cfg.ratio == 1.0
    assert cfg.train.batch_size == 8  # untouched default


@pytest.mark.parametrize("override, fragment", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("nope=1", "unknown config key 'nope'"),
    ("train.total_steps=abc", "train.total_steps: expected an int"),
    ("eval_only=maybe", "eval_only: expected true/false"),
    ("mixed_precision=fp8", "mixed_precision: 'fp8' is not one of"),
    ("sub.size=[1,2,3]", "sub.size: expected 2 values"),
    ("optim.lr.x=1", "has no sub-keys"),
])
def test_bad_override_names_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        build_config(Cfg, {}, [override])


def test_unknown_yaml_key_and_missing_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  batch_sise: 3\n")
    with pytest.raises(SystemExit, match="unknown config key 'train.batch_sise'"):
        parse_config(Cfg, ["--config", str(f)])
    with pytest.raises(SystemExit, match="config file not found"):
        parse_config(Cfg, ["--config", str(tmp_path / "missing.yaml")])


def test_base_inheritance_and_round_trip(tmp_path):
    (tmp_path / "base.yaml").write_text("ratio: 0.25\ntrain: {batch_size: 3, total_steps: 9}\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrain: {batch_size: 5}\n")
    cfg = parse_config(Cfg, ["--config", str(tmp_path / "child.yaml"), "seed=4"])
    assert (cfg.ratio, cfg.train.batch_size, cfg.train.total_steps, cfg.seed) == (0.25, 5, 9, 4)
    assert load_yaml(tmp_path / "child.yaml")["train"] == {"batch_size": 5, "total_steps": 9}
    again = build_config(Cfg, to_dict(cfg))
    assert again == cfg


def test_help_lists_fields(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Cfg, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "optim.lr" in out and "sub.size" in out and "= 0.001" in out


@dataclass
class Term:
    weight: float = 0.0
    temperature: float = 1.0


@dataclass
class NestedCfg(RunConfig):
    kl: Term = field(default_factory=lambda: Term(temperature=4.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(best_metric="mpjpe", best_mode="min"))


def test_nested_default_factory_values_survive_partial_sections():
    cfg = build_config(NestedCfg, {"kl": {"weight": 1.0}, "train": {"total_steps": 5}})
    assert (cfg.kl.weight, cfg.kl.temperature) == (1.0, 4.0)
    assert (cfg.train.total_steps, cfg.train.best_metric, cfg.train.best_mode) == (5, "mpjpe", "min")
    cfg = build_config(NestedCfg, {}, ["kl.weight=2", "train.batch_size=2"])
    assert (cfg.kl.temperature, cfg.train.best_metric, cfg.train.batch_size) == (4.0, "mpjpe", 2)


def test_string_keys_keep_command_line_text_and_yaml_booleans_map_to_choices():
    cfg = build_config(RunConfig, {"tracker": "none"}, ["mixed_precision=no", "baseline=yes", "resume=auto"])
    assert (cfg.mixed_precision, cfg.baseline, cfg.resume) == ("no", "yes", "auto")
    assert build_config(RunConfig, {"mixed_precision": False}).mixed_precision == "no"  # YAML `mixed_precision: no`
    assert build_config(RunConfig, {}, ["export='onnx'"]).export == "onnx"


def test_accelerate_settings_default_unset():
    cfg = RunConfig()
    assert cfg.mixed_precision == "" and cfg.train.grad_accum_steps == 0
