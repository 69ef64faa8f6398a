"""Typed config: dataclasses <- YAML file <- dotted `key=value` overrides from the command line.

    cfg = parse_config(SegConfig)            # reads sys.argv: --config f.yaml a.b=1 c=[1,2]
    cfg = parse_config(SegConfig, ["--config", "f.yaml", "optim.lr=3e-5"])

A YAML file may start from another one with `_base_: other.yaml` (path relative to the file).
Every error (unknown key, wrong type, out-of-range value, missing file) is a `ConfigError` (a
`lib.errors.UserError`) whose message names the key or path; `parse_config` turns it into a
one-line exit. `--help` prints every key with its type, the value the run would use (with
`--config FILE` / overrides: the values they set, tagged [file] / [cli]) and the comment written
beside the field in the source.

Ranges. A field declares its valid range in its type; a value outside it (and NaN / inf for any
float field, unless allowed) is refused, naming the key and the range:

    batch_size: PosInt = 8                         # int >= 1
    lr: PosFloat = 1e-3                            # finite float > 0
    weight_decay: NonNegFloat = 0.01               # finite float >= 0
    flip_prob: Frac = 0.5                          # finite float in [0, 1]
    betas: tuple[Annotated[float, Range(ge=0, lt=1)], Annotated[float, Range(ge=0, lt=1)]] = (0.9, 0.999)
    scale: Annotated[float, Range(finite=False)] = math.inf   # NaN / inf accepted (so is any
                                                   # float field whose default is not finite)

Paths. Relative paths are resolved to absolute ones when the config is built, by one rule:
  - written in a config file (or a field default): relative to the project root, the folder that
    holds lib/ (wherever the user stands), e.g. `data.root: tests/data/seg`;
  - given on the command line (`load_from=runs/x/checkpoints/best`, also the `--config FILE`
    path itself): relative to the current folder, as for any shell argument (`--config` falls
    back to the project root when no such file is there).
"", "auto" and URLs (`scheme://...`) are left as they are. A path-valued field is declared by
its type: `PathStr` (or `list[PathStr]`); `SubPath` marks a string that names a path under
another key (e.g. seg's `data.train_img_dir`, relative to `data.root`) and is never resolved.
Undeclared fields of a RunConfig follow a name rule (until declared): keys named root, *_dir,
*_file, *_path, *_pairs, weights, *_weights are paths, except those in a section that also has a
`root` key (the data code reads those relative to that root).

A checkpoint folder holding config.yaml describes its run: `load_from=FOLDER` (or
`ensemble=[FOLDER, ...]`) without `--config` starts from FOLDER/config.yaml (or the run's
config.yaml two levels up), with the run-action keys (output_dir, resume, load_from, ensemble,
eval_only, predict, export, baseline, overwrite) back at their defaults before the overrides.

Units. `train.unit=epoch` makes train.total_steps / eval_interval / ckpt_interval and
sched.warmup_steps / step_size / milestones / t_max / restart_period (and a script's own schedule
keys, e.g. hand's model.handec.dropout_warmup_step) count epochs; `resolve_units(cfg, steps_per_epoch,
extra)` turns them into optimizer steps once the loader is built. ema.start_step is always steps.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import io
import math
import os
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml

from lib.errors import UserError

ROOT = Path(__file__).resolve().parents[1]  # the project root: relative paths in config files start here


class ConfigError(UserError, ValueError):
    """Bad config: message names the key or file."""


# ----------------------------------------------------------------------------- field markers
@dataclass(frozen=True)
class Range:
    """Valid range of a numeric field: `Annotated[int, Range(ge=1)]`; floats must also be finite."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = True  # floats: refuse NaN / inf

    def ok(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v) and self.finite:
            return False
        if isinstance(v, float) and math.isnan(v):
            return True  # allowed NaN: no bounds to compare
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def describe(self, is_float: bool) -> str:
        """e.g. ">= 1", "in [0, 1)", "a finite number > 0"."""
        lo = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else ""
        hi = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else ""
        if lo and hi:
            text = f"in {lo}, {hi}"
        elif lo:
            text = (">= " if lo[0] == "[" else "> ") + lo[1:]
        elif hi:
            text = ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
        else:
            text = ""
        return ("a finite number " + text).strip() if is_float and self.finite else text


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


@dataclass(frozen=True)
class _PathMark:
    is_path: bool


