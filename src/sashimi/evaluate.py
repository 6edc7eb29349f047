"""`sashimi evaluate`: test NLL and SC09 automatic metrics into results/runs/<run>/metrics.json.

    sashimi evaluate --run RUN [--metrics nll,sc09] [--checkpoint PATH] [--split test]
                     [--classifier CKPT] [--samples DIR] [--batch-size B]
    sashimi evaluate --real sc09 --split train|test [--classifier CKPT] [--max-clips N]

- always: `params` (parameter count of the evaluated checkpoint's model), and the training
  budget behind it, `train_steps` and `train_minutes` (from train_log.csv, else the
  checkpoint), for every run, diffusion runs included.
- nll: cross-entropy of the split in bits per sample (nats / ln 2), averaged over every
  non-padded target position, batched (by default about 2^19 tokens per batch, at least
  train.batch_size items) under torch.inference_mode, summed in float64. Items are what
  training saw: whole clips (SC09) or the dataset's non-overlapping `chunk_length` chunks
  (music), each min-max quantised on its own. Writes nll_bits, nll_checkpoint, nll_step,
  n_tokens, nll_batch_size (and nll_split). Not defined for diffusion runs (skipped with a
  note).
- sc09: `sashimi.classifier.score_samples` on the run's samples/ (autoregressive runs: the
  paper's likelihood-based subset, from samples/loglik.csv; diffusion runs: all clips),
  against the TRAIN split of the run's own dataset. Writes fid, is, is_textbook, mis, am,
  n_scored, n_generated.
- --real DATASET: the paper table's Train / Test rows (real clips scored the same way) into
  results/runs/real-<split>/metrics.json.

metrics.json is merged under a file lock (other keys are never dropped) and written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sashimi.errors import UserError
from sashimi.io import read_json, write_json

LN2 = math.log(2.0)
IGNORE_INDEX = -100
DEFAULT_CLASSIFIER_RUN = "classifier-sc09"
METRICS = ("nll", "sc09")
NLL_BATCH_TOKENS = 1 << 19  # default NLL batch: about this many tokens (logits: 2 GB at float32)
_CE_CHUNK = 1 << 15  # targets per float64 cross-entropy call (bounds the float64 copy's memory)


# ============================================================================ metrics.json
@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(lock, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def merge_metrics(path: str | os.PathLike, new: dict[str, Any]) -> dict[str, Any]:
    """Read metrics.json (if any), update it with `new`, write it back atomically, under a lock."""
    path = Path(path)
    with _locked(path):
        old = read_json(path) if path.is_file() else {}
        if not isinstance(old, dict):
            raise UserError(f"{path}: expected a JSON object")
        old.update(new)
        write_json(path, old)
    return old


# ============================================================================ NLL
@torch.inference_mode()
def nll_bits(
    model: torch.nn.Module, dataset, batch_size: int, device: torch.device, progress: bool = False
) -> tuple[float, int]:
    """(mean bits per sample, number of scored targets) of an AutoregressiveDataset, in order.

    Sums the cross-entropy in float64 over every non-padded target; batches are right-padded
    (inputs with 128, targets ignored) to a length the model accepts.
    """
    from tqdm import tqdm

    from sashimi.data.datasets import collate_autoregressive
    from sashimi.batching import length_multiple, pad_to_multiple

    model.eval()
    multiple = length_multiple(model)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_autoregressive
    )
    total, count = 0.0, 0
    for x, y in tqdm(loader, disable=not progress, leave=False, desc="nll"):
        x, y = pad_to_multiple(x, y, multiple)
        x, y = x.to(device), y.to(device)
        logits = model(x).flatten(0, 1)  # (B L, 256)
        y = y.flatten()  # (B L,)
        for lo in range(0, y.numel(), _CE_CHUNK):
            total += float(
                F.cross_entropy(
                    logits[lo : lo + _CE_CHUNK].double(),
                    y[lo : lo + _CE_CHUNK],
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            )
        count += int((y != IGNORE_INDEX).sum())
    if count == 0:
        raise UserError("nll: the split has no targets")
    return total / count / LN2, count


def default_nll_batch(train_batch: int, item_tokens: int, n_items: int) -> int:
    """About NLL_BATCH_TOKENS tokens per batch, at least the training batch, at most the split."""
    return max(1, min(n_items, max(train_batch, NLL_BATCH_TOKENS // max(1, item_tokens))))


def evaluate_nll(
    P,
    run,
    *,
    checkpoint: str | os.PathLike | None,
    split: str,
    device: torch.device,
    batch_size: int | None = None,
    progress: bool = False,
    loaded: tuple[torch.nn.Module, dict] | None = None,
) -> dict[str, Any]:
    """Test NLL of the run's checkpoint (`loaded`: a (model, ckpt) already read by load_model)."""
    from sashimi.data.datasets import AutoregressiveDataset, load_split
    from sashimi.checkpoints import load_model

    model, ckpt = loaded or load_model(checkpoint or run.run_dir, map_location=device)
    n_params = sum(p.numel() for p in model.parameters())
    if ckpt.get("kind", run.kind) != "ar":
        print(
            f"note: {run.key} is a {ckpt.get('kind', run.kind)} run; NLL is not defined, skipped",
            file=sys.stderr,
        )
        return {"params": n_params, "nll_note": "not defined for diffusion models"}
    ds = P.dataset_of(run.key)
    prepared = Path(ds.prepared_dir)
    if not (prepared / f"{split}.offsets.npy").is_file():
        raise UserError(
            f"{prepared}: split {split!r} is not prepared (run `sashimi prepare --key {ds.key}`)"
        )
    audio = load_split(prepared, split)
    context = int(getattr(model, "context", 0))
    data = AutoregressiveDataset(audio, ds.quantization, ds.chunk_length, context=context)
    if len(data) == 0:
        raise UserError(
            f"{prepared}: split {split!r} has no items (chunk_length={ds.chunk_length})"
        )
    longest = int(np.diff(audio.offsets).max()) if ds.chunk_length is None else ds.chunk_length
    B = batch_size or default_nll_batch(run.train.batch_size, context + longest, len(data))
    bits, n_tokens = nll_bits(model, data, B, device, progress)
    return {
        "nll_bits": bits,
        "nll_checkpoint": str(ckpt["path"]),
        "nll_step": int(ckpt.get("step", 0)),
        "nll_split": split,
        "nll_batch_size": B,
        "n_tokens": n_tokens,
        "params": n_params,
    }


