"""Checkpoints: atomic full-state saves through accelerate, resume, and weights-only loading.

Layout in the run folder:
  checkpoints/step_<N>/   model.safetensors, optimizer.bin, scheduler.bin, random_states_<rank>.pkl,
                          [scaler.pt], trainer_state.json ({"step", "epoch", ...})
  checkpoints/best/       model.safetensors + trainer_state.json (weights of the best eval)
Every folder is written under a temporary name and renamed when complete, so a crash never
leaves a half-written checkpoint where resume would find it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class WeightFileError(ValueError):
    """A weight file that is missing, unreadable or does not fit the model."""


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


def save_checkpoint(accelerator, run_dir: str | Path, step: int, state: dict, max_keep: int = 0) -> Path:
    """Full training state at `step` (+ `state`, e.g. epoch) -> checkpoints/step_<step>; keep the last `max_keep`."""
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
        _replace_dir(tmp, final)
        if max_keep > 0:
            for old in step_checkpoints(run_dir)[:-max_keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_weights(accelerator, model: nn.Module, folder: str | Path, state: dict) -> None:
    """Model weights only (safetensors) + trainer_state.json, atomically (e.g. checkpoints/best)."""
    folder = Path(folder)
    sd = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = folder.with_name("." + folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp / "model.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(state))
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


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore model, optimizer, scheduler, scaler and RNG states; return trainer_state.json."""
    accelerator.load_state(str(path))
    return json.loads((path / "trainer_state.json").read_text())


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
        raise WeightFileError(f"cannot read weight file {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightFileError(f"{path} does not hold a state dict of tensors")
    return sd


def load_weights(model: nn.Module, path: str | Path, convert: Callable[[dict], dict] | None = None,
                 strict: bool = False, skip_mismatched: bool = False, log=print) -> tuple[list, list]:
    """Load weights from `path` into `model` (after `convert`, a key-mapping function).

    Reports missing / unexpected keys. Shape mismatches are errors, unless `skip_mismatched`
    (e.g. a new class count when fine-tuning), where those tensors keep their init and are
    reported. Nothing matching at all is always an error: it means a wrong weight file.
    """
    sd = read_state_dict(path)
    if convert is not None:
        sd = convert(sd)
    own = model.state_dict()
    mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if mismatched and not skip_mismatched:
        k = mismatched[0]
        raise WeightFileError(f"{path}: shape of '{k}' is {tuple(sd[k].shape)}, model has {tuple(own[k].shape)}"
                              f" ({len(mismatched)} mismatched tensors)")
    sd = {k: v for k, v in sd.items() if k not in mismatched}
    if not any(k in own for k in sd):
        raise WeightFileError(f"{path}: none of its {len(sd)} keys match the model (wrong weight file or layout?)")
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
        from lib.runtime import UserError

        raise UserError("eval_only=true needs load_from=PATH, ensemble=[...] or resume=PATH")
    return members
