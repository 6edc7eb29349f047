"""Datasets over a prepared folder (`sashimi prepare`): memory-mapped reads, no per-sample loops.

Layout of `data/prepared/<key>/` (see contracts): per split `<split>.audio.npy` (float32,
all clips concatenated), `<split>.offsets.npy` (int64, n_clips + 1), `<split>.labels.npy`
(int64, -1 = unknown), `<split>.names.txt`, and `manifest.json`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sashimi.data.quantize import ZERO_TOKEN, canonical_kind, encode
from sashimi.errors import UserError

IGNORE_INDEX = -100
SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}


def canonical_split(split: str) -> str:
    s = _SPLIT_ALIASES.get(split, split)
    if s not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return s


class AudioSplit:
    """One split of a prepared dataset. Audio stays on disk (np.memmap, opened lazily per process)."""

    def __init__(self, prepared_dir: str | os.PathLike, split: str):
        self.dir = Path(prepared_dir)
        self.split = canonical_split(split)
        self.audio_path = self.dir / f"{self.split}.audio.npy"
        offsets_path = self.dir / f"{self.split}.offsets.npy"
        for p in (self.audio_path, offsets_path):
            if not p.is_file():
                raise UserError(f"{p}: missing; run `sashimi prepare` for {self.dir}")
        manifest_path = self.dir / "manifest.json"
        self.manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        self.sample_rate = int(self.manifest.get("sample_rate", 16000))
        self.offsets = np.load(offsets_path).astype(np.int64)  # (n_clips + 1,)
        self._audio: np.ndarray | None = None
        n = len(self.offsets) - 1
        if n < 0 or self.offsets[0] != 0 or np.any(np.diff(self.offsets) < 0):
            raise UserError(f"{offsets_path}: offsets must start at 0 and not decrease")
        if int(self.offsets[-1]) != len(self.audio):
            raise UserError(
                f"{self.audio_path}: {len(self.audio)} samples but offsets end at {self.offsets[-1]}"
            )
        labels_path = self.dir / f"{self.split}.labels.npy"
        self.labels = (
            np.load(labels_path).astype(np.int64)
            if labels_path.is_file()
            else np.full(n, -1, np.int64)
        )
        if len(self.labels) != n:
            raise UserError(f"{labels_path}: {len(self.labels)} labels for {n} clips")
        names_path = self.dir / f"{self.split}.names.txt"
        if names_path.is_file():
            self.names = names_path.read_text().splitlines()
            if len(self.names) != n:
                raise UserError(f"{names_path}: {len(self.names)} names for {n} clips")
        else:
            self.names = [f"{self.split}/{i}" for i in range(n)]
        self.lengths = np.diff(self.offsets)  # (n_clips,)

    @property
    def audio(self) -> np.ndarray:
        """All clips concatenated, float32, memory-mapped read-only."""
        if self._audio is None:
            self._audio = np.load(self.audio_path, mmap_mode="r")
        return self._audio

    def __getstate__(self) -> dict:  # DataLoader workers reopen the memmap instead of pickling it
        state = self.__dict__.copy()
        state["_audio"] = None
        return state

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def clip(self, i: int) -> np.ndarray:
        """Clip i as a float32 array (a copy; reading it touches only its pages)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"clip {i} out of range for {len(self)} clips")
        i = i % len(self)
        return self.segment(int(self.offsets[i]), int(self.offsets[i + 1]))

    def segment(self, start: int, stop: int) -> np.ndarray:
        """audio[start:stop] of the concatenated split, as a writable float32 copy."""
        return np.array(self.audio[start:stop], dtype=np.float32)

    @property
    def n_samples(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"AudioSplit({str(self.dir)!r}, {self.split!r}: {len(self)} clips, {self.n_samples} samples)"


def load_split(prepared_dir: str | os.PathLike, split: str) -> AudioSplit:
    """Open split `split` ('train', 'validation', 'test') of a prepared dataset folder."""
    return AudioSplit(prepared_dir, split)


def chunk_starts(lengths: np.ndarray, offsets: np.ndarray, chunk_length: int) -> np.ndarray:
    """Start (in the concatenated audio) of every non-overlapping chunk; remainders dropped."""
    per_clip = lengths // chunk_length  # (n_clips,)
    clip_of_chunk = np.repeat(np.arange(len(lengths)), per_clip)  # (n_chunks,)
    first = np.cumsum(per_clip) - per_clip  # (n_clips,) index of each clip's first chunk
    k = (
        np.arange(len(clip_of_chunk)) - first[clip_of_chunk]
    )  # (n_chunks,) chunk index inside its clip
    return offsets[:-1][clip_of_chunk] + k * chunk_length  # (n_chunks,)


def ar_pair(q: torch.Tensor, context: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens q (L,) -> (x (context + L,), y (L,)): x = [128]*context + [128] + q[:-1], y = q."""
    x = torch.full((context + q.shape[-1],), ZERO_TOKEN, dtype=torch.long)  # (context + L,)
    x[context + 1 :] = q[:-1]
    return x, q


class AutoregressiveDataset(Dataset):
    """Token pairs (x, y) for autoregressive models.

    chunk_length None: one item per clip (whole clip). Else: every non-overlapping
    `chunk_length` window of every clip, remainder dropped. Each item is min-max scaled
    and quantised on its own; x is y shifted right with 128 first, left-padded with
    `context` tokens of 128.
    """

    def __init__(
        self,
        split: AudioSplit,
        quantization: str,
        chunk_length: int | None = None,
        context: int = 0,
    ):
        self.split = split
        self.quantization = canonical_kind(quantization)
        self.chunk_length = chunk_length
        self.context = int(context)
        if chunk_length is None:
            keep = np.flatnonzero(split.lengths > 0)
            self.starts = split.offsets[:-1][keep]  # (n_items,)
            self.stops = split.offsets[1:][keep]  # (n_items,)
            self.clip_index = keep
        else:
            if chunk_length <= 0:
                raise UserError(f"chunk_length must be positive, got {chunk_length}")
            self.starts = chunk_starts(split.lengths, split.offsets, chunk_length)  # (n_items,)
            self.stops = self.starts + chunk_length
            self.clip_index = np.searchsorted(split.offsets, self.starts, side="right") - 1

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        audio = torch.from_numpy(
            self.split.segment(int(self.starts[i]), int(self.stops[i]))
        )  # (L,)
        q = encode(audio, self.quantization)  # (L,) int64
        return ar_pair(q, self.context)

    def label(self, i: int) -> int:
        return int(self.split.labels[self.clip_index[i]])


def collate_autoregressive(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]], ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (x, y) pairs of different lengths: x right-padded with 128, y with ignore_index."""
    xs, ys = zip(*batch)
    L = max(y.shape[0] for y in ys)
    context = xs[0].shape[0] - ys[0].shape[0]
    x = torch.full((len(batch), context + L), ZERO_TOKEN, dtype=torch.long)  # (B, context + L)
    y = torch.full((len(batch), L), ignore_index, dtype=torch.long)  # (B, L)
    for b, (xb, yb) in enumerate(batch):
        x[b, : xb.shape[0]] = xb
        y[b, : yb.shape[0]] = yb
    return x, y


class WaveformDataset(Dataset):
    """Raw waveforms (float in [-1, 1], as stored), right-padded with zeros / trimmed to `length`.

    With return_label=True items are (waveform, label) (label -1 when unknown).
    """

    def __init__(self, split: AudioSplit, length: int, return_label: bool = False):
        self.split = split
        self.length = int(length)
        self.return_label = return_label

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        start, stop = int(self.split.offsets[i]), int(self.split.offsets[i + 1])
        x = torch.zeros(self.length)  # (length,)
        n = min(self.length, stop - start)
        x[:n] = torch.from_numpy(self.split.segment(start, start + n))
        if self.return_label:
            return x, int(self.split.labels[i])
        return x


def tbptt_chunks(
    x: torch.Tensor, y: torch.Tensor, chunk: int, context: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Windows for truncated BPTT: (x[:, s : s + context + chunk], y[:, s : s + chunk]) for s = 0, chunk, ...

    x is (B, context + L) as produced by the datasets (context 128s on the left), y is (B, L).
    Consecutive x windows overlap by `context` tokens (SampleRNN: lookback - 1), so each
    window carries exactly the inputs its targets need. The last window may be shorter.
    """
    L = y.shape[-1]
    if x.shape[-1] != context + L:
        raise ValueError(f"x has {x.shape[-1]} steps, expected context + L = {context} + {L}")
    for s in range(0, L, chunk):
        e = min(s + chunk, L)
        yield x[:, s : context + e], y[:, s:e]  # (B, context + e - s), (B, e - s)


def make_loader(
    prepared_dir: str | os.PathLike,
    split: str,
    *,
    kind: str = "ar",
    quantization: str = "mu-law",
    chunk_length: int | None = None,
    context: int = 0,
    length: int | None = None,
    batch_size: int = 1,
    shuffle: bool | None = None,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    return_label: bool = False,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader over a prepared split.

    kind "ar": AutoregressiveDataset + collate_autoregressive (batches (x, y)).
    kind "waveform": WaveformDataset(length) (batches FloatTensor[B, length], or with labels).
    Shuffles the train split by default, with a generator seeded by `seed`.
    """
    s = load_split(prepared_dir, split)
    if kind == "ar":
        ds: Dataset = AutoregressiveDataset(s, quantization, chunk_length, context)
        collate = collate_autoregressive
    elif kind == "waveform":
        if length is None:
            raise UserError("make_loader(kind='waveform') needs length")
        ds, collate = WaveformDataset(s, length, return_label), None
    else:
        raise UserError(f"unknown loader kind {kind!r}; expected 'ar' or 'waveform'")
    if len(ds) == 0:
        raise UserError(
            f"{prepared_dir}: split {s.split!r} has no items (chunk_length={chunk_length})"
        )
    shuffle = s.split == "train" if shuffle is None else shuffle
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        generator=g,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0,
    )
