"""`sashimi rehearse`: every paper run of params.yaml, a few steps each, before any GPU is spent.

    sashimi rehearse [--data ../shared/data] [--runs KEY,KEY] [--device auto|cpu|cuda]
                     [--exact | --max-tokens N] [--workdir results/rehearsal]

Per paper run (scale: paper): train 1 step, resume it for 1 more, sample, evaluate, each phase
in a process of its own (`rehearse_phases`). Models, sequence lengths and sampling batches are
the paper's; training batches too with --exact (the default on CUDA), else cut to at most
--max-tokens samples per step (never below one item), seconds per step and memory scaled back
to the paper batch (linear; marked). Everything goes under --workdir, never results/runs. Data:
real audio from --data (sc09_sample/, piano/), else synthetic audio at the paper lengths.
Output: results/tables/rehearsal.{csv,md} (`rehearse_table`), one row per run, with its GPU
cost: the step budget (train.max_steps, or max_epochs x steps per epoch) times GPU seconds per
step measured here on CUDA, else README's H100 figure for the SaShiMi SC09 training shape.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

from sashimi.errors import UserError
from sashimi.io import SAMPLE_RATE
from sashimi.rehearse_phases import run_phase
from sashimi.rehearse_table import TABLE, passed_rows, write_table

DEFAULT_MAX_TOKENS = 16000  # CPU training batch cap in samples per step: one SC09 clip
CLASSIFIER_TOKENS = 16000  # one classifier item: a 1 s clip
V01_TRAIN_CLIPS = 18620  # Speech Commands v0.01 digit train split (the classifier's epoch)
# Train items of the paper-size datasets (one epoch): SC09 v0.02 and v0.01 digit train splits;
# Beethoven 88% of 4,328 8-s clips (one 128,000-sample chunk each); YouTubeMix 88% of 241
# one-minute files x 7 chunks of 131,072. official_recipes.yaml derives the same 973 / 3,808 /
# 1,484 steps per epoch at its batch sizes.
PAPER_TRAIN_ITEMS = {"sc09": 31158, "sc09-v1": V01_TRAIN_CLIPS, "beethoven": 3808,
                     "youtubemix": 212 * 7}  # fmt: skip

# README.md, H100 table: `bench train --device cuda --amp --batch 32 --length 16000` (SaShiMi
# SC09 model, bf16 autocast as train.amp). The only paper training shape measured on a GPU.
H100_REFERENCE = {"run": "sashimi-sc09", "batch": 32, "length": 16000, "s_per_step": 0.205}
H100_SOURCE = "README H100 (bench train --amp --batch 32 --length 16000)"


# ============================================================================ shapes
def item_tokens(P, run) -> int:
    """Samples one batch item contributes to one optimiser step (a TBPTT window, a clip, a chunk)."""
    if run.kind == "classifier":
        return CLASSIFIER_TOKENS
    length = sequence_length(P, run)
    return min(length, run.train.tbptt) if run.train.tbptt else length


def sequence_length(P, run) -> int:
    """The sequence length a training item has at paper scale."""
    if run.kind == "classifier":
        return CLASSIFIER_TOKENS
    ds = P.dataset_of(run.key)
    return int(ds.chunk_length or ds.clip_length or SAMPLE_RATE)


def rehearsal_batch(batch: int, tokens: int, max_tokens: int | None) -> int:
    """The paper batch, cut to at most `max_tokens` samples per step (at least one item)."""
    if max_tokens is None:
        return batch
    return max(1, min(batch, max_tokens // max(1, tokens)))


def paper_runs(P) -> list[str]:
    """Every run: the classifier first (the SC09 runs' evaluation uses its checkpoint), the
    diffusion runs (the slowest on a CPU) last, params.yaml's order otherwise."""
    order = {"classifier": 0, "ar": 1, "diffusion": 2}
    return sorted(P.runs, key=lambda k: order.get(P.runs[k].kind, 1))


# ============================================================================ cost projection
def step_budget(P, run) -> tuple[int | None, str]:
    """(optimiser steps of the real run, where the number comes from): train.max_steps, or
    max_epochs x the steps of one epoch of the full dataset (the lower when both are set)."""
    tc = run.train
    per_epoch = steps_per_epoch(P, run)
    by_epochs = tc.max_epochs * per_epoch if tc.max_epochs and per_epoch else None
    if tc.max_steps is not None and (by_epochs is None or tc.max_steps <= by_epochs):
        return int(tc.max_steps), "train.max_steps"
    if by_epochs is not None:
        return by_epochs, f"train.max_epochs {tc.max_epochs} x {per_epoch} steps/epoch"
    return None, "no step budget for the full dataset"


def steps_per_epoch(P, run) -> int | None:
    """Optimiser steps in one epoch of the paper-size dataset (TBPTT: windows per batch too)."""
    items = PAPER_TRAIN_ITEMS.get(run.dataset)
    if items is None:
        return None
    windows = -(-sequence_length(P, run) // run.train.tbptt) if run.train.tbptt else 1
    return items // run.train.batch_size * windows


def gpu_seconds(rows: list[dict], gpu_measured: bool) -> None:
    """Fill gpu_s_per_step / gpu_source / projected_gpu_hours of every row (in place): measured
    here on CUDA, else README's H100 figure where the run is its shape, else left empty."""
    for r in rows:
        measured = _num(r.get("train_s_per_step_paper_batch"))
        gpu, source = None, "no GPU figure (rehearse on CUDA)"
        if gpu_measured and measured is not None:
            gpu, source = measured, "measured here (GPU)"
        elif (
            r["run"] == H100_REFERENCE["run"]
            and _num(r.get("paper_batch")) == H100_REFERENCE["batch"]
            and _num(r.get("length")) == H100_REFERENCE["length"]
        ):
            gpu, source = H100_REFERENCE["s_per_step"], H100_SOURCE
        r["gpu_s_per_step"] = gpu
        r["gpu_source"] = source
        budget = _num(r.get("budget_steps"))
        r["projected_gpu_hours"] = (
            None if gpu is None or budget is None else round(budget * gpu / 3600, 1)
        )


def _num(v: Any) -> float | None:
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


# ============================================================================ data
def prepare_data(
    P, keys: list[str], workdir: Path, data_root: Path | None, shown_root: Path | None = None
) -> str:
    """Prepared splits of the runs' datasets under workdir/data/prepared; returns a description
    that names the data as the user gave it (`shown_root`, e.g. ../shared/data)."""
    from sashimi.data.prepare import prepare

    used = sorted({P.runs[k].dataset for k in keys})
    what = []
    for key in used:
        ds = P.dataset(key)
        out = workdir / ds.prepared_dir
        speech = ds.chunk_length is None  # SC09-like clips, else music chunks
        sub = "sc09_sample" if speech else "piano"
        real = data_root / sub if data_root else None
        if real is not None and real.is_dir():
            prepare("sc09" if speech else "folder", real, out, key=key, progress=False)
            what.append(f"{key}: real ({(shown_root or data_root) / sub})")
        elif speech:
            prepare("synth-digits", None, out, n_clips=40, key=key, progress=False)
            what.append(f"{key}: synthetic digits")
        else:
            seconds = 2.2 * (ds.chunk_length or SAMPLE_RATE) / SAMPLE_RATE
            prepare("synth-piano", None, out, n_clips=10, seconds=seconds, key=key, progress=False)
            what.append(f"{key}: synthetic piano ({seconds:.1f} s clips)")
    return "; ".join(what)


# ============================================================================ one run
def rehearse_run(P, key: str, base_spec: dict, max_tokens: int | None, timeout_s: float) -> dict:
    """Every phase of run `key`; a table row. Stops at the first failing phase."""
    run = P.run(key)
    paper_b = run.train.batch_size
    b = rehearsal_batch(paper_b, item_tokens(P, run), max_tokens)
    length = sequence_length(P, run)
    budget, budget_source = step_budget(P, run)
    row: dict[str, Any] = {
        "run": key, "kind": run.kind, "model": run.model_name, "paper_batch": paper_b,
        "rehearsed_batch": b, "length": length, "budget_steps": budget,
        "budget_source": budget_source,
    }  # fmt: skip
    spec = dict(base_spec, run=key, batch=b, length=length)
    t0 = time.monotonic()
    steps, bound = [], False
    plan = [
        ("train", dict(spec, steps=1, resume=False)),
        ("train", dict(spec, steps=2, resume=True)),
    ]
    plan += [("sample", dict(spec, steps=2)), ("evaluate", dict(spec, steps=2))]
    train_rss, status = [], "ok"
    for phase, s in plan:
        res = run_phase(phase, s, timeout_s)
        if "error" in res:
            status = res["error"]
            break
        if phase == "train":
            row["params"] = res["params"]
            steps.extend(res["step_s"])
            bound = res.get("upper_bound", False)
            train_rss.append((res["peak_rss_mb"], res.get("rss_before_step_mb")))
        elif phase == "sample":
            row["sample_shape"] = res["shape"]
            row["sample_s_per_step"] = _round(res.get("s_per_step"))
            row["sample_peak_rss_mb"] = res["peak_rss_mb"] if run.kind != "classifier" else None
        else:
            row["eval"] = res["eval"]
            row["eval_peak_rss_mb"] = res["peak_rss_mb"]
    row["status"] = status
    if steps:
        here = steps[-1]  # the last step: warm (the first pays for allocation and set-up)
        row["train_s_per_step"] = _round(here)
        if not bound:  # a fit's time over its steps (validation included) does not scale
            row["train_s_per_step_paper_batch"] = _round(here * paper_b / b)
    if train_rss:
        peak, before = max(train_rss, key=lambda t: t[0])
        row["train_peak_rss_mb"] = peak
        if b == paper_b:
            row["train_peak_rss_mb_paper_batch"] = peak
        elif before:  # what the step added, times the batch ratio
            row["train_peak_rss_mb_paper_batch"] = round(before + (peak - before) * paper_b / b, 1)
    row["wall_s"] = round(time.monotonic() - t0, 1)
    return row


def _round(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)


# ============================================================================ CLI
def configure_parser(p: argparse.ArgumentParser) -> None:
    default_data = Path("../shared/data")
    p.add_argument("--data", type=Path, default=default_data if default_data.is_dir() else None,
                   help="real audio (sc09_sample/, piano/); default ../shared/data when present, "
                   "else synthetic audio")  # fmt: skip
    p.add_argument("--runs", help="comma-separated run keys (default: every run)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--exact", action="store_true",
                   help="train at the paper batch (default on CUDA; on a CPU batches are cut to "
                   "--max-tokens samples per step)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="CPU training batch cap in samples per step")  # fmt: skip
    p.add_argument("--workdir", type=Path, default=Path("results/rehearsal"),
                   help="where the rehearsal's data, checkpoints and samples go")  # fmt: skip
    p.add_argument("--keep", action="store_true",
                   help="keep the rows of runs that passed in the existing table (continue)")  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="torch threads per phase")
    p.add_argument("--memory-gb", type=float, default=16.0,
                   help="address-space limit of each phase's process (0: none)")  # fmt: skip
    p.add_argument("--phase-timeout", type=float, default=1800.0, help="seconds per phase")


def run(args: argparse.Namespace) -> int:
    import torch

    from sashimi.config import load_params

    P = load_params(args.params, scale="paper")
    keys = paper_runs(P)
    if args.runs:
        wanted = [k.strip() for k in args.runs.split(",") if k.strip()]
        for k in wanted:
            P.run(k)  # names the unknown key
        keys = [k for k in keys if k in wanted]
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available")
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens: {args.max_tokens} must be at least 1")
    max_tokens = None if args.exact or device == "cuda" else args.max_tokens
    if args.data is not None and not args.data.is_dir():
        raise UserError(f"--data {args.data}: folder not found")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed rehearsal kills its phase
    t0 = time.monotonic()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data_root = args.data.resolve() if args.data else None
    with contextlib.chdir(workdir):
        data = prepare_data(P, keys, workdir, data_root, args.data)
    base = {"params": str(Path(args.params).resolve()), "workdir": str(workdir),
            "device": device, "threads": args.threads, "memory_gb": args.memory_gb}  # fmt: skip
    rows: list[dict] = []
    kept = passed_rows(TABLE.with_suffix(".csv")) if args.keep else {}
    for key in keys:
        if key in kept:
            row = kept[key]
            row["budget_steps"], row["budget_source"] = step_budget(P, P.run(key))
            print(f"rehearse {key}: kept from {TABLE}.csv", flush=True)
        else:
            row = rehearse_run(P, key, base, max_tokens, args.phase_timeout)
            print(f"rehearse {key}: {row['status']} ({row['wall_s']} s)", flush=True)
        rows.append(row)
        _report(rows, device, args.threads, data, max_tokens, time.monotonic() - t0, len(keys))
    print(f"wrote {TABLE}.csv and {TABLE}.md")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _report(rows, device, threads, data, max_tokens, wall_s, n_runs) -> None:
    """The table so far (rewritten after every run, so a long rehearsal leaves what it did)."""
    gpu_seconds(rows, gpu_measured=device == "cuda")
    load = os.getloadavg()[0]
    batches = (
        "paper"
        if max_tokens is None
        else f"cut to <= {max_tokens} samples per step; paper-batch columns scale linearly"
    )
    header = [
        "# Paper-scale rehearsal (`sashimi rehearse`)",
        "",
        f"- machine: {platform.processor() or platform.machine()}, device {device}, "
        f"{threads} torch threads per phase, {os.cpu_count()} CPUs, 1-min load average "
        f"{load:.1f} when written",
        f"- data: {data}",
        f"- training batches: {batches}",
        f"- runs: {len(rows)} of {n_runs} rehearsed; wall time {wall_s:.0f} s",
        "- projected GPU h = budget steps x GPU s/step; empty where no GPU figure applies",
    ]
    write_table(rows, header)
