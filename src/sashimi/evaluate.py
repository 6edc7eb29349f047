"""`sashimi evaluate`: test NLL and SC09 automatic metrics into results/runs/<run>/metrics.json.

    sashimi evaluate --run RUN [--metrics nll,sc09] [--checkpoint PATH] [--split test]
    sashimi evaluate --real sc09 --split train|test   # the SC09 table's real-data rows
    sashimi evaluate --wavs DIR --out FILE.json       # any folder of clips
    sashimi evaluate --release FOLDER                 # one folder of the authors' released clips

nll: bits per sample of the split over every non-padded target (summed in float64), on the
items training saw, in batches of `eval.nll_batch_size`. sc09: FID / IS / mIS / AM of the
run's samples (AR runs: the paper's likelihood-based subset, from loglik.csv) against the TRAIN
split of the run's dataset, with the classifier `eval.sc09_classifier` unless --classifier
names one; --real scores real clips the same way (`eval.real_max_clips`). Each result records
the parameter count and training budget; metrics.json is merged under a lock, atomically.
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

from sashimi.errors import UserError
from sashimi.io import read_json, write_json
from sashimi.score_folder import read_loglik, score_folder

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

    from sashimi.ar_loss import n_targets, nll_sum
    from sashimi.batching import length_multiple, pad_to_multiple
    from sashimi.data.datasets import collate_autoregressive

    model.eval()
    multiple = length_multiple(model)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_autoregressive
    )
    total, count = 0.0, 0
    for x, y in tqdm(loader, disable=not progress, leave=False, desc="nll"):
        x, y = pad_to_multiple(x, y, multiple)
        x, y = x.to(device), y.to(device)
        logits = model(x)  # (B, L, 256)
        total += float(nll_sum(logits, y, torch.float64, chunk=_CE_CHUNK))
        count += n_targets(y)
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
    from sashimi.checkpoints import load_model
    from sashimi.data.datasets import AutoregressiveDataset, load_split

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
def default_classifier_path(P) -> Path:
    """Our classifier: the classifier-sc09 run's best checkpoint (else the first classifier run)."""
    key = DEFAULT_CLASSIFIER_RUN
    if key not in P.runs:
        key = next((k for k, r in P.runs.items() if r.kind == "classifier"), key)
    return Path("results/runs") / key / "checkpoints" / "best.pt"


def eval_settings(P) -> dict[str, Any]:
    """params.yaml `eval` with its defaults filled in."""
    ev = dict(P.raw.get("eval") or {})
    ev.setdefault("sc09_classifier", "ours")
    ev.setdefault("released_classifier", "data/raw/release/sc09_classifier/resnext.pth")
    ev.setdefault("reference", "sc09")
    ev.setdefault("released_samples", "data/raw/release/samples/sc09")
    ev.setdefault("released_models", {})
    ev.setdefault("nll_batch_size", None)  # None: default_nll_batch
    ev.setdefault("real_max_clips", None)  # None: every clip of the split
    return ev


def released_classifier_path(P) -> Path:
    return Path(eval_settings(P)["released_classifier"])


def pick_classifier(P, given: Path | None = None) -> tuple[Path, str]:
    """(checkpoint, source) of the SC09 classifier: --classifier if given, else
    `eval.sc09_classifier`. source is ours | released | other."""
    ours, released = default_classifier_path(P), released_classifier_path(P)
    if given is not None:
        same = {ours.resolve(): "ours", released.resolve(): "released"}
        return given, same.get(Path(given).resolve(), "other")
    if eval_settings(P)["sc09_classifier"] == "released":
        return released, "released"
    return ours, "ours"


def _classifier_result(path: Path, source: str, reference: Path) -> dict[str, str]:
    return {
        "sc09_classifier": str(path),
        "sc09_classifier_source": source,
        "sc09_reference": str(reference),
    }


def evaluate_sc09(
    P,
    run,
    *,
    classifier_path: Path,
    samples: Path | None,
    device: torch.device,
    source: str = "ours",
) -> dict:
    from sashimi.classifier import load_classifier
    from sashimi.sc09_scoring import score_samples

    samples = samples or Path(run.run_dir) / "samples"
    wavs = sorted(samples.glob("*.wav"))
    if not wavs:
        raise UserError(f"{samples}: no .wav samples (run `sashimi sample --run {run.key}` first)")
    kind = run.kind
    loglik = read_loglik(samples, [w.name for w in wavs]) if kind == "ar" else None
    clf = load_classifier(classifier_path, map_location=device)
    reference = P.dataset_of(run.key).prepared_dir  # the generative model's own train split
    res = score_samples(
        wavs,
        clf,
        reference,
        loglik=loglik,
        autoregressive=kind == "ar",
        cache_dir=Path("results/cache"),
        seed=0,
    )
    return dict(res, **_classifier_result(classifier_path, source, reference))


def evaluate_real(
    P,
    dataset_key: str,
    split: str,
    *,
    classifier_path: Path,
    device: torch.device,
    max_clips: int | None = None,
    source: str = "ours",
) -> dict:
    from sashimi.classifier import load_classifier
    from sashimi.sc09_scoring import score_real_split

    ds = P.dataset(dataset_key)
    clf = load_classifier(classifier_path, map_location=device)
    res = score_real_split(
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
        **_classifier_result(classifier_path, source, ds.prepared_dir),
        dataset=dataset_key,
        split=split,
    )


