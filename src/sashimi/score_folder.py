"""SC09 metrics of any folder of .wav clips, under the paper's protocol where it applies.

The protocol (SPEC.md) scores autoregressive samples on a likelihood-ranked subset: a random
half, minus its 40% least and 5% most likely clips. That needs each clip's log-likelihood:
- `loglik.csv` beside the clips (what `sashimi sample` writes): the trim is applied;
- a folder declared `sorted_by_likelihood` whose names are one numbered sequence: the trim is
  applied by rank. The official generate.py sorts its clips by exact log-likelihood before
  numbering them `..._gen_1.wav` (lowest) to `..._gen_N.wav`, and the released
  autoregressive folders are its output; the trim only needs the order, not the values;
- otherwise every clip is scored, and the result says `trimming: not applied` and why.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sashimi.errors import UserError

NOT_TRIMMED = (
    "not applied: the trim keeps a likelihood-ranked subset, and these clips come with no "
    "log-likelihoods (no loglik.csv, no likelihood order), so every clip is scored"
)
BY_RANK = (
    "applied by rank: the clips are numbered in increasing log-likelihood order "
    "(official generate.py); the values themselves were not released"
)


def read_loglik(samples: Path, names: list[str]) -> np.ndarray:
    """Log-likelihoods (nats) of `names`, in order, from samples/loglik.csv."""
    from sashimi.sample import read_loglik_csv

    f = samples / "loglik.csv"
    rows = read_loglik_csv(f)
    if not rows:
        raise UserError(f"{f}: missing or empty; autoregressive samples need their log-likelihoods")
    out = []
    for nm in names:
        v = rows.get(nm, {}).get("loglik_nats", "")
        if v == "":
            raise UserError(f"{f}: no log-likelihood for {nm}")
        out.append(float(v))
    return np.asarray(out, dtype=np.float64)


def natural_key(name: str) -> list:
    """Sort key that puts 'gen_2' before 'gen_10' (the official scripts' natsort order)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def wav_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder of .wav clips")
    wavs = sorted(folder.glob("*.wav"), key=lambda p: natural_key(p.name))
    if len(wavs) < 2:
        raise UserError(f"{folder}: needs at least 2 .wav clips to score, found {len(wavs)}")
    return wavs


def rank_from_names(wavs: list[Path]) -> np.ndarray | None:
    """Each clip's likelihood rank from its trailing number (`..._gen_<k>.wav`, k = 1..N in
    increasing log-likelihood, as the official generate.py names them); None unless the
    numbers are exactly one run of N consecutive integers."""
    nums = []
    for w in wavs:
        m = re.search(r"(\d+)$", w.stem)
        if m is None:
            return None
        nums.append(int(m.group(1)))
    k = np.asarray(nums, dtype=np.int64)  # (N,)
    if len(set(nums)) != len(nums) or k.max() - k.min() != len(nums) - 1:
        return None
    return (k - k.min()).astype(np.float64)


def likelihood_selection(
    folder: Path, wavs: list[Path], sorted_by_likelihood: bool
) -> tuple[np.ndarray | None, str, str]:
    """(log-likelihoods or ranks (N,) or None, selection, trimming note) for a folder."""
    if (folder / "loglik.csv").is_file():
        loglik = read_loglik(folder, [w.name for w in wavs])  # (N,)
        return loglik, "loglik", "applied: log-likelihoods from loglik.csv"
    if sorted_by_likelihood:
        rank = rank_from_names(wavs)
        if rank is not None:
            return rank, "likelihood-order", BY_RANK
        return None, "all", NOT_TRIMMED + "; the names are not one numbered sequence"
    return None, "all", NOT_TRIMMED


def score_folder(
    folder: Path,
    classifier_path: Path,
    reference: Path,
    *,
    device: torch.device,
    sorted_by_likelihood: bool = False,
) -> dict[str, Any]:
    """SC09 metrics of every .wav in `folder` under the paper's protocol, where it applies.

    The clips are classified once; with a likelihood order the protocol's subset gives the
    main numbers and `untrimmed` holds the same metrics on all clips.
    """
    from sashimi.classifier import load_classifier
    from sashimi.classifier_data import read_clips
    from sashimi.metrics import sc09_scores, select_paper_subset
    from sashimi.sc09_scoring import classify, reference_stats

    wavs = wav_files(folder)
    loglik, selection, note = likelihood_selection(folder, wavs, sorted_by_likelihood)
    clf = load_classifier(classifier_path, map_location=device)
    feats, probs = classify(clf, read_clips(wavs))  # (N, d), (N, 10)
    ref = reference_stats(clf, reference, "train", cache_dir=Path("results/cache"))

    def scores(idx: np.ndarray) -> dict[str, float]:
        return sc09_scores(feats[idx], probs[idx], ref["mu"], ref["cov"], ref["probs"])

    everything = np.arange(len(wavs))
    idx = everything if loglik is None else select_paper_subset(loglik, seed=0)
    out: dict[str, Any] = dict(scores(idx), n_scored=int(len(idx)), n_generated=len(wavs))
    out.update(selection=selection, trimming=note, samples=str(folder))
    if loglik is not None:
        out["untrimmed"] = dict(scores(everything), n_scored=len(wavs))
    return out
