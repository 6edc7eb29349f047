"""What the generative trainer feeds its model: the train / validation datasets of a prepared
folder, the seeded batch order of each epoch, and loaders that never touch the global RNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sashimi.errors import UserError


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The global batches of one epoch: a permutation seeded by (seed, epoch), cut into
    `batch_size` pieces, the incomplete last one dropped (a split smaller than one batch is
    repeated to fill one)."""
    if n == 0:
        return []
    perm = np.random.default_rng([seed % 2**32, epoch]).permutation(n)  # (n,)
    if n < batch_size:
        perm = np.resize(perm, batch_size)
    return [perm[i * batch_size : (i + 1) * batch_size] for i in range(len(perm) // batch_size)]


def batches_per_epoch(n: int, batch_size: int) -> int:
    """len(epoch_batches(n, batch_size, ...)), without drawing the permutation."""
    return max(n, batch_size) // batch_size if n else 0


def train_val_sets(ds, kind: str, context: int):
    """(train, validation or None) of the prepared dataset `ds` (a DatasetConfig): token pairs
    with `context` left tokens (kind "ar"), or fixed-length waveforms (diffusion)."""
    from sashimi.data.datasets import AutoregressiveDataset, WaveformDataset, load_split

    prepared = Path(ds.prepared_dir)
    if not (prepared / "train.offsets.npy").is_file():
        raise UserError(
            f"{prepared}: dataset {ds.key!r} is not prepared (run `sashimi prepare --key {ds.key}`)"
        )
    if kind == "ar":

        def make(split):
            return AutoregressiveDataset(split, ds.quantization, ds.chunk_length, context=context)
    else:
        length = ds.clip_length or ds.chunk_length
        if not length:
            raise UserError(f"datasets.{ds.key}: a diffusion run needs clip_length or chunk_length")

        def make(split):
            return WaveformDataset(split, length)

    train = make(load_split(prepared, "train"))
    if len(train) == 0:
        raise UserError(
            f"{prepared}: the train split has no items (chunk_length={ds.chunk_length})"
        )
    val = None
    if (prepared / "validation.offsets.npy").is_file():
        val = make(load_split(prepared, "validation"))
    return train, (val if val is not None and len(val) else None)


def loader(
    dataset, batches: list[list[int]], kind: str, num_workers: int, device: torch.device
) -> torch.utils.data.DataLoader:
    """A loader over the given index batches (in order)."""
    from sashimi.data.datasets import collate_autoregressive

    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_autoregressive if kind == "ar" else None,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # never draw from the global RNG (exact resume)
    )