def evaluate_release(P, folder_name: str, *, device: torch.device) -> tuple[dict, Path]:
    """One folder of the authors' released SC09 clips, scored with the released classifier."""
    from sashimi.report.registry import release_metrics_path

    ev = eval_settings(P)
    models = ev["released_models"]
    if folder_name not in models:
        known = ", ".join(models) or "none"
        raise UserError(f"{P.path}: eval.released_models.{folder_name}: no such folder ({known})")
    path, reference = released_classifier_path(P), reference_dir(P)
    res = score_folder(
        Path(ev["released_samples"]) / folder_name,
        path,
        reference,
        device=device,
        sorted_by_likelihood=bool(models[folder_name].get("sorted_by_likelihood", False)),
    )
    return dict(res, **_classifier_result(path, "released", reference)), release_metrics_path(
        folder_name
    )


def reference_dir(P) -> Path:
    """The prepared folder whose TRAIN split gives the reference statistics (`eval.reference`)."""
    key = eval_settings(P)["reference"]
    if key not in P.datasets:
        raise UserError(f"{P.path}: eval.reference: {key!r} is not a key of datasets")
    return Path(P.datasets[key].prepared_dir)


# ============================================================================ CLI
def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="run key in params.yaml")
    p.add_argument(
        "--real", metavar="DATASET", help="score real clips of DATASET (e.g. sc09) instead of a run"
    )
    p.add_argument(
        "--wavs", type=Path, metavar="DIR", help="score any folder of .wav clips (needs --out)"
    )
    p.add_argument(
        "--release",
        metavar="FOLDER",
        help="score one folder of the authors' released SC09 clips (params.yaml eval)",
    )
    p.add_argument("--metrics", default="nll", help="comma-separated: nll, sc09 (default nll)")
    p.add_argument(
        "--checkpoint", type=Path, help="checkpoint (default: the run's best.pt, else last.pt)"
    )
    p.add_argument("--split", default="test", help="split for nll / --real (default test)")
    p.add_argument(
        "--classifier",
        type=Path,
        help="digit classifier checkpoint (default: params.yaml eval.sc09_classifier)",
    )
    p.add_argument("--samples", type=Path, help="samples folder (default results/runs/RUN/samples)")
    p.add_argument(
        "--out", type=Path, help="metrics.json path (default results/runs/<run>/metrics.json)"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")


def _write(out: Path, res: dict) -> int:
    merged = merge_metrics(out, res)
    print(json.dumps({k: merged[k] for k in res}))
    return 0


def run(args: argparse.Namespace) -> int:
    from sashimi.config import load_params
    from sashimi.data.datasets import canonical_split
    from sashimi.distributed import pick_device

    P = load_params(args.params)
    chosen = [f"--{k}" for k in ("run", "real", "wavs", "release") if getattr(args, k)]
    if len(chosen) > 1:
        raise UserError(f"give one of --run, --real, --wavs, --release, not {' and '.join(chosen)}")
    if not chosen:
        raise UserError(
            "evaluate: give --run RUN (or --real DATASET, --wavs DIR, --release FOLDER)"
        )
    device = pick_device(args.device)
    classifier_path, source = pick_classifier(P, args.classifier)
    if args.release:
        if args.classifier:
            raise UserError("--release scores with eval.released_classifier; drop --classifier")
        res, out = evaluate_release(P, args.release, device=device)
        return _write(args.out or out, res)
    if args.wavs:
        if not args.out:
            raise UserError("--wavs DIR needs --out FILE.json")
        reference = reference_dir(P)
        res = score_folder(args.wavs, classifier_path, reference, device=device)
        return _write(args.out, dict(res, **_classifier_result(classifier_path, source, reference)))
    split = canonical_split(args.split)
    if args.real:
        res = evaluate_real(
            P,
            args.real,
            split,
            classifier_path=classifier_path,
            device=device,
            max_clips=eval_settings(P)["real_max_clips"],
            source=source,
        )
        return _write(args.out or Path("results/runs") / f"real-{split}" / "metrics.json", res)
    return _evaluate_run(P, args, split, device, classifier_path, source)


def _evaluate_run(P, args, split: str, device, classifier_path: Path, source: str) -> int:
    """`--run RUN`: NLL and/or SC09 metrics of a trained run into its metrics.json."""
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
    from sashimi.checkpoints import load_model
    from sashimi.tracking import Tracker

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
                    batch_size=eval_settings(P)["nll_batch_size"],
                    progress=progress,
                    loaded=(model, ckpt),
                )
            )
        del model, ckpt  # the sc09 scoring needs neither
        if "sc09" in wanted:
            res.update(
                evaluate_sc09(
                    P,
                    run_cfg,
                    classifier_path=classifier_path,
                    samples=args.samples,
                    device=device,
                    source=source,
                )
            )
    except BaseException as e:
        tracker.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    merge_metrics(args.out or Path(run_cfg.run_dir) / "metrics.json", res)
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