def training_budget(run, ckpt: dict) -> dict[str, Any]:
    """`train_steps` and `train_minutes` of the run's training (over resumes): the last row of
    train_log.csv, else the checkpoint's own step / elapsed_s; keys left out when unknown."""
    steps, seconds = None, None
    log = Path(run.run_dir) / "train_log.csv"
    if log.is_file():
        with open(log, newline="") as f:
            for r in csv.DictReader(f):
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    steps = max(steps or 0, int(r["step"]))
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    seconds = max(seconds or 0.0, float(r["elapsed_s"]))
    if steps is None and ckpt.get("step") is not None:
        steps = int(ckpt["step"])
    if seconds is None and ckpt.get("elapsed_s") is not None:
        seconds = float(ckpt["elapsed_s"])
    out: dict[str, Any] = {}
    if steps is not None:
        out["train_steps"] = steps
    if seconds is not None:
        out["train_minutes"] = round(seconds / 60, 4)
    return out


# ============================================================================ SC09
def _classifier_module():
    try:
        from sashimi import classifier
    except ImportError as e:
        raise UserError(
            f"--metrics sc09 needs sashimi.classifier, which is not available ({e})"
        ) from None
    for name in ("load_classifier", "score_samples", "score_real_split"):
        if not hasattr(classifier, name):
            raise UserError(f"--metrics sc09: sashimi.classifier has no {name}() yet")
    return classifier


def default_classifier_path(P) -> Path:
    key = DEFAULT_CLASSIFIER_RUN
    if key not in P.runs:
        key = next((k for k, r in P.runs.items() if r.kind == "classifier"), key)
    return Path("results/runs") / key / "checkpoints" / "best.pt"


def read_loglik(samples: Path, names: list[str]) -> np.ndarray:
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


def evaluate_sc09(
    P, run, *, classifier_path: Path, samples: Path | None, device: torch.device
) -> dict:
    clf_mod = _classifier_module()
    samples = samples or Path(run.run_dir) / "samples"
    wavs = sorted(samples.glob("*.wav"))
    if not wavs:
        raise UserError(f"{samples}: no .wav samples (run `sashimi sample --run {run.key}` first)")
    kind = run.kind
    loglik = read_loglik(samples, [w.name for w in wavs]) if kind == "ar" else None
    clf = clf_mod.load_classifier(classifier_path, map_location=device)
    reference = P.dataset_of(run.key).prepared_dir  # the generative model's own train split
    res = clf_mod.score_samples(
        wavs,
        clf,
        reference,
        loglik=loglik,
        autoregressive=kind == "ar",
        cache_dir=Path("results/cache"),
        seed=0,
    )
    return dict(res, sc09_classifier=str(classifier_path), sc09_reference=str(reference))


