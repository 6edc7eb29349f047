"""Every random number generator a trainer touches, saved as plain tensors and tuples so that a
checkpoint holding them loads with torch.load(..., weights_only=True)."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The torch, CUDA, numpy and Python global RNG states."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ),
        "python": random.getstate(),
    }


def set_rng_state(s: dict) -> None:
    """Restore what `rng_state` saved (CUDA only when the device count matches)."""
    torch.set_rng_state(s["torch"].cpu())
    if s.get("cuda") and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
