"""Checkpoints: atomic full-state saves through accelerate, resume, and weights-only loading.

Layout in the run folder:
  checkpoints/step_<N>/   model.safetensors, optimizer.bin, scheduler.bin, random_states_<rank>.pkl,
                          [scaler.pt], trainer_state.json ({"step", "epoch", ...})
  checkpoints/best/       model.safetensors + trainer_state.json (weights of the best eval)
  checkpoints/best_ema/   the same for the EMA weights (lib/ema.py)
Each folder also holds the run's resolved config.yaml, and its model.safetensors carries metadata
(script, model class, step, metric values): `checkpoint_info(folder)` reads them back, so predict /
export / eval need only `load_from=<folder>`.
Every folder is written under a temporary name and renamed when complete, so a crash never
leaves a half-written checkpoint where resume would find it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import sys
from pathlib import Path
from typing import Callable

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from lib.errors import UserError


class WeightFileError(UserError, ValueError):
    """A weight file that is missing, unreadable or does not fit the model."""


def _run_dir(accelerator, run_dir) -> Path | None:
    if run_dir is not None:
        return Path(run_dir)
    pc = getattr(accelerator, "project_configuration", None)
    return Path(pc.project_dir) if pc is not None and pc.project_dir else None


def _metadata(accelerator, model: nn.Module | None, step: int | None, metrics: dict | None) -> dict[str, str]:
    """safetensors metadata: script, model class, step and metric values, all strings."""
    script = getattr(accelerator, "script_name", "") or (Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "")
    meta = {"format": "pt", "script": script}
    if model is not None:
        from accelerate.utils import extract_model_from_parallel

        meta["model"] = type(extract_model_from_parallel(model)).__name__
    if step is not None:
        meta["step"] = str(step)
    for k, v in (metrics or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            meta[f"metric.{k}"] = repr(float(v))
    return meta


def _describe(folder: Path, run_dir: Path | None) -> None:
    """Copy the run's resolved config.yaml into a checkpoint folder (before its atomic rename)."""
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        shutil.copyfile(run_dir / "config.yaml", folder / "config.yaml")


def add_safetensors_metadata(path: str | Path, meta: dict[str, str]) -> None:
    """Merge `meta` into the header of a .safetensors file (bytes of the tensors copied, not parsed)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".meta")
    with open(path, "rb") as src:
        n = struct.unpack("<Q", src.read(8))[0]
        header = json.loads(src.read(n))
        header["__metadata__"] = {**header.get("__metadata__", {}), **{k: str(v) for k, v in meta.items()}}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors keeps the data section 8-byte aligned
        with open(tmp, "wb") as dst:
            dst.write(struct.pack("<Q", len(raw)) + raw)
            shutil.copyfileobj(src, dst, 16 << 20)
    os.replace(tmp, path)


def checkpoint_info(path: str | Path) -> dict:
    """What a checkpoint folder (or .safetensors file) says about itself.

    {"step": int | None, "metrics": {name: float}, "script": str | None, "model": str | None,
     "config": dict | None (its config.yaml), "path": Path}
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = path / "model.safetensors" if path.is_dir() else path
    info: dict = {"path": path, "step": None, "metrics": {}, "script": None, "model": None, "config": None}
    if weights.suffix == ".safetensors" and weights.is_file():
        try:
            with open(weights, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                meta = json.loads(f.read(n)).get("__metadata__", {}) if n < 100_000_000 else {}
        except (OSError, ValueError, struct.error):
            meta = {}
        info["script"], info["model"] = meta.get("script") or None, meta.get("model") or None
        if meta.get("step", "").isdigit():
            info["step"] = int(meta["step"])
        info["metrics"] = {k[7:]: float(v) for k, v in meta.items() if k.startswith("metric.")}
    state_file = folder / "trainer_state.json"
    if info["step"] is None and state_file.is_file():
        try:
            info["step"] = json.loads(state_file.read_text()).get("step")
        except ValueError:
            pass
    if (folder / "config.yaml").is_file():
        info["config"] = yaml.safe_load((folder / "config.yaml").read_text())
    return info


def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete `checkpoints/step_<N>` folders, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / "trainer_state.json").is_file() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(accelerator, run_dir: str | Path, step: int, state: dict, max_keep: int = 0,
                    metrics: dict | None = None) -> Path:
    """Full training state at `step` (+ `state`, e.g. epoch) -> checkpoints/step_<step>; keep the last `max_keep`.

    The folder also gets the run's config.yaml and safetensors metadata (script, model, step, `metrics`).
    """
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}))
        _describe(tmp, Path(run_dir))
        models = getattr(accelerator, "_models", [])
        for i, name in enumerate(["model.safetensors"] + [f"model_{j}.safetensors" for j in range(1, len(models))]):
            if (tmp / name).is_file():
                add_safetensors_metadata(tmp / name, _metadata(accelerator, models[i] if i < len(models) else None, step, metrics))
        _replace_dir(tmp, final)
        if max_keep > 0:
            for old in step_checkpoints(run_dir)[:-max_keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_weights(accelerator, model: nn.Module, folder: str | Path, state: dict, run_dir: str | Path | None = None,
                 metrics: dict | None = None) -> None:
    """Model weights only (safetensors) + trainer_state.json + the run's config.yaml, atomically
    (e.g. checkpoints/best). Metadata: script, model class, state["step"], `metrics` (default: the
    numbers in `state` other than step)."""
    folder = Path(folder)
    sd = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = folder.with_name("." + folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if metrics is None:
            metrics = {k: v for k, v in state.items() if k not in ("step", "epoch")}
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp / "model.safetensors"),
                  metadata=_metadata(accelerator, model, state.get("step"), metrics))
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        _describe(tmp, _run_dir(accelerator, run_dir))
        _replace_dir(tmp, folder)
    accelerator.wait_for_everyone()