PosInt = Annotated[int, Range(ge=1)]
NonNegInt = Annotated[int, Range(ge=0)]
PosFloat = Annotated[float, Range(gt=0)]
NonNegFloat = Annotated[float, Range(ge=0)]
Frac = Annotated[float, Range(ge=0, le=1)]
PathStr = Annotated[str, _PathMark(True)]  # resolved: relative to the project root (file) / cwd (command line)
SubPath = Annotated[str, _PathMark(False)]  # a path under another key (e.g. data.root): never resolved
Beta = Annotated[float, Range(ge=0, lt=1)]


# ----------------------------------------------------------------------------- shared sections
@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd", "radam"] = "adamw"
    lr: PosFloat = 1e-3
    weight_decay: NonNegFloat = 0.01
    betas: tuple[Beta, Beta] = (0.9, 0.999)  # adam / adamw / radam
    eps: PosFloat = 1e-8
    momentum: Frac = 0.9  # sgd
    nesterov: bool = False  # sgd
    fused: bool = True  # fused CUDA kernels when the params are on a GPU
    head_lr_mult: NonNegFloat = 1.0  # lr multiplier of parameters under the model's head (model.head_prefixes)
    backbone_lr_mult: NonNegFloat = 1.0  # lr multiplier of all other parameters
    no_decay_norm_bias: bool = True  # no weight decay on norms, biases, pos-embeds, tokens
    scale_lr_with_batch: bool = False  # lr *= global_batch / base_batch_size (linear scaling rule)
    base_batch_size: PosInt = 256  # global batch the configured lr was tuned for (scale_lr_with_batch)


@dataclass
class ScheduleConfig:
    """A factor of a base value, as a pure function of the step (see lib/schedules.py)."""

    name: Literal["constant", "step", "multistep", "cosine", "sgdr", "poly", "linear"] = "cosine"
    warmup_steps: NonNegInt = 0  # the factor is multiplied by the warm-up ramp during these first steps
    warmup_mode: Literal["linear", "hold"] = "linear"  # hold: stay at warmup_start_factor, then jump
    warmup_start_factor: Frac = 0.001  # warm-up starts at this fraction of the value
    min_factor: Frac = 0.0  # floor of the decay (cosine/sgdr/poly/linear), as a fraction of base
    eta_min: NonNegFloat | None = None  # absolute floor of the lr (torch eta_min); overrides min_factor when set
    t_max: NonNegInt = 0  # cosine/linear/poly period in steps (0 = total_steps); past it the cosine rises again, as torch's
    power: PosFloat = 1.0  # poly
    step_size: PosInt = 1000  # step: decay every step_size steps
    milestones: list[NonNegInt] = field(default_factory=list)  # multistep
    gamma: PosFloat = 0.1  # step / multistep: factor per decay
    restart_period: PosInt = 1000  # sgdr: first period T_0 (steps from step 0)
    restart_mult: Annotated[float, Range(ge=1)] = 1.0  # sgdr: T_mult


@dataclass
class TrainConfig:
    unit: Literal["step", "epoch"] = "step"  # unit of total_steps, eval/ckpt_interval and the sched.* step counts
    total_steps: PosInt = 1000  # optimizer steps (or epochs, train.unit=epoch)
    batch_size: PosInt = 8  # per process; global = batch_size * processes * gradient accumulation steps
    grad_accum_steps: NonNegInt = 0  # 0 = accelerate's setting (accelerate launch / accelerate config; default 1)
    clip_grad_norm: NonNegFloat = 0.0  # 0 = off
    eval_interval: PosInt = 500  # evaluate every this many steps (and at the end)
    ckpt_interval: PosInt = 500  # full checkpoint every this many steps (and at the end)
    max_keep_ckpts: NonNegInt = 3  # keep the last N checkpoints/step_<N>/ folders (0 = all)
    log_interval: PosInt = 10  # console / train.jsonl line every this many steps
    best_metric: str = ""  # e.g. mIoU; "" = first metric the eval returns
    best_mode: Literal["max", "min"] = "max"  # max: higher best_metric is better
    num_workers: NonNegInt = 2  # data loader processes per training process
    check_finite: bool = True  # stop at the first NaN/inf loss, naming step and loss


@dataclass
class EMAConfig:
    decay: Beta = 0.0  # exponential moving average of the weights; 0 = off (e.g. 0.9999)
    start_step: NonNegInt = 0  # copy the raw weights until this optimizer step, then average
    eval: bool = True  # also evaluate (and keep best of) the EMA weights


