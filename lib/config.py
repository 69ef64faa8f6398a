"""Typed config: dataclasses <- YAML file <- dotted `key=value` overrides from the command line.

    cfg = parse_config(SegConfig)            # reads sys.argv: --config f.yaml a.b=1 c=[1,2]
    cfg = parse_config(SegConfig, ["--config", "f.yaml", "optim.lr=3e-5"])

A YAML file may start from another one with `_base_: other.yaml` (path relative to the file).
Every error (unknown key, wrong type, missing file) is a `ConfigError` whose message names the
key or path; `parse_config` turns it into a one-line exit. `--help` prints every field with its
default value.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """Bad config: message names the key or file."""


# ----------------------------------------------------------------------------- shared sections
@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd", "radam"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    fused: bool = True  # fused CUDA kernels when the params are on a GPU
    head_lr_mult: float = 1.0  # lr multiplier of parameters under the model's head (model.head_prefixes)
    backbone_lr_mult: float = 1.0  # lr multiplier of all other parameters
    no_decay_norm_bias: bool = True  # no weight decay on norms, biases, pos-embeds, tokens
    scale_lr_with_batch: bool = False  # lr *= global_batch / base_batch_size (linear scaling rule)
    base_batch_size: int = 256


@dataclass
class ScheduleConfig:
    """A factor in [0, 1] of a base value, as a pure function of the step (see lib/schedules.py)."""

    name: Literal["constant", "step", "multistep", "cosine", "sgdr", "poly", "linear"] = "cosine"
    warmup_steps: int = 0
    warmup_mode: Literal["linear", "hold"] = "linear"  # hold: stay at warmup_start_factor, then jump
    warmup_start_factor: float = 0.001
    min_factor: float = 0.0  # floor of the decay (cosine/sgdr/poly/linear), as a fraction of base
    power: float = 1.0  # poly
    step_size: int = 1000  # step: decay every step_size steps
    milestones: list[int] = field(default_factory=list)  # multistep
    gamma: float = 0.1  # step / multistep
    restart_period: int = 1000  # sgdr: first period T_0 (steps after warm-up)
    restart_mult: float = 1.0  # sgdr: T_mult


@dataclass
class TrainConfig:
    total_steps: int = 1000  # optimizer steps
    batch_size: int = 8  # per process; global = batch_size * processes * grad_accum_steps
    grad_accum_steps: int = 1
    clip_grad_norm: float = 0.0  # 0 = off
    eval_interval: int = 500
    ckpt_interval: int = 500
    max_keep_ckpts: int = 3  # keep the last N checkpoints/step_<N>/ folders
    log_interval: int = 10
    best_metric: str = ""  # e.g. mIoU; "" = first metric the eval returns
    best_mode: Literal["max", "min"] = "max"
    num_workers: int = 2
    check_finite: bool = True  # stop at the first NaN/inf loss, naming step and loss


@dataclass
class EMAConfig:
    decay: float = 0.0  # exponential moving average of the weights; 0 = off (e.g. 0.9999)
    start_step: int = 0  # copy the raw weights until this optimizer step, then average
    eval: bool = True  # also evaluate (and keep best of) the EMA weights


@dataclass
class RunConfig:
    """Top-level fields shared by every training script; scripts subclass it."""

    output_dir: str = "runs/default"
    seed: int = 0
    resume: str = ""  # "" | auto | path to checkpoints/step_<N>
    load_from: str = ""  # weights only (fine-tuning / eval): .safetensors, .pth, or a checkpoint folder
    eval_only: bool = False
    ensemble: list[str] = field(default_factory=list)  # eval_only: average predictions of these checkpoints
    overwrite: bool = False  # start afresh in an output_dir that holds an earlier run (deletes it)
    predict: str = ""  # image, folder or glob: write predictions of load_from's model to output_dir/predict
    export: Literal["", "onnx", "safetensors"] = ""  # write the inference model of load_from to output_dir/export
    baseline: str = ""  # eval_only: a trivial predictor through the same eval path (seg majority, pose/hand mean_pose, face random)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    tracker: Literal["tensorboard", "wandb", "aim", "mlflow", "none"] = "tensorboard"
    compile: bool = False  # torch.compile the model
    tf32: bool = True  # TF32 matmuls/convs on Ampere+ GPUs
    channels_last: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)


# ----------------------------------------------------------------------------- type checking
def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if isinstance(value, str):  # "[1,2]" from the command line
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls, data: dict, prefix: str = ""):
    """Dataclass `cls` from defaults updated by `data` (nested dicts); unknown keys are errors."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], prefix + f.name)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) of a config dataclass, e.g. for YAML."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict:
    """Read a config YAML, following `_base_` (a path or list of paths relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    bases = data.pop("_base_", [])
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, load_yaml(path.parent / b))
    return _merge(merged, data)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    d = data
    for k in keys[:-1]:
        if not isinstance(d.get(k), dict):
            d[k] = {}
        d = d[k]
    d[keys[-1]] = value


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def build_config(cls, data: dict | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """Config of type `cls` from a dict (e.g. a loaded YAML) and `key=value` override strings."""
    data = _merge({}, data or {})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, text = item.split("=", 1)
        _check_path(cls, key)
        _set_dotted(data, key, _parse_value(text))
    return _build(cls, data)


def _check_path(cls, dotted: str) -> None:
    tp, done = cls, []
    for k in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"unknown config key '{dotted}' ('{'.'.join(done)}' has no sub-keys)")
        hints = _hints(tp)
        if k not in hints:
            raise ConfigError(f"unknown config key '{dotted}'")
        done.append(k)
        tp = hints[k]


def help_text(cls, prefix: str = "") -> str:
    lines = []
    default = cls()
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        v = getattr(default, f.name)
        if dataclasses.is_dataclass(v):
            lines.append(help_text(type(v), prefix + f.name + "."))
        else:
            tp = hints[f.name]
            tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
            lines.append(f"  {prefix + f.name:<40} {tname:<28} = {v!r}")
    return "\n".join(lines)


def parse_config(cls, argv: list[str] | None = None, doc: str = ""):
    """Parse `--config FILE key=value ...` into `cls`; print help / one-line errors and exit."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print((doc.strip() + "\n\n") if doc else "", end="")
        print("usage: --config FILE.yaml [key=value ...]\n\nconfig keys (type = default):")
        print(help_text(cls))
        raise SystemExit(0)
    data, overrides, i = {}, [], 0
    try:
        while i < len(argv):
            a = argv[i]
            if a == "--config":
                if i + 1 >= len(argv):
                    raise ConfigError("--config needs a file path")
                data = load_yaml(argv[i + 1])
                i += 2
                continue
            if a.startswith("--config="):
                data = load_yaml(a.split("=", 1)[1])
            elif a.startswith("--"):
                raise ConfigError(f"unknown option {a} (use --config FILE and key=value)")
            else:
                overrides.append(a)
            i += 1
        return build_config(cls, data, overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
