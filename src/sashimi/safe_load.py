"""Read checkpoint files without ever executing a pickle.

Every file goes through torch's `weights_only` unpickler, which builds only tensors, plain
containers and primitives. Our own checkpoints need nothing more (`load_weights`). Foreign
formats (`load_foreign`) name classes of code we do not run: Lightning's `AttributeDict`,
omegaconf containers, the released SC09 classifier's `models.resnext` modules wrapped in
`DataParallel`. Each such name on an explicit allowlist is bound to an inert stand-in that only
records what the pickle hands it (constructor arguments, `__setstate__` state); nothing of the
official code or of those libraries is imported. A file that names any other global is refused
with one line naming the file and the global.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sashimi.errors import UserError


class Inert:
    """Stand-in for a foreign class: keeps the pickle's arguments and state, runs nothing."""

    foreign = "?"  # the dotted name this stand-in replaces

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.foreign}>"


class PlainDict:
    """Stand-in for a dict subclass (AttributeDict, defaultdict): a plain dict is built."""

    def __new__(cls, *args: Any, **kwargs: Any) -> dict:
        return {}


def _inert(name: str) -> type:
    return type(name.rsplit(".", 1)[1], (Inert,), {"foreign": name})


def _plain_dict(name: str) -> type:
    return type(name.rsplit(".", 1)[1], (PlainDict,), {"foreign": name})


_OMEGACONF = [
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    *(f"omegaconf.nodes.{n}" for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode",
                                       "BooleanNode", "BytesNode", "PathNode", "EnumNode")),
    # types recorded in omegaconf metadata (ref_type / object_type / key_type): values only
    "typing.Any", "builtins.dict", "builtins.list", "builtins.int", "builtins.float",
    "builtins.str", "builtins.bool", "builtins.bytes", "builtins.object",
]  # fmt: skip
_DICTS = [
    "collections.defaultdict",  # omegaconf's resolver cache
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
]
_MODULES = [  # the released SC09 classifier: torch.save(DataParallel(CifarResNeXt(...)))
    "models.resnext.CifarResNeXt",
    "models.resnext.ResNeXtBottleneck",
    "torch.nn.parallel.data_parallel.DataParallel",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.container.Sequential",
]

LIGHTNING: dict[str, type] = {n: _inert(n) for n in _OMEGACONF} | {
    n: _plain_dict(n) for n in _DICTS
}
PICKLED_MODULES: dict[str, type] = {n: _inert(n) for n in _MODULES}
FOREIGN: dict[str, type] = LIGHTNING | PICKLED_MODULES


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def _offending_global(path: Path, e: BaseException, allow: Mapping[str, type]) -> str | None:
    """The global that made the weights_only unpickler stop (from its message, else a scan)."""
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    if m:
        return m[1]
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return None
    names = [n for n in names if n not in allow]
    return names[0] if names else None


def _load(path: str | os.PathLike, allow: Mapping[str, type], map_location) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with torch.serialization.safe_globals([(cls, n) for n, cls in allow.items()]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        bad = _offending_global(path, e, allow)
        if bad is not None:
            raise UserError(
                f"{path}: refused to unpickle: it needs the global {bad}, which is not on the "
                "allowlist (loading it could run code)"
            ) from None
        raise UserError(f"{path}: cannot read checkpoint ({_first_line(e)})") from None


def load_weights(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) and nothing more: our own checkpoints."""
    return _load(path, {}, map_location)


def load_foreign(
    path: str | os.PathLike, allow: Mapping[str, type] = FOREIGN, map_location: Any = "cpu"
) -> Any:
    """A foreign checkpoint: `allow` (dotted name -> inert stand-in) on top of weights_only."""
    return _load(path, allow, map_location)


def foreign_name(obj: Any) -> str | None:
    """The dotted name a stand-in replaces (None for anything else)."""
    return getattr(type(obj), "foreign", None) if isinstance(obj, Inert) else None


def to_plain(obj: Any) -> Any:
    """Stand-ins of omegaconf containers / nodes -> plain dicts, lists and values (recursively)."""
    if isinstance(obj, Inert):
        state = getattr(obj, "state", None)
        if isinstance(state, dict) and "_content" in state:  # DictConfig / ListConfig
            return to_plain(state["_content"])
        if isinstance(state, dict) and "_val" in state:  # a value node
            return to_plain(state["_val"])
        return None
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def module_state_dict(obj: Any, src: str, prefix: str = "") -> dict[str, Tensor]:
    """The state dict of a pickled nn.Module tree of stand-ins (parameters and persistent
    buffers, `.`-joined names as nn.Module.state_dict gives them)."""
    state = getattr(obj, "state", None)
    if not isinstance(state, dict) or "_modules" not in state:
        raise UserError(f"{src}: {prefix or 'the pickled object'} is not a pickled torch module")
    out: dict[str, Tensor] = {}
    for name, p in (state.get("_parameters") or {}).items():
        if p is not None:
            out[prefix + name] = p.detach()
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, b in (state.get("_buffers") or {}).items():
        if b is not None and name not in skip:
            out[prefix + name] = b
    for name, m in state["_modules"].items():
        if m is not None:
            out.update(module_state_dict(m, src, f"{prefix}{name}."))
    return out