@dataclass
class RunConfig:
    """Top-level fields shared by every training script; scripts subclass it."""

    output_dir: PathStr = "runs/default"  # run folder: config.yaml, metrics.jsonl, checkpoints/
    seed: NonNegInt = 0  # seeds python, numpy, torch (+ process index) and the data order
    resume: PathStr = ""  # "" | auto | path to checkpoints/step_<N>
    load_from: PathStr = ""  # weights only (fine-tuning / eval): .safetensors, .pth, or a checkpoint folder
    eval_only: bool = False  # evaluate load_from / ensemble / the resumed model, no training
    ensemble: list[PathStr] = field(default_factory=list)  # eval_only: average predictions of these checkpoints
    overwrite: bool = False  # start afresh in an output_dir that holds an earlier run (deletes it)
    predict: PathStr = ""  # image, folder or glob: write predictions of load_from's model to output_dir/predict
    export: Literal["", "onnx", "safetensors"] = ""  # write the inference model of load_from to output_dir/export
    baseline: str = ""  # eval_only: a trivial predictor through the same eval path (seg majority, pose/hand mean_pose, face random)
    mixed_precision: Literal["", "no", "fp16", "bf16"] = ""  # "" = accelerate's setting (accelerate launch --mixed_precision / accelerate config)
    tracker: Literal["tensorboard", "wandb", "aim", "mlflow", "none"] = "tensorboard"  # metric logger of the run
    project: str = ""  # tracker project / experiment name ("" = the script's task name)
    run_name: str = ""  # tracker run name ("" = the output_dir folder name)
    compile: bool = False  # torch.compile the model
    tf32: bool = True  # TF32 matmuls/convs on Ampere+ GPUs
    channels_last: bool = False  # channels-last memory format for conv models
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)


RUN_ACTION_KEYS = ("output_dir", "resume", "load_from", "ensemble", "eval_only", "predict", "export",
                   "baseline", "overwrite")  # reset when a checkpoint's config.yaml is the base


# ----------------------------------------------------------------------------- type checking
def _split_annotated(tp: Any) -> tuple[Any, tuple]:
    """(type without Annotated, its markers)."""
    if typing.get_origin(tp) is Annotated:
        args = typing.get_args(tp)
        return args[0], tuple(args[1:])
    return tp, ()


def _plain(tp: Any) -> Any:
    """The dataclass / container type behind Annotated and Optional (for walking key paths)."""
    tp, _ = _split_annotated(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _plain(args[0])
    return tp


def _check_range(v: Any, tp: Any, marks: tuple, key: str, nonfinite_ok: bool) -> None:
    is_float = tp is float
    ranges = [m for m in marks if isinstance(m, Range)]
    if is_float and not math.isfinite(v) and not nonfinite_ok and all(r.finite for r in ranges):
        desc = ranges[0].describe(True) if ranges else "a finite number"
        raise ConfigError(f"{key}: {v!r} is out of range (must be {desc})")
    for r in ranges:
        if not r.ok(v) and not (nonfinite_ok and is_float and not math.isfinite(v)):
            raise ConfigError(f"{key}: {v!r} is out of range (must be {r.describe(is_float)})")


def _coerce(value: Any, tp: Any, key: str, base: Any = None, nonfinite_ok: bool = False) -> Any:
    """Return `value` converted to type `tp`, or raise ConfigError naming `key`.

    `base`: the default of a nested dataclass field, which a mapping updates (so a
    `default_factory=lambda: KDTerm(temperature=4.0)` keeps 4.0 when only `weight` is given).
    """
    tp, marks = _split_annotated(tp)
    if marks:
        ranged = any(isinstance(m, Range) for m in marks)  # the range check below then refuses NaN / inf
        out = _coerce(value, tp, key, base, nonfinite_ok or ranged)
        if isinstance(out, (int, float)) and not isinstance(out, bool):
            _check_range(out, tp, marks, key, nonfinite_ok)
        return out
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
            sub = _plain(a)
            sub_base = base if dataclasses.is_dataclass(sub) and isinstance(base, sub) else None
            try:
                return _coerce(value, a, key, sub_base, nonfinite_ok)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and value not in choices:  # YAML 1.1 reads no / yes / off / on as booleans
            value = next((c for c in choices if isinstance(c, str) and c.lower() in (
                ("true", "yes", "on") if value else ("false", "no", "off"))), value)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, prefix=key + ".", base=base if isinstance(base, tp) else None)
    if origin in (list, tuple):
        if isinstance(value, str):  # "[1,2]" from the command line
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]", None, nonfinite_ok) for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]", None, nonfinite_ok) for i, v in enumerate(value)]
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
        out = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-5" as a string
            try:
                out = float(value)
            except ValueError:
                pass
        if out is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(out) and not nonfinite_ok:
            raise ConfigError(f"{key}: {out!r} is out of range (must be a finite number)")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _hints(cls) -> dict[str, Any]:
    """Field types of a dataclass, with their Annotated markers (ranges, paths)."""
    return typing.get_type_hints(cls, include_extras=True)


