"""The autoregressive loss: negative log-likelihood in nats over the targets that are not padding.

Training, validation and test NLL all go through `nll_sum` on batches that `ar_window` cut and
padded, so the three report the same quantity (bits per sample = nats / ln 2).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from sashimi.batching import IGNORE_INDEX, crop, pad_to_multiple

LN2 = math.log(2.0)


def ar_window(
    x: torch.Tensor,
    y: torch.Tensor,
    context: int,
    max_length: int | None,
    multiple: int,
    rng: np.random.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An AR pair cropped to `max_length` targets (random start with `rng`, else the first) and
    padded to a multiple of `multiple`. x: (B, context + L), y: (B, L)."""
    if max_length:
        x, y = crop(x, y, context, max_length, rng)
    return pad_to_multiple(x, y, multiple)


def n_targets(y: torch.Tensor) -> int:
    """Targets the loss counts (padding excluded)."""
    return int((y != IGNORE_INDEX).sum())


def nll_sum(
    logits: torch.Tensor,
    y: torch.Tensor,
    dtype: torch.dtype | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Sum over non-padding targets of -log p(y) in nats, computed in `dtype` (default: the
    logits' precision, at least float32, so bf16 logits are not summed in bf16 and float64
    runs stay float64). logits: (..., 256), y: (...). `chunk` bounds the rows cast at once."""
    dtype = dtype or torch.promote_types(logits.dtype, torch.float32)
    logits, y = logits.flatten(0, -2), y.flatten()  # (N, 256), (N,)
    step = chunk or max(1, y.numel())
    total = logits.new_zeros((), dtype=dtype)
    for lo in range(0, y.numel(), step):
        total = total + F.cross_entropy(
            logits[lo : lo + step].to(dtype),
            y[lo : lo + step],
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
    return total