def evaluate_real(
    P,
    dataset_key: str,
    split: str,
    *,
    classifier_path: Path,
    device: torch.device,
    max_clips: int | None = None,
) -> dict:
    clf_mod = _classifier_module()
    ds = P.dataset(dataset_key)
    clf = clf_mod.load_classifier(classifier_path, map_location=device)
    res = clf_mod.score_real_split(
        ds.prepared_dir,
        split,
        clf,
        reference_dir=ds.prepared_dir,
        cache_dir=Path("results/cache"),
        max_clips=max_clips,
        seed=0,
    )
    return dict(
        res,
        sc09_classifier=str(classifier_path),
        sc09_reference=str(ds.prepared_dir),
        dataset=dataset_key,
        split=split,
    )


# ============================================================================ CLI
def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="run key in params.yaml")
    p.add_argument(
        "--real", metavar="DATASET", help="score real clips of DATASET (e.g. sc09) instead of a run"
    )
    p.add_argument("--metrics", default="nll", help="comma-separated: nll, sc09 (default nll)")
    p.add_argument(
        "--checkpoint", type=Path, help="checkpoint (default: the run's best.pt, else last.pt)"
    )
    p.add_argument("--split", default="test", help="split for nll / --real (default test)")
    p.add_argument(
        "--classifier",
        type=Path,
        help="digit classifier checkpoint "
        "(default results/runs/classifier-sc09/checkpoints/best.pt)",
    )
    p.add_argument("--samples", type=Path, help="samples folder (default results/runs/RUN/samples)")
    p.add_argument("--batch-size", type=int, help="NLL batch size (default train.batch_size)")
    p.add_argument("--max-clips", type=int, help="--real: score a seeded subset of this many clips")
    p.add_argument(
        "--out", type=Path, help="metrics.json path (default results/runs/<run>/metrics.json)"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from sashimi.config import load_params
    from sashimi.data.datasets import canonical_split
    from sashimi.distributed import pick_device

    P = load_params(args.params)
    device = pick_device(args.device)
    split = canonical_split(args.split)
    classifier_path = args.classifier or default_classifier_path(P)
    if args.real:
        if args.run:
            raise UserError("give either --run or --real, not both")
        res = evaluate_real(
            P,
            args.real,
            split,
            classifier_path=classifier_path,
            device=device,
            max_clips=args.max_clips,
        )
        out = args.out or Path("results/runs") / f"real-{split}" / "metrics.json"
        merged = merge_metrics(out, res)
        print(json.dumps({k: merged[k] for k in res}))
        return 0
    if not args.run:
        raise UserError("evaluate: give --run RUN (or --real DATASET)")
    run_cfg = P.run(args.run)
    if run_cfg.kind == "classifier":
        raise UserError(
            f"runs.{args.run}: use `sashimi classifier test --run {args.run}` for the classifier"
        )
    wanted = [m.strip() for m in args.metrics.split(",") if m.strip()]
    for m in wanted:
        if m not in METRICS:
            raise UserError(f"--metrics: unknown metric {m!r} (known: {', '.join(METRICS)})")
    progress = (
        not args.no_progress
        and sys.stderr.isatty()
        and os.environ.get("SASHIMI_PROGRESS", "1") != "0"
    )
    from sashimi.tracking import Tracker
    from sashimi.checkpoints import load_model

    model, ckpt = load_model(args.checkpoint or run_cfg.run_dir, map_location=device)
    # MLflow (its own worker process) starts now and logs while we evaluate
    tracker = Tracker(
        run_cfg.key, run_dir=run_cfg.run_dir, root=Path(args.params).resolve().parent
    ).start()
    res: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    try:
        res.update(training_budget(run_cfg, ckpt))
        if "nll" in wanted:
            res.update(
                evaluate_nll(
                    P,
                    run_cfg,
                    checkpoint=args.checkpoint,
                    split=split,
                    device=device,
                    batch_size=args.batch_size,
                    progress=progress,
                    loaded=(model, ckpt),
                )
            )
        del model, ckpt  # the sc09 scoring needs neither
        if "sc09" in wanted:
            res.update(
                evaluate_sc09(
                    P, run_cfg, classifier_path=classifier_path, samples=args.samples, device=device
                )
            )
    except BaseException as e:
        tracker.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    out = args.out or Path(run_cfg.run_dir) / "metrics.json"
    merge_metrics(out, res)
    _track(tracker, res)
    print(json.dumps(res))
    return 0


def _track(tracker, res: dict) -> None:
    """Numbers of `res` as eval/<key> metrics of the run's MLflow run; ends it (never fails)."""
    scalars = {
        f"eval/{k}": float(v)
        for k, v in res.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
    tracker.log_metrics(scalars, step=int(res.get("nll_step", 0)))
    tracker.close("FINISHED")
