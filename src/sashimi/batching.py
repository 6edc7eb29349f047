"""Autoregressive batches: token pairs padded to a length the model accepts, and random crops."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # targets the loss skips (padding)
ZERO_TOKEN = 128  # the 8-bit code of silence, and the first input token


def length_multiple(model: nn.Module) -> int:
    """Sequence lengths the model accepts are multiples of this (SampleRNN: its lookback)."""
    m = getattr(model, "length_multiple", None) or getattr(model, "lookback", None) or 1
    return int(m)


def pad_to_multiple(
    x: torch.Tensor, y: torch.Tensor, multiple: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad inputs with 128 and targets with IGNORE_INDEX to a multiple of `multiple`."""
    pad = -y.shape[1] % multiple
    if pad:
        x = F.pad(x, (0, pad), value=ZERO_TOKEN)  # (B, context + L + pad)
        y = F.pad(y, (0, pad), value=IGNORE_INDEX)  # (B, L + pad)
    return x, y


def crop(
    x: torch.Tensor,
    y: torch.Tensor | None,
    context: int,
    length: int,
    rng: np.random.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A `length`-sample window (random start when rng is given, else the first). For AR pairs
    x (B, context + L) / y (B, L) the window keeps x's `context` left tokens; for waveforms
    pass y=None and context=0."""
    L = x.shape[1] - context if y is None else y.shape[1]
    if L <= length:
        return x, y
    s = int(rng.integers(0, L - length + 1)) if rng is not None else 0
    x = x[:, s : s + context + length]
    return x, (None if y is None else y[:, s : s + length])
