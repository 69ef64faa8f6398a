"""--help shows the values a run would use (true nested defaults), the Literal choices and the comment beside each field."""

import re

import pytest
import yaml

from lib.config import ROOT, build_config, parse_config, to_dict

LINE = re.compile(r"^  (\S+)\s+(.*?)\s+= (.*?)(?:  \[(file|cli)\])?(?:  # (.*))?$")
SCRIPTS = [("train_seg", "SegConfig"), ("train_face", "FaceConfig"), ("train_pose", "PoseConfig"),
           ("train_hand", "HandConfig")]


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:  # a section (dict-valued keys such as backbone_kwargs default to {})
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def help_rows(cls, argv, capsys) -> dict:
    """{key: (type, value, tag, comment)} parsed back from the --help output."""
    with pytest.raises(SystemExit) as e:
        parse_config(cls, [*argv, "--help"])
    assert e.value.code == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        m = LINE.match(line)
        if m:
            key, tp, value, tag, note = m.groups()
            rows[key] = (tp, yaml.safe_load(value), tag, note)
    return rows


@pytest.mark.parametrize("script, name", SCRIPTS)
def test_help_values_equal_the_dataclass_defaults(script, name, capsys):
    cls = getattr(__import__(script), name)
    rows = help_rows(cls, [], capsys)
    want = flat(to_dict(build_config(cls)))  # the defaults, relative paths made absolute (project root)
    raw = flat(to_dict(cls()))
    assert set(rows) == set(want) and len(rows) > 60
    for key, (_, value, tag, _) in rows.items():
        assert value == want[key], key
        assert tag is None
        if value != raw[key]:  # only path keys differ from the class default: resolved against the project root
            assert value == str(ROOT / raw[key]), key


def test_help_seg_true_nested_defaults_choices_and_comments(capsys):
    from train_seg import SegConfig

    rows = help_rows(SegConfig, [], capsys)
    assert rows["kd.kl.temperature"][1] == 4.0 and rows["kd.at.stages"][1] == [0, 1, 2, 3]
    assert rows["optim.name"][0] == "adamw|adam|sgd|radam" and rows["mixed_precision"][0] == "''|no|fp16|bf16"
    assert rows["train.batch_size"][0] == "int >= 1" and rows["optim.lr"][0] == "float > 0"
    assert rows["mixed_precision"][1] == "" and rows["train.grad_accum_steps"][1] == 0
    assert rows["train.clip_grad_norm"][3] == "0 = off"
    assert rows["resume"][3] == '"" | auto | path to checkpoints/step_<N>'
    assert rows["optim.lr"][3] is None  # no comment beside the field: no description


def test_help_hand_nested_default_factory(capsys):
    from train_hand import HandConfig

    rows = help_rows(HandConfig, [], capsys)
    assert rows["train.best_metric"][1] == "mpjpe" and rows["train.best_mode"][1] == "min"
    assert rows["model.backbone"][0].startswith("vit_small_patch14_dinov2|vit_base_patch14_dinov2")
    assert rows["model.handec.dropout_warmup_step"][3] == "p = 0 before this optimizer step (epoch, train.unit=epoch)"


def test_help_with_config_file_shows_and_tags_its_values(tmp_path, capsys):
    from train_seg import SegConfig

    (tmp_path / "c.yaml").write_text("_base_: " + str(ROOT / "configs/seg/sample.yaml") + "\n"
                                     "kd: {kl: {weight: 0.5}}\ntrain: {batch_size: 3}\n")
    rows = help_rows(SegConfig, ["--config", str(tmp_path / "c.yaml"), "optim.lr=2e-5", "seed=7"], capsys)
    assert rows["train.batch_size"][1:3] == (3, "file") and rows["train.total_steps"][1:3] == (40, "file")
    assert rows["kd.kl.weight"][1:3] == (0.5, "file") and rows["kd.kl.temperature"][1:3] == (4.0, None)
    assert rows["optim.lr"][1:3] == (2e-5, "cli") and rows["seed"][1:3] == (7, "cli")
    assert rows["data.root"][1:3] == (str(ROOT / "tests/data/seg"), "file")
    assert rows["ema.decay"][2] is None and rows["optim.weight_decay"][1:3] == (0.01, "file")
