"""Model registry. `MODELS[name]` is the class; modules are imported on first use.

Every model has `kind = "ar"` (forward(tokens) -> logits, default_state/step) or
`kind = "diffusion"` (forward(x_t, t) -> eps, training_loss). See each file.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from torch import nn

# name -> (module, class): one file per architecture
_REGISTRY: dict[str, tuple[str, str]] = {
    "sashimi": ("sashimi.models.sashimi", "SaShiMi"),
    "wavenet": ("sashimi.models.wavenet", "WaveNet"),
    "samplernn": ("sashimi.models.samplernn", "SampleRNN"),
    "diffwave": ("sashimi.models.diffwave", "DiffWave"),
}


class _Models(Mapping):
    """A read-only name -> class mapping that imports each model file on first access."""

    def __getitem__(self, name: str) -> type[nn.Module]:
        module, cls = _REGISTRY[name]
        return getattr(importlib.import_module(module), cls)

    def __iter__(self) -> Iterator[str]:
        return iter(_REGISTRY)

    def __len__(self) -> int:
        return len(_REGISTRY)


MODELS: Mapping[str, type[nn.Module]] = _Models()


def build_model(name: str, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        from sashimi.errors import UserError

        raise UserError(f"unknown model {name!r} (known: {', '.join(_REGISTRY)})")
    return MODELS[name](**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
