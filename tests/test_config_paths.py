"""Relative paths: from a config file or a default -> the project root; from the command line -> the current folder."""

import os
from dataclasses import dataclass, field

import pytest

from lib.config import ROOT, PathStr, RunConfig, SubPath, build_config, parse_config, resolve_path


@dataclass
class Data:
    root: str = "tests/data/seg"  # undeclared: the name rule makes it a path
    train_img_dir: str = "train"  # beside `root`: read relative to it, not resolved
    det_file: str = ""  # beside `root`, "" stays ""
    val_pairs: PathStr = "tests/data/face/val_pairs.csv"  # declared, beside root all the same
    ann: SubPath = "ann/x.json"  # declared: never resolved


@dataclass
class Model:
    backbone_weights: str = ""  # name rule: *_weights
    mano_path: str = "weights/mano.npz"  # name rule: *_path
    variant: str = "b0"  # not a path


@dataclass
class Cfg(RunConfig):
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)


def test_file_paths_are_root_relative_wherever_the_user_stands(tmp_path, monkeypatch):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("output_dir: runs/x\nload_from: ../ckpt/best\ndata: {root: ../shared/data/camvid}\n"
                        "ensemble: [runs/a/checkpoints/best, /abs/b]\nresume: auto\n")
    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    for cwd in (ROOT, elsewhere):
        monkeypatch.chdir(cwd)
        cfg = parse_config(Cfg, ["--config", str(cfg_file)])
        assert cfg.output_dir == str(ROOT / "runs/x")
        assert cfg.load_from == str(ROOT.parent / "ckpt/best")
        assert cfg.data.root == str(ROOT.parent / "shared/data/camvid")
        assert cfg.ensemble == [str(ROOT / "runs/a/checkpoints/best"), "/abs/b"]
        assert cfg.resume == "auto" and cfg.predict == ""
        assert cfg.data.train_img_dir == "train" and cfg.data.ann == "ann/x.json" and cfg.data.det_file == ""
        assert cfg.data.val_pairs == str(ROOT / "tests/data/face/val_pairs.csv")  # default, declared PathStr
        assert cfg.model.mano_path == str(ROOT / "weights/mano.npz") and cfg.model.variant == "b0"


def test_command_line_paths_are_cwd_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(Cfg, ["output_dir=out/run1", "data.root=mydata", "model.backbone_weights=w/dino.pth",
                             "ensemble=[a,b]", "data.train_img_dir=images", "resume=runs/r/checkpoints/step_4",
                             "predict=imgs/*.jpg"])
    assert cfg.output_dir == str(tmp_path / "out/run1") and cfg.data.root == str(tmp_path / "mydata")
    assert cfg.model.backbone_weights == str(tmp_path / "w/dino.pth")
    assert cfg.ensemble == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert cfg.resume == str(tmp_path / "runs/r/checkpoints/step_4") and cfg.predict == str(tmp_path / "imgs/*.jpg")
    assert cfg.data.train_img_dir == "images"  # relative to data.root, left alone
    again = build_config(Cfg, {"output_dir": cfg.output_dir})  # absolute stays as it is (a saved config.yaml)
    assert again.output_dir == cfg.output_dir


def test_config_file_argument_falls_back_to_the_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from train_seg import SegConfig

    cfg = parse_config(SegConfig, ["--config", "configs/seg/sample.yaml"])
    assert cfg.data.root == str(ROOT / "tests/data/seg") and cfg.output_dir == str(ROOT / "runs/seg_sample")
    assert cfg.data.train_img_dir == "train"
    (tmp_path / "configs/seg").mkdir(parents=True)
    (tmp_path / "configs/seg/sample.yaml").write_text("train: {total_steps: 3}\n")  # the cwd's file wins
    assert parse_config(SegConfig, ["--config", "configs/seg/sample.yaml"]).train.total_steps == 3


def test_resolve_path_rule():
    assert resolve_path("a/../b", "/r") == "/r/b" and resolve_path("/x/y") == "/x/y"
    assert resolve_path("") == "" and resolve_path("auto") == "auto" and resolve_path("hf://m/w") == "hf://m/w"
    assert resolve_path("~/w.pth") == os.path.expanduser("~/w.pth")
    assert resolve_path("runs/x") == str(ROOT / "runs/x")
