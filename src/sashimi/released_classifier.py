"""The authors' released SC09 classifier (`sc09_classifier/resnext.pth`) -> our DigitClassifier.

The release is a whole pickled `DataParallel(CifarResNeXt(...))` (or the bare model), read
through `safe_load.load_foreign` with inert stand-ins for its classes: only its tensors are kept.
Key map, one to one (official -> ours):
    conv_1_3x3 / bn_1                                   -> stem.0 / stem.1
    stage_{s}.stage_{s}_bottleneck_{b}.conv_reduce      -> stages.{s-1}.{b}.reduce
        bn_reduce / conv_conv / bn                      -> bn_reduce / grouped / bn_grouped
        conv_expand / bn_expand                         -> expand / bn_expand
        shortcut.shortcut_conv / shortcut.shortcut_bn   -> shortcut.0 / shortcut.1
    classifier                                          -> fc
Constructor arguments come from the shapes (cardinality, base_width, widen_factor, depth =
9 b + 2); the released model is (8, 64, 4, 29), with 1024-d features.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from torch import Tensor

from sashimi.errors import UserError
from sashimi.safe_load import PICKLED_MODULES, foreign_name, load_foreign, module_state_dict

_BLOCK = {
    "conv_reduce": "reduce",
    "bn_reduce": "bn_reduce",
    "conv_conv": "grouped",
    "bn": "bn_grouped",
    "conv_expand": "expand",
    "bn_expand": "bn_expand",
    "shortcut.shortcut_conv": "shortcut.0",
    "shortcut.shortcut_bn": "shortcut.1",
}
_KEY = re.compile(r"stage_(\d+)\.stage_\1_bottleneck_(\d+)\.(.+)\.(\w+)")


def is_released_classifier(obj: object) -> bool:
    """A pickled official model (bare or DataParallel-wrapped) as `load_foreign` returns it."""
    return foreign_name(obj) in PICKLED_MODULES


def read_released(path: str | os.PathLike) -> dict[str, Tensor]:
    """The official state dict (without `module.`) of a released classifier file."""
    obj = load_foreign(path, PICKLED_MODULES)
    return released_state_dict(obj, str(path))


def released_state_dict(obj: object, src: str) -> dict[str, Tensor]:
    if not is_released_classifier(obj):
        raise UserError(f"{src}: not a pickled SC09 classifier (models.resnext.CifarResNeXt)")
    sd = module_state_dict(obj, src)
    if foreign_name(obj) == "torch.nn.parallel.data_parallel.DataParallel":
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def convert_key(k: str) -> str | None:
    """Official CifarResNeXt key -> DigitClassifier key (None if unknown)."""
    head, _, leaf = k.rpartition(".")
    if head in ("conv_1_3x3", "bn_1"):
        return f"stem.{0 if head == 'conv_1_3x3' else 1}.{leaf}"
    if head == "classifier":
        return f"fc.{leaf}"
    m = _KEY.fullmatch(k)
    if m and m[3] in _BLOCK:
        return f"stages.{int(m[1]) - 1}.{m[2]}.{_BLOCK[m[3]]}.{m[4]}"
    return None


def convert_state_dict(
    sd: Mapping[str, Tensor], src: str = "classifier"
) -> tuple[dict[str, Tensor], dict]:
    """Official state dict -> (DigitClassifier state dict, DigitClassifier kwargs)."""
    out, unknown = {}, []
    for k, v in sd.items():
        nk = convert_key(k)
        if nk is None:
            unknown.append(k)
        else:
            out[nk] = v
    if unknown:
        more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise UserError(f"{src}: unexpected keys for the SC09 classifier: {unknown[:3]}{more}")
    return out, infer_kwargs(out, src)


def infer_kwargs(sd: Mapping[str, Tensor], src: str = "classifier") -> dict:
    """DigitClassifier kwargs from the shapes of a converted state dict."""
    try:
        grouped = sd["stages.0.0.grouped.weight"]  # (D_1, D_1 / cardinality, 3, 3)
        cardinality = grouped.shape[0] // grouped.shape[1]
        base_width = grouped.shape[0] // cardinality
        widen_factor = sd["stages.0.0.expand.weight"].shape[0] // 64
        blocks = len({k.split(".")[2] for k in sd if k.startswith("stages.0.")})
        n_classes = sd["fc.weight"].shape[0]
        stem = sd["stem.0.weight"].shape[0]
    except (KeyError, IndexError, ZeroDivisionError) as e:
        raise UserError(f"{src}: cannot infer the classifier size (missing key {e})") from None
    if stem != 64 or sd["stem.0.weight"].shape[1] != 1:
        raise UserError(f"{src}: stem conv {tuple(sd['stem.0.weight'].shape)} is not (64, 1, 3, 3)")
    return dict(
        width=1.0,
        depth=9 * blocks + 2,
        cardinality=int(cardinality),
        base_width=int(base_width),
        widen_factor=int(widen_factor),
        n_classes=int(n_classes),
    )


def is_released_file(path: str | os.PathLike) -> bool:
    """Whether the file's pickle names the official `models.resnext` classes (read, not run)."""
    import torch

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: let the ordinary loader report it
        return False
    return any(n.startswith("models.resnext.") for n in names)