def find_resume(run_dir: str | Path, resume: str) -> Path | None:
    """`resume`: "" (fresh run), "auto" (latest step_<N> in run_dir, if any) or a checkpoint folder."""
    if not resume:
        return None
    if resume == "auto":
        ckpts = step_checkpoints(run_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"resume: {path} is not a checkpoint folder (no trainer_state.json)")
    return path


# keys that may change between a checkpoint and its resume without changing any tensor shape
_RUN_KEYS = ("output_dir", "resume", "load_from", "eval_only", "ensemble", "overwrite", "predict", "export",
             "baseline", "tracker", "project", "run_name", "seed", "train", "compile", "tf32", "mixed_precision",
             "save_vis")


def config_diff(saved: dict, now: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(key, saved value, current value) for each dotted key that differs between two config dicts."""
    out = []
    for k in list(saved) + [k for k in now if k not in saved]:
        a, b = saved.get(k, "<absent>"), now.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            out.append((prefix + k, a, b))
    return out


def load_checkpoint(accelerator, path: Path, cfg=None) -> dict:
    """Restore model, optimizer, scheduler, scaler and RNG states; return trainer_state.json.

    A checkpoint that does not fit the current model / optimizer is a one-line WeightFileError naming
    the config keys that differ from the checkpoint's config.yaml (with `cfg`), else the first mismatch.
    """
    path = Path(path)
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, KeyError, ValueError) as e:
        first = _first_mismatch(str(e))
        changed = []
        if cfg is not None and (path / "config.yaml").is_file():
            from lib.config import to_dict

            saved = yaml.safe_load((path / "config.yaml").read_text()) or {}
            diff = [d for d in config_diff(saved, to_dict(cfg)) if d[0].split(".")[0] not in _RUN_KEYS]
            ranked = {}  # architecture keys first; optimizer keys (param groups, state) next; data last
            for d in diff:
                top = d[0].split(".")[0]
                rank = 2 if top in ("optim", "sched", "ema") else 3 if top == "data" else 0
                rank = 0 if d[0].endswith("num_classes") else rank
                ranked.setdefault(rank, []).append(d)
            top_group = ranked[min(ranked)] if ranked else []
            changed = [f"{k}={_show(a)}, now {_show(b)}" for k, a, b in top_group[:4]]
        if changed:
            raise WeightFileError(f"resume: checkpoint {path} was saved with " + "; ".join(changed)
                                  + f" ({first})") from None
        raise WeightFileError(f"resume: checkpoint {path} does not fit this run: {first}") from None
    return json.loads((path / "trainer_state.json").read_text())


def _show(v) -> str:
    return str(v) if not isinstance(v, str) else (v or '""')


def _first_mismatch(msg: str) -> str:
    """The first informative line of torch's load_state_dict / optimizer error, short."""
    lines = [x.strip() for x in msg.splitlines() if x.strip()]
    for x in lines:
        if x.startswith(("size mismatch for", "Missing key(s)", "Unexpected key(s)")):
            return _cut(x)
    return _cut(lines[0] if lines else type(msg).__name__)


def _cut(x: str, n: int = 240) -> str:
    if len(x) <= n:
        return x
    return x[:n].rsplit(" ", 1)[0] + " ..."


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict from a .safetensors / .pth / .pt / .bin file or a folder holding model.safetensors.

    Unwraps the usual containers ({"state_dict": ...}, {"model": ...}, {"module": ...}).
    """
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "model.pth"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise WeightFileError(f"no model.safetensors / pytorch_model.bin in folder {path}")
    if not path.is_file():
        raise WeightFileError(f"weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any read failure is a bad weight file
        raise WeightFileError(_read_failure(path, e)) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightFileError(f"{path} does not hold a state dict of tensors")
    return sd


def _read_failure(path: Path, e: Exception) -> str:
    """One line for a file torch / safetensors cannot read (torch's weights_only text is paragraphs)."""
    msg = str(e)
    glob = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
    if glob:
        return (f"cannot read weight file {path}: it holds Python objects ({glob.group(1)}) that "
                f"torch.load(weights_only=True) refuses; re-save it as a state dict of tensors")
    inner = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", msg, re.S)
    reason = " ".join((inner.group(1) if inner else (msg.splitlines() or [""])[0]).split())
    return f"{path} is not a weight file (cannot read weight file: {type(e).__name__}: {_cut(reason, 160)})"


def load_weights(model: nn.Module, path: str | Path, convert: Callable[[dict], dict] | None = None,
                 strict: bool = False, skip_mismatched: bool = False, log=print) -> tuple[list, list]:
    """Load weights from `path` into `model` (after `convert`, a key-mapping function).

    Reports missing / unexpected keys. Shape mismatches are errors, unless `skip_mismatched`
    (e.g. a new class count when fine-tuning), where those tensors keep their init and are
    reported. Nothing matching at all is always an error: it means a wrong weight file.
    """
    sd = read_state_dict(path)
    if convert is not None:
        try:
            sd = convert(sd)
        except (ValueError, KeyError, UserError) as e:  # a layout the model's key mapping does not know
            raise WeightFileError(f"{path}: {e}{_saved_by(path)}") from None
    own = model.state_dict()
    mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if mismatched and not skip_mismatched:
        k = mismatched[0]
        raise WeightFileError(f"{path}: shape of '{k}' is {tuple(sd[k].shape)}, model has {tuple(own[k].shape)}"
                              f" ({len(mismatched)} mismatched tensors)")
    sd = {k: v for k, v in sd.items() if k not in mismatched}
    if not any(k in own for k in sd):
        raise WeightFileError(f"{path}: none of its {len(sd)} keys match the model (wrong weight file or layout?)"
                              + _saved_by(path))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if strict and (missing or unexpected):
        raise WeightFileError(f"{path}: {len(missing)} missing keys (e.g. {missing[:3]}), "
                              f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    log(f"loaded {len(sd) - len(unexpected)} tensors from {path}"
        + (f"; re-initialised (shape mismatch): {mismatched}" if mismatched else "")
        + (f"; missing: {_short(missing)}" if missing else "")
        + (f"; unexpected: {_short(unexpected)}" if unexpected else ""))
    return missing, unexpected


def _saved_by(path: Path) -> str:
    info = checkpoint_info(path)
    if not info["script"]:
        return ""
    return f" (saved by {info['script']}" + (f", model {info['model']}" if info["model"] else "") + ")"


def _short(keys: list, n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n})" if len(keys) > n else "")


def eval_members(cfg) -> list[str]:
    """Which weights `eval_only=true` evaluates, decided before any model is built (one rule, all scripts).

    - `load_from` and/or `ensemble`: exactly those, `load_from` first (several = ensemble + each member);
    - neither: the model restored by `resume=PATH|auto` (returned as [] = "the resumed model");
    - none of the three: an error.
    """
    members = ([cfg.load_from] if cfg.load_from else []) + list(cfg.ensemble)
    if not members and not cfg.resume and not getattr(cfg, "baseline", ""):
        raise UserError("eval_only=true needs load_from=PATH, ensemble=[...] or resume=PATH")
    return members


class BestCheckpoint:
    """checkpoints/<name> (default "best") holds the weights of the best evaluation so far.

        best = BestCheckpoint(run_dir, cfg.train.best_metric, cfg.train.best_mode)
        if ckpt is not None: best.restore()          # after a resume: the best so far, not None
        best.update(accelerator, model, step, metrics)  # at each evaluation; True when it saved

    `metric` "" = the first number `metrics` holds. Metrics must be equal on every process (gathered).
    """

    def __init__(self, run_dir: str | Path, metric: str, mode: str = "max", name: str = "best"):
        if mode not in ("max", "min"):
            raise UserError(f"train.best_mode: {mode!r} is not one of ['max', 'min']")
        self.run_dir, self.metric, self.mode, self.name = Path(run_dir), metric, mode, name
        self.folder = self.run_dir / "checkpoints" / name
        self.value: float | None = None
        self.step: int | None = None

    def restore(self) -> float | None:
        """Best value recorded in checkpoints/<name>/trainer_state.json (None when there is none)."""
        state_file = self.folder / "trainer_state.json"
        if not state_file.is_file():
            return None
        state = json.loads(state_file.read_text())
        key = self.metric or state.get("metric", "")
        if isinstance(state.get(key), (int, float)):
            self.metric, self.value, self.step = key, float(state[key]), state.get("step")
        return self.value

    def is_better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def update(self, accelerator, model: nn.Module, step: int, metrics: dict, run_dir: str | Path | None = None) -> bool:
        """Save `model` to checkpoints/<name> when metrics[metric] beats the best so far; True if it did."""
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        key = self.metric or next(iter(numbers), "")
        if key not in numbers:
            shown = self.metric or '""'
            raise UserError(f"train.best_metric={shown} is not a metric of this evaluation "
                            f"(available: {', '.join(numbers) or 'none'})")
        self.metric = key
        if not self.is_better(numbers[key]):
            return False
        self.value, self.step = numbers[key], step
        save_weights(accelerator, model, self.folder,
                     {"step": step, "metric": key, "mode": self.mode, key: numbers[key]},
                     run_dir=run_dir if run_dir is not None else self.run_dir, metrics=numbers)
        return True
