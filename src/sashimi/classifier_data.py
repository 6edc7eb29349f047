"""Labelled 1 s clips for the digit classifier: a prepared split's clips with their digit labels,
and audio files read at 16 kHz (what the classifier's training, accuracy and scoring feed it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio

from sashimi.classifier import CLIP_LENGTH, SAMPLE_RATE, fix_length
from sashimi.data.datasets import load_split
from sashimi.errors import UserError
from sashimi.io import read_audio


def split_exists(prepared_dir: str | Path, split: str) -> bool:
    """Whether the prepared folder holds `split`."""
    return (Path(prepared_dir) / f"{split}.offsets.npy").is_file()


class LabelledWaves(torch.utils.data.Dataset):
    """(waveform FloatTensor[length], label) pairs from an AudioSplit or a (N, L) array."""

    def __init__(
        self,
        source: Any,
        labels: np.ndarray,
        length: int = CLIP_LENGTH,
        indices: np.ndarray | None = None,
    ):
        self.source, self.length = source, length
        self.labels = np.asarray(labels, dtype=np.int64)
        self.indices = np.arange(len(self.labels)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        i = int(self.indices[k])
        x = self.source[i] if isinstance(self.source, np.ndarray) else self.source.clip(i)
        x = fix_length(torch.as_tensor(np.asarray(x, dtype=np.float32)), self.length)  # (length,)
        return x, int(self.labels[i])

    def targets(self) -> np.ndarray:
        return self.labels[self.indices]


def read_clips(paths: Sequence[str | Path], length: int = CLIP_LENGTH) -> np.ndarray:
    """Read audio files (any rate; resampled to 16 kHz), pad/trim to `length` -> (N, length) float32."""
    out = np.zeros((len(paths), length), dtype=np.float32)
    for k, p in enumerate(paths):
        x, sr = read_audio(p)
        t = torch.from_numpy(x)
        if sr != SAMPLE_RATE:
            t = torchaudio.functional.resample(t, sr, SAMPLE_RATE)  # (L',)
        out[k] = fix_length(t, length).numpy()
    return out


def labelled_split(prepared_dir: str | Path, split: str) -> LabelledWaves:
    """The clips of a prepared split with their digit labels (every label must be 0-9)."""
    s = load_split(prepared_dir, split)
    labels = np.asarray(s.labels, dtype=np.int64)
    if len(labels) and np.any(labels < 0):
        raise UserError(
            f"{prepared_dir}/{split}.labels.npy: the classifier needs digit labels 0-9 "
            f"(found {int((labels < 0).sum())} unknown)"
        )
    return LabelledWaves(s, labels)