def _nonfinite_default(f: dataclasses.Field) -> bool:
    d = f.default
    return isinstance(d, float) and not math.isfinite(d)


def _build(cls, data: dict, prefix: str = "", base=None):
    """Dataclass `cls` from `base` (default: cls()) updated by `data` (nested dicts); unknown keys are errors."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}' (known: {', '.join(sorted(names))})")
    base = cls() if base is None else base
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], prefix + f.name, getattr(base, f.name),
                                     _nonfinite_default(f))
    return dataclasses.replace(base, **kwargs) if kwargs else base


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


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1} (dotted keys of a nested config dict; empty dicts stay as values)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _merge(base: dict, over: dict) -> dict:
    """`base` updated by `over`, recursively; a new dict that shares no nested dict or list with either."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
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


def _is_text_type(tp: Any) -> bool:
    tp, _ = _split_annotated(tp)
    if tp is str:
        return True
    return typing.get_origin(tp) is Literal and all(isinstance(c, str) for c in typing.get_args(tp))


def _parse_value(text: str, tp: Any = None) -> Any:
    """A command-line value: YAML (numbers, lists, null), but the raw text for a string key
    (so `mixed_precision=no` or `resume=auto` stay strings); quote it to force YAML."""
    if tp is not None and _is_text_type(tp) and not text[:1] in ("'", '"'):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def build_config(cls, data: dict | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """Config of type `cls` from a dict (e.g. a loaded YAML) and `key=value` override strings.

    Relative paths from `data` and the defaults resolve against the project root, those from
    `overrides` against the current folder (see the module docstring)."""
    data = _merge({}, data or {})
    cli_keys = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, text = item.split("=", 1)
        tp = _check_path(cls, key)
        _set_dotted(data, key, _parse_value(text, tp))
        cli_keys.append(key)
    cfg = _build(cls, data)
    _resolve_paths(cfg, cli_keys, name_rule=isinstance(cfg, RunConfig))
    return cfg


def _check_path(cls, dotted: str) -> Any:
    """The type of dotted key `dotted` of `cls`, or ConfigError if there is no such key."""
    tp, done = cls, []
    for k in dotted.split("."):
        tp = _plain(tp)
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"unknown config key '{dotted}' ('{'.'.join(done)}' has no sub-keys)")
        hints = _hints(tp)
        if k not in hints:
            raise ConfigError(f"unknown config key '{dotted}'")
        done.append(k)
        tp = hints[k]
    return tp


# ----------------------------------------------------------------------------- paths
_PATH_NAMES = ("root", "weights")
_PATH_SUFFIXES = ("_dir", "_file", "_path", "_pairs", "_weights")


def _path_mark(tp: Any) -> bool | None:
    """True / False when the field type declares (not) a path, for str and list[str] fields; None: undeclared."""
    tp, marks = _split_annotated(tp)
    for m in marks:
        if isinstance(m, _PathMark):
            return m.is_path
    if typing.get_origin(tp) in (Union, types.UnionType, list, tuple):
        for a in typing.get_args(tp):
            if a is not type(None) and a is not Ellipsis:
                m = _path_mark(a)
                if m is not None:
                    return m
    return None


def _is_str_or_str_list(tp: Any) -> bool:
    tp = _plain(tp)
    if typing.get_origin(tp) is list:
        tp = _plain((typing.get_args(tp) or (Any,))[0])
    return tp is str


def _name_says_path(name: str, siblings: set[str]) -> bool:
    if name == "root":
        return True
    return (name in _PATH_NAMES or name.endswith(_PATH_SUFFIXES)) and "root" not in siblings


