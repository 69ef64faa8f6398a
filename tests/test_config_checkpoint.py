"""load_from=FOLDER (or ensemble=[FOLDER, ...]) without --config starts from the folder's config.yaml."""

import yaml

import pytest

from lib.config import ROOT, parse_config, save_config, build_config
from train_seg import SegConfig


@pytest.fixture
def run_folder(tmp_path):
    """A finished run as the scripts leave it: config.yaml beside checkpoints/best (+ a copy inside best)."""
    run = tmp_path / "old_run"
    best = run / "checkpoints" / "best"
    best.mkdir(parents=True)
    saved = build_config(SegConfig, {}, [f"output_dir={run}", "model.variant=b1", "kd.kl.weight=0.5",
                                         "train.batch_size=3", "resume=auto", "data.scale=[320,240]"])
    save_config(saved, run / "config.yaml")
    save_config(saved, best / "config.yaml")
    return run, best


def test_load_from_folder_is_the_base_config(run_folder, monkeypatch, tmp_path):
    run, best = run_folder
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(SegConfig, ["load_from=old_run/checkpoints/best", "eval_only=true", "train.batch_size=1"])
    assert (cfg.model.variant, cfg.kd.kl.weight, cfg.kd.kl.temperature, cfg.data.scale) == ("b1", 0.5, 4.0, (320, 240))
    assert cfg.train.batch_size == 1 and cfg.eval_only is True  # overrides win
    assert cfg.load_from == str(best)
    assert cfg.output_dir == str(ROOT / "runs/default") and cfg.resume == ""  # run-action keys back at their defaults
    cfg = parse_config(SegConfig, [f"load_from={best}", f"output_dir={tmp_path / 'new'}"])
    assert cfg.output_dir == str(tmp_path / "new") and cfg.model.variant == "b1"


def test_run_config_two_levels_up_and_ensemble(run_folder, tmp_path):
    run, best = run_folder
    (best / "config.yaml").unlink()  # an older checkpoint: the run's config.yaml describes it
    step = run / "checkpoints" / "step_4"
    step.mkdir()
    cfg = parse_config(SegConfig, [f"ensemble=[{step},{best}]", "eval_only=true"])
    assert cfg.model.variant == "b1" and cfg.ensemble == [str(step), str(best)] and cfg.load_from == ""


def test_explicit_config_wins_and_plain_weights_file(run_folder, tmp_path):
    run, best = run_folder
    cfg = parse_config(SegConfig, ["--config", str(ROOT / "configs/seg/sample.yaml"), f"load_from={best}"])
    assert cfg.model.variant == "b0" and cfg.train.total_steps == 40
    (tmp_path / "w.safetensors").write_bytes(b"x")
    cfg = parse_config(SegConfig, [f"load_from={tmp_path / 'w.safetensors'}"])
    assert cfg.model.variant == "b0" and cfg.train.batch_size == SegConfig().train.batch_size


def test_help_tags_the_checkpoint_values(run_folder, capsys):
    run, best = run_folder
    with pytest.raises(SystemExit):
        parse_config(SegConfig, [f"load_from={best}", "--help"])
    out = capsys.readouterr().out
    assert f"[file] = set by {best / 'config.yaml'}" in out
    line = next(x for x in out.splitlines() if x.startswith("  model.variant "))
    assert line.split("= ", 1)[1].startswith("b1  [file]")
    assert yaml.safe_load(next(x for x in out.splitlines() if x.startswith("  load_from ")).split("= ", 1)[1]
                          .split("  ")[0]) == str(best)
