"""SC09 metrics (FID / IS / mIS / AM) of clips, scored with the digit classifier.

SPEC "SC09 evaluation protocol": features and class probabilities of the generated clips
against those of the real TRAIN split (`reference_stats`, cached by classifier checkpoint,
dataset manifest and split); autoregressive runs score only the likelihood-ranked subset that
`metrics.select_paper_subset` picks. The formulas are `metrics.sc09_scores`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sashimi import metrics
from sashimi.classifier import CLIP_LENGTH, DigitClassifier, fix_length
from sashimi.classifier_data import LabelledWaves, labelled_split, read_clips, split_exists
from sashimi.errors import UserError
from sashimi.io import atomic_write


def classify(
    classifier: DigitClassifier, waves: np.ndarray | torch.utils.data.Dataset, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, feature_dim), probs (N, 10)) as float64; softmax in float64."""
    dev = next(classifier.parameters()).device
    classifier.eval()
    feats, logits = [], []
    if isinstance(waves, np.ndarray):
        batches = (
            torch.from_numpy(np.ascontiguousarray(waves[i : i + batch_size], dtype=np.float32))
            for i in range(0, len(waves), batch_size)
        )
    else:
        batches = (x for x, _ in torch.utils.data.DataLoader(waves, batch_size=batch_size))
    with torch.no_grad():
        for x in batches:
            if not torch.isfinite(x).all():
                raise UserError("audio to classify contains NaN or inf samples")
            f, z = classifier.features_and_logits(x.to(dev))
            feats.append(f.double().cpu().numpy())
            logits.append(z.double().cpu().numpy())
    if not feats:
        raise UserError("no clips to classify")
    z = np.concatenate(logits)  # (N, 10)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return np.concatenate(feats), p / p.sum(axis=1, keepdims=True)


def classifier_fingerprint(classifier: DigitClassifier) -> str:
    """sha256 of the checkpoint file it was loaded from, else of its state_dict tensors."""
    if getattr(classifier, "checkpoint_sha256", None):
        return classifier.checkpoint_sha256
    h = hashlib.sha256()
    for k, v in classifier.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def dataset_checksum(prepared_dir: str | Path, split: str = "train") -> str:
    """sha256 of the prepared folder's manifest.json (else of the split's offsets + audio size)."""
    d = Path(prepared_dir)
    h = hashlib.sha256()
    if (d / "manifest.json").is_file():
        h.update((d / "manifest.json").read_bytes())
    else:
        offsets = d / f"{split}.offsets.npy"
        if not offsets.is_file():
            raise UserError(f"{offsets}: not found (is {d} a prepared dataset folder?)")
        h.update(offsets.read_bytes())
        h.update(str((d / f"{split}.audio.npy").stat().st_size).encode())
    return h.hexdigest()


def reference_stats(
    classifier: DigitClassifier,
    reference_dir: str | Path,
    split: str = "train",
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Feature mean (d,), covariance (d, d) and probabilities (N, 10) of a real split.

    Cached as cache_dir/ref_stats_<sha>.npz, sha over the classifier checkpoint's sha256, the
    reference manifest's checksum and the split name.
    """
    key = hashlib.sha256(
        f"{classifier_fingerprint(classifier)}|{dataset_checksum(reference_dir, split)}|{split}".encode()
    ).hexdigest()[:32]
    cache = Path(cache_dir) / f"ref_stats_{key}.npz" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    data = labelled_split(reference_dir, split) if split_exists(reference_dir, split) else None
    if data is None or len(data) < 2:
        raise UserError(f"{reference_dir}: split {split!r} is missing or has fewer than 2 clips")
    feats, probs = classify(classifier, data, batch_size)
    stats = dict(
        mu=feats.mean(axis=0),
        cov=np.atleast_2d(np.cov(feats, rowvar=False)),
        probs=probs,
        n=np.array(len(feats)),
    )
    if cache is not None:
        with atomic_write(cache, "wb") as f:
            np.savez(f, **stats)
    return stats


def _scores(feats: np.ndarray, probs: np.ndarray, ref: dict[str, np.ndarray]) -> dict[str, float]:
    return metrics.sc09_scores(feats, probs, ref["mu"], ref["cov"], ref["probs"])


def score_samples(
    wav_paths: Sequence[str | Path] | np.ndarray,
    classifier: DigitClassifier,
    reference_dir: str | Path,
    loglik: np.ndarray | None = None,
    autoregressive: bool = True,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, float | int]:
    """SC09 metrics of generated clips (paths to audio files, or an (N, L) array at 16 kHz).

    Autoregressive runs: only the clips `metrics.select_paper_subset(loglik, seed)` picks are
    scored (10,240 -> 2,816); diffusion runs: all. Reference: the TRAIN split of the prepared
    `reference_dir`, statistics cached in `cache_dir`. Returns fid, is (paper), is_textbook,
    mis, am, n_scored, n_generated.
    """
    n_generated = len(wav_paths)
    if autoregressive:
        if loglik is None:
            raise UserError(
                "autoregressive samples need their log-likelihoods (samples/loglik.csv) "
                "for the paper's selection; pass autoregressive=False to score all"
            )
        loglik = np.asarray(loglik, dtype=np.float64).reshape(-1)
        if len(loglik) != n_generated:
            raise UserError(f"{len(loglik)} log-likelihoods for {n_generated} samples")
        idx = metrics.select_paper_subset(loglik, seed=seed)
    else:
        idx = np.arange(n_generated)
    if isinstance(wav_paths, np.ndarray):
        waves = np.asarray(wav_paths, dtype=np.float32)[idx]  # (n, L)
        if waves.ndim != 2:
            raise UserError(f"samples: expected an (N, L) array, got shape {np.shape(wav_paths)}")
        if waves.shape[1] != CLIP_LENGTH:
            waves = fix_length(torch.from_numpy(waves), CLIP_LENGTH).numpy()
    else:
        waves = read_clips([wav_paths[i] for i in idx])
    feats, probs = classify(classifier, waves, batch_size)
    ref = reference_stats(classifier, reference_dir, "train", cache_dir, batch_size)
    return dict(_scores(feats, probs, ref), n_scored=int(len(idx)), n_generated=int(n_generated))


def score_real_split(
    prepared_dir: str | Path,
    split: str,
    classifier: DigitClassifier,
    reference_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    max_clips: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, float | int]:
    """The paper table's "Train" / "Test" rows: real clips of `split` scored against the train
    split of `reference_dir` (default: the same folder). `max_clips` takes a seeded subset."""
    reference_dir = prepared_dir if reference_dir is None else reference_dir
    data = labelled_split(prepared_dir, split)
    n = len(data)
    if max_clips is not None and n > max_clips:
        data = LabelledWaves(
            data.source,
            data.labels,
            indices=np.sort(np.random.RandomState(seed).permutation(n)[:max_clips]),
        )
    feats, probs = classify(classifier, data, batch_size)
    ref = reference_stats(classifier, reference_dir, "train", cache_dir, batch_size)
    return dict(_scores(feats, probs, ref), n_scored=int(len(data)), n_generated=int(n))
