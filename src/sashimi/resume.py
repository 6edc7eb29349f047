"""Continuing a run from its last checkpoint, and writing checkpoints atomically.

A run resumes from `last.pt` only if the checkpoint was trained with the same configuration,
budget and logging keys aside (RESUME_IGNORED: a longer budget extends a run). Any other
difference (model, data, optimisation, seed) makes the checkpoint stale: an automatic resume
starts over, an explicit `--resume` refuses, naming the first differing key. Both trainers (the
generative one and the classifier's) decide through `open_last`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import sys
from pathlib import Path
from typing import Any

import torch

from sashimi.checkpoints import load_checkpoint
from sashimi.errors import UserError
from sashimi.io import atomic_write

RESUME_IGNORED = frozenset(
    f"train.{k}"
    for k in (
        "max_steps",
        "max_epochs",
        "max_minutes",
        "val_every",
        "val_batches",
        "log_every",
        "ckpt_every",
        "keep_last",
        "num_workers",
        "compile",  # retired (train.compile, train.s4_compile): still in older checkpoints
        "s4_compile",
        "amp",
    )
)
RESUME_IGNORED_BLOCKS = frozenset({"sample", "table", "label", "key", "compile"})
_UNSET = "<unset>"


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = _norm(v)
    return out


def _model_defaults(name: str) -> dict[str, Any]:
    """Keyword defaults of the model class `name` ({} when it cannot be imported)."""
    try:
        from sashimi.models import MODELS

        sig = inspect.signature(MODELS[name].__init__)
    except Exception:
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        k: p.default
        for k, p in sig.parameters.items()
        if k != "self" and p.kind in kinds and p.default is not inspect.Parameter.empty
    }


def training_config(raw: dict, dataset: dict | None = None) -> dict[str, Any]:
    """What a checkpoint's training depends on, as dotted keys in a fixed order: `kind`,
    `dataset`, `model.*` (the model's keyword defaults filled in), `train.*` (TrainConfig's
    defaults filled in), other run keys, and `datasets.<key>.*` when `dataset` (a
    DatasetConfig as a dict) is given. RESUME_IGNORED keys and blocks are left out."""
    from sashimi.config import TrainConfig

    model = dict(raw.get("model") or {})
    name = model.get("name")
    out: dict[str, Any] = {"kind": raw.get("kind", "ar"), "dataset": raw.get("dataset")}
    if name is not None:
        model = {"name": name, **_model_defaults(name), **model}
    out.update(_flatten({"model": model}))
    train = {**dataclasses.asdict(TrainConfig()), **(raw.get("train") or {})}
    out.update(_flatten({"train": train}))
    skip = RESUME_IGNORED_BLOCKS | {"kind", "dataset", "model", "train"}
    out.update(_flatten({k: v for k, v in raw.items() if k not in skip}))
    if dataset is not None:
        out.update(_flatten({"datasets": {raw.get("dataset"): dict(dataset)}}))
    return {k: v for k, v in out.items() if k not in RESUME_IGNORED}


def config_change(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first key (in `new`'s order, then `old`'s) whose value differs: (key, old, new)."""
    for k in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(k, _UNSET), new.get(k, _UNSET)
        if a != b:
            return k, a, b
    return None


def checkpoint_config_change(
    ckpt: dict, raw: dict, dataset: dict | None
) -> tuple[str, Any, Any] | None:
    """How the run configuration `raw` (with `model.name`) differs from the one `ckpt` was
    trained with (None: same). A checkpoint without a saved config is compared on its model."""
    new = training_config(raw, dataset)
    saved = ckpt.get("config")
    if isinstance(saved, dict) and saved:
        old_ds = ckpt.get("dataset_config")
        old = training_config(saved, old_ds if isinstance(old_ds, dict) else None)
        if not isinstance(old_ds, dict):  # saved before datasets were recorded: not compared
            new = {k: v for k, v in new.items() if not k.startswith("datasets.")}
        return config_change(old, new)
    model = {"name": ckpt.get("model_name"), **dict(ckpt.get("model_kwargs") or {})}
    old = {k: v for k, v in training_config({"model": model}).items() if k.startswith("model.")}
    old["kind"] = ckpt.get("kind", raw.get("kind", "ar"))
    new = {k: v for k, v in new.items() if k.startswith("model.") or k == "kind"}
    return config_change(old, new)


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, str) and v != _UNSET else str(v)


def open_last(
    last: Path,
    resume: bool | None,
    raw: dict,
    dataset: dict | None,
    key: str,
    is_main: bool = True,
) -> dict | None:
    """The checkpoint `last` to continue from, or None to start fresh. `resume`: None resumes
    when `last` exists and is not stale, True insists (a stale checkpoint is an error), False
    never resumes."""
    if resume is False or not last.is_file():
        if resume is True and not last.is_file() and is_main:
            print(f"note: {last} not found; starting {key} from scratch", file=sys.stderr)
        return None
    ckpt = load_checkpoint(last, "cpu")
    change = checkpoint_config_change(ckpt, raw, dataset)
    if change is None:
        return ckpt
    what = f"{change[0]} changed {_fmt(change[1])} -> {_fmt(change[2])}"
    if resume is True:
        raise UserError(
            f"{last}: runs.{key}: {what} since this checkpoint; use --no-resume to start over"
        )
    if is_main:
        print(f"runs.{key}: {what}; starting a fresh run", file=sys.stderr)
    return None


def write_checkpoint(state: dict, paths: list[Path]) -> None:
    """Serialise `state` once and write it to every path atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    for path in paths:
        with atomic_write(path, "wb") as f:
            f.write(data)


def prune_steps(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step-<n>.pt files."""
    steps = sorted(ckpt_dir.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    for old in steps[: max(0, len(steps) - keep_last)]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()


def clear_checkpoints(ckpt_dir: Path) -> None:
    """A fresh start: no stale step-<n>.pt, last.pt or best.pt left behind."""
    for old in ckpt_dir.glob("step-*.pt"):
        old.unlink()
    for name in ("last.pt", "best.pt"):
        with contextlib.suppress(FileNotFoundError):
            (ckpt_dir / name).unlink()