def resolve_path(value: str, base: str | Path = ROOT) -> str:
    """Absolute, normalised form of a path value; "", "auto" and URLs are returned unchanged."""
    if not isinstance(value, str) or value in ("", "auto") or "://" in value:
        return value
    p = os.path.expanduser(value)
    return os.path.normpath(p if os.path.isabs(p) else os.path.join(str(base), p))


def _resolve_paths(cfg, cli_keys: list[str], name_rule: bool, prefix: str = "") -> None:
    hints = _hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    for f in dataclasses.fields(cfg):
        key, v = prefix + f.name, getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            _resolve_paths(v, cli_keys, name_rule, key + ".")
            continue
        mark = _path_mark(hints[f.name])
        if mark is None:
            mark = name_rule and _is_str_or_str_list(hints[f.name]) and _name_says_path(f.name, names)
        if not mark:
            continue
        cli = any(key == c or key.startswith(c + ".") for c in cli_keys)
        base = os.getcwd() if cli else ROOT
        if isinstance(v, str):
            setattr(cfg, f.name, resolve_path(v, base))
        elif isinstance(v, list) and all(isinstance(x, str) for x in v):
            setattr(cfg, f.name, [resolve_path(x, base) for x in v])


# ----------------------------------------------------------------------------- units
EPOCH_KEYS = ("train.total_steps", "train.eval_interval", "train.ckpt_interval", "sched.warmup_steps",
              "sched.step_size", "sched.milestones", "sched.t_max", "sched.restart_period")


def resolve_units(cfg, steps_per_epoch: int, extra: tuple[str, ...] = ()):
    """A copy of `cfg` whose EPOCH_KEYS (+ a script's own step counts `extra`, dotted, any depth) count
    optimizer steps: when train.unit == "epoch" each is multiplied by `steps_per_epoch` and unit becomes
    "step" (so a second call changes nothing)."""
    out = copy.deepcopy(cfg)
    if out.train.unit != "epoch":
        return out
    if steps_per_epoch < 1:
        raise ConfigError(f"train.unit=epoch: an epoch has {steps_per_epoch} optimizer steps (the train set is "
                          "smaller than one batch)")
    for dotted in EPOCH_KEYS + tuple(extra):
        *path, name = dotted.split(".")
        obj = functools.reduce(getattr, path, out)
        v = getattr(obj, name)
        setattr(obj, name, [x * steps_per_epoch for x in v] if isinstance(v, list) else v * steps_per_epoch)
    out.train.unit = "step"
    return out


