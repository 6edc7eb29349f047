"""Checkpoint files: find them in a run folder, read them safely, rebuild the model."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from sashimi.errors import UserError


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run dir (-> checkpoints/best.pt, else last.pt, else imported.pt)."""
    p = Path(path)
    if p.is_dir():
        d = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        for name in ("best.pt", "last.pt", "imported.pt"):
            if (d / name).is_file():
                return d / name
        raise UserError(
            f"{d}: no checkpoint found (best.pt, last.pt or imported.pt); train the run first"
        )
    if not p.is_file():
        raise UserError(f"{p}: checkpoint not found")
    return p


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint file of ours, read with torch.load(weights_only=True) and nothing more: a
    file that needs any other global is refused (official checkpoints: `sashimi import-checkpoint`)."""
    from sashimi.safe_load import load_weights

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    ckpt = load_weights(path, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_name" not in ckpt:
        raise UserError(f"{path}: not a sashimi checkpoint (needs 'model' and 'model_name')")
    return ckpt


def load_model(
    path_or_run_dir: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """(model in eval mode, checkpoint dict) from a checkpoint file or a run dir (best.pt, else
    last.pt, else imported.pt). `ckpt["path"]` is set to the file that was read."""
    from sashimi.models import build_model

    path = resolve_checkpoint(path_or_run_dir)
    ckpt = load_checkpoint(path, map_location)
    model = build_model(ckpt["model_name"], **dict(ckpt.get("model_kwargs") or {}))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(
            f"{path}: weights do not fit model {ckpt['model_name']!r} "
            f"({str(e).splitlines()[0][:200]})"
        ) from None
    model.to(map_location).eval()
    ckpt["path"] = str(path)
    ckpt.setdefault("kind", getattr(model, "kind", "ar"))
    ckpt.setdefault("step", 0)
    return model, ckpt