# ----------------------------------------------------------------------------- --help
@functools.lru_cache(maxsize=None)
def _own_comments(cls) -> dict[str, str]:
    """{field: the comment beside it} for the fields written in `cls`'s own source."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    level, pos, first, name = 0, 0, None, None  # pos: index of the token in the logical line
    try:
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            t = tok.type
            if t in (tokenize.INDENT, tokenize.DEDENT):
                level += 1 if t == tokenize.INDENT else -1
            elif t == tokenize.NEWLINE:
                pos, first, name = 0, None, None
            elif t == tokenize.COMMENT:
                if name and name not in out:
                    out[name] = tok.string.lstrip("#").strip()
            elif t != tokenize.NL:
                if pos == 0 and level == 1 and t == tokenize.NAME:
                    first = tok.string
                elif pos == 1 and first and t == tokenize.OP and tok.string == ":":
                    name = first  # `name: type = default  # comment`
                pos += 1
    except (tokenize.TokenError, IndentationError):
        pass
    return out


def _comments(cls) -> dict[str, str]:
    out: dict[str, str] = {}
    for c in reversed(cls.__mro__):
        if dataclasses.is_dataclass(c):
            out.update({k: v for k, v in _own_comments(c).items() if v})
    return out


def _type_name(tp: Any) -> str:
    tp, marks = _split_annotated(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        name = "|".join(repr(c) if c == "" else str(c) for c in args)
    elif origin in (Union, types.UnionType):
        name = "|".join("null" if a is type(None) else _type_name(a) for a in args)
    elif origin in (list, tuple):
        name = f"{origin.__name__}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    elif origin is dict:
        name = "dict"
    else:
        name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    for m in marks:
        if isinstance(m, _PathMark) and m.is_path:
            name = "path"
        elif isinstance(m, Range):
            desc = m.describe(False)
            name = f"{name} {desc}" if desc else name
    return name


def _flow(v: Any) -> str:
    """A value as YAML flow text (what one types after key=)."""
    if isinstance(v, tuple):
        v = list(v)
    s = yaml.safe_dump(to_dict(v) if dataclasses.is_dataclass(v) else v, default_flow_style=True,
                       width=10**9, sort_keys=False).strip()
    return s[:-3].strip() if s.endswith("\n...") else s


def help_text(cfg, prefix: str = "", file_keys: frozenset = frozenset(), cli_keys: frozenset = frozenset()) -> str:
    """One line per key of `cfg` (a config instance; a class means its defaults):
    `key  type = value  [file|cli]  # comment`."""
    if isinstance(cfg, type):
        cfg = cfg()
    lines = []
    hints, notes = _hints(type(cfg)), _comments(type(cfg))
    for f in dataclasses.fields(cfg):
        v, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(v):
            lines.append(help_text(v, key + ".", file_keys, cli_keys))
            continue
        tag = "  [cli]" if key in cli_keys else "  [file]" if key in file_keys else ""
        note = f"  # {notes[f.name]}" if notes.get(f.name) else ""
        lines.append(f"  {key:<36} {_type_name(hints[f.name]):<26} = {_flow(v)}{tag}{note}")
    return "\n".join(lines)


def _leaf_keys(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out |= _leaf_keys(v, f"{prefix}{k}.")
        out.add(prefix + str(k))
    return out


# ----------------------------------------------------------------------------- command line
def _find_config_file(path: str) -> Path:
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (ROOT / p).is_file():
        return ROOT / p
    return p


def checkpoint_config_file(folder: str | Path) -> Path | None:
    """config.yaml describing a checkpoint folder: FOLDER/config.yaml, or the run's (FOLDER/../../config.yaml)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for c in (folder / "config.yaml", folder.parent.parent / "config.yaml" if folder.parent.name == "checkpoints"
              else None):
        if c is not None and c.is_file():
            return c
    return None


def _saved_base(cls, overrides: list[str]) -> tuple[dict, Path | None]:
    """No --config: the config.yaml of the load_from folder (or the first ensemble member), minus the run-action keys."""
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    candidates = []
    if given.get("load_from"):
        candidates.append(given["load_from"])
    if given.get("ensemble"):
        members = _parse_value(given["ensemble"])
        if isinstance(members, list) and members and isinstance(members[0], str):
            candidates.append(members[0])
    for c in candidates:
        f = checkpoint_config_file(os.path.expanduser(c))
        if f is not None:
            data = load_yaml(f)
            for k in RUN_ACTION_KEYS:
                data.pop(k, None)
            return data, f
    return {}, None


def parse_config(cls, argv: list[str] | None = None, doc: str = ""):
    """Parse `--config FILE key=value ...` into `cls`; print help / one-line errors and exit."""
    argv = sys.argv[1:] if argv is None else list(argv)
    want_help = "-h" in argv or "--help" in argv
    config_file, overrides, i = None, [], 0
    try:
        while i < len(argv):
            a = argv[i]
            if a in ("-h", "--help"):
                pass
            elif a == "--config":
                if i + 1 >= len(argv):
                    raise ConfigError("--config needs a file path")
                config_file = argv[i + 1]
                i += 1
            elif a.startswith("--config="):
                config_file = a.split("=", 1)[1]
            elif a.startswith("--"):
                raise ConfigError(f"unknown option {a} (use --config FILE and key=value)")
            else:
                overrides.append(a)
            i += 1
        if config_file is not None:
            source = _find_config_file(config_file)
            data = load_yaml(source)
        else:
            data, source = _saved_base(cls, overrides)
        cfg = build_config(cls, data, overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    if want_help:
        print((doc.strip() + "\n\n") if doc else "", end="")
        print("usage: [accelerate launch] SCRIPT.py [--config FILE.yaml] [key=value ...]\n")
        print(f"Relative paths: in a config file or default -> the project root ({ROOT}); "
              "on the command line -> the current folder.")
        src = f"; [file] = set by {source}" if source else ""
        print(f"config keys (type = value{src}; [cli] = set on the command line):")
        print(help_text(cfg, file_keys=frozenset(_leaf_keys(data)),
                        cli_keys=frozenset(o.split("=", 1)[0] for o in overrides)))
        raise SystemExit(0)
    return cfg


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
