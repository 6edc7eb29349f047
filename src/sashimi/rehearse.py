"""`sashimi rehearse`: every paper run of params.yaml, a few steps each, before any GPU is spent.

    sashimi rehearse [--data ../shared/data] [--runs KEY,KEY] [--device auto|cpu|cuda]
                     [--exact | --max-tokens N] [--workdir results/rehearsal]

Per paper run (scale: paper), each phase in a process of its own, so that its peak memory is
the phase's alone:
- train: 1 optimiser step through `sashimi.train.Trainer` (the `sashimi train` code path,
  validation on one batch), checkpoint written;
- resume: the run resumed from that `last.pt` for 1 more step;
- sample: autoregressive runs: SAMPLE_STEPS recurrent steps at the run's sampling batch through
  `sashimi.sample.sample_run`; diffusion runs: DIFFUSION_STEPS denoising steps of the fast
  sampler at the clip length, DIFFUSION_CLIPS clips;
- evaluate: autoregressive runs: NLL of a handful of test items (about EVAL_TOKENS samples);
  SC09 runs: FID / IS / mIS / AM of their samples with the rehearsal's own classifier;
  classifier: test accuracy.
Seconds per step are the last step's (warm); the classifier's trainer has no per-step hook,
so its figure is the resumed fit (validation included) and is not scaled. Models, sequence
lengths and sampling batches are the paper's. Training batches are the
paper's with --exact (the default on CUDA); on a CPU a batch is cut to at most --max-tokens
samples per step (never below one item), and seconds per step and memory are scaled back to
the paper batch (linear in the batch; marked). Everything is written under --workdir, never
into results/runs. Data: real audio from --data (sc09_sample/ for the SC09 datasets, piano/
for Beethoven and YouTubeMix), else synthetic audio at the paper lengths.

Output: results/tables/rehearsal.{csv,md}, one row per run: parameters, status (ok, or the
phase that failed with a one-line reason), seconds per step here, peak RSS per phase
(`resource.getrusage` maxrss of the phase's process and its children), and the projected GPU
cost: the run's step budget (train.max_steps; the classifier: epochs x steps per epoch) times a
GPU seconds per step, whose source is named: measured by this rehearsal on CUDA; else the H100
figure of README.md for the SaShiMi SC09 training shape; else that figure scaled by this
machine's CPU time ratio (rough).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import multiprocessing
import os
import platform
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

from sashimi.errors import UserError
from sashimi.io import atomic_write

SAMPLE_RATE = 16000
SAMPLE_STEPS = 256  # recurrent sampling steps of an autoregressive run
DIFFUSION_STEPS = 2  # denoising steps of a diffusion run (fast sampler)
DIFFUSION_CLIPS = 2  # clips per diffusion sampling rehearsal (FID needs two)
EVAL_TOKENS = 64000  # NLL on about this many test samples (4 SC09 clips; 1 music chunk)
DEFAULT_MAX_TOKENS = 16000  # CPU training batch cap in samples per step: one SC09 clip
CLASSIFIER_TOKENS = 16000  # one classifier item: a 1 s clip
V01_TRAIN_CLIPS = 18620  # Speech Commands v0.01 digit train split (the classifier's epoch)
TABLE = Path("results/tables/rehearsal")
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

FIELDS = (
    "run", "kind", "model", "params", "status", "paper_batch", "rehearsed_batch", "length",
    "train_s_per_step", "train_s_per_step_paper_batch", "train_peak_rss_mb",
    "train_peak_rss_mb_paper_batch", "sample_shape", "sample_s_per_step", "sample_peak_rss_mb",
    "eval_peak_rss_mb", "eval", "budget_steps", "budget_source", "gpu_s_per_step", "gpu_source",
    "projected_gpu_hours", "wall_s",
)  # fmt: skip


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


# ============================================================================ table
def write_table(rows: list[dict], header: list[str], base: Path = TABLE) -> tuple[Path, Path]:
    """results/tables/rehearsal.csv (every field) and .md (the header lines, then a table)."""
    csv_path, md_path = base.with_suffix(".csv"), base.with_suffix(".md")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(csv_path, "w") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows({k: _cell(r.get(k)) for k in FIELDS} for r in rows)
    cols = [
        ("run", "run"), ("params", "params"), ("status", "status"),
        ("batch (paper/here) x length", None), ("train s/step here", "train_s_per_step"),
        ("train s/step, paper batch", "train_s_per_step_paper_batch"),
        ("train peak RSS MB (paper batch)", None), ("sampling", "sample_shape"),
        ("sample s/step", "sample_s_per_step"), ("sample peak RSS MB", "sample_peak_rss_mb"),
        ("eval peak RSS MB", "eval_peak_rss_mb"), ("budget steps", "budget_steps"),
        ("GPU s/step", "gpu_s_per_step"), ("GPU source", "gpu_source"),
        ("projected GPU h", "projected_gpu_hours"),
    ]  # fmt: skip
    lines = [*header, "", "| " + " | ".join(c for c, _ in cols) + " |",
             "|" + "---|" * len(cols)]  # fmt: skip
    for r in rows:
        cells = []
        for title, key in cols:
            if title.startswith("batch"):
                cells.append(
                    f"{r.get('paper_batch')}/{r.get('rehearsed_batch')} x {r.get('length')}"
                )
            elif title.startswith("train peak"):
                here, scaled = r.get("train_peak_rss_mb"), r.get("train_peak_rss_mb_paper_batch")
                cells.append(
                    _cell(here) + ("" if scaled in (None, here) else f" ({_cell(scaled)})")
                )
            else:
                cells.append(_cell(r.get(key)))
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    with atomic_write(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path, md_path


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


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


# ============================================================================ one phase, one process
def run_phase(phase: str, spec: dict, timeout_s: float) -> dict:
    """Run `phase` of spec["run"] in a fresh process; its result, or {"error": one line}."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(phase, spec, send))
    t0 = time.monotonic()
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout_s):
            proc.kill()
            proc.join()
            return {"error": f"{phase} timed out after {timeout_s:.0f} s"}
        try:
            out = recv.recv()
        except EOFError:
            proc.join()
            code = proc.exitcode
            why = "killed (out of memory?)" if code is not None and code < 0 else f"exit {code}"
            return {"error": f"{phase} process died: {why}"}
    except BaseException:  # interrupted: the child goes too
        proc.kill()
        proc.join()
        raise
    finally:
        recv.close()
    proc.join(30)
    out["phase_s"] = round(time.monotonic() - t0, 1)
    return out


def _child(phase: str, spec: dict, conn) -> None:
    os.environ["SASHIMI_TRACKING"] = "0"  # a rehearsal is not a run: nothing goes to MLflow
    os.environ["SASHIMI_PROGRESS"] = "0"
    if spec.get("memory_gb"):
        limit = int(spec["memory_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        import torch

        torch.set_num_threads(int(spec["threads"]))
        os.chdir(spec["workdir"])
        out = PHASES[phase](spec)
        out["peak_rss_mb"] = _peak_rss_mb()
        if torch.cuda.is_available() and spec["device"] == "cuda":
            out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    except BaseException as e:  # every failure becomes one line in the table
        out = {"error": f"{phase} failed: {type(e).__name__}: {_first_line(e)}"}
    conn.send(out)
    conn.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:200]


def _peak_rss_mb() -> float:
    """Peak resident set of this process and of its largest finished child (ru_maxrss, KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, kids) / 1024, 1)


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _load(spec: dict):
    """(params at paper scale, the run with the rehearsal's training overrides)."""
    from sashimi.config import load_params

    P = load_params(spec["params"], scale="paper")
    run = P.run(spec["run"])
    tc = dataclasses.replace(
        run.train, batch_size=spec["batch"], max_steps=spec["steps"], max_minutes=None,
        val_batches=1, log_every=1, ckpt_every=1, num_workers=0,
    )  # fmt: skip
    return P, dataclasses.replace(run, train=tc)


# ============================================================================ the phases
def _train(spec: dict) -> dict:
    """`sashimi train` for spec["steps"] steps in total (resuming from last.pt when asked)."""
    import torch

    from sashimi.distributed import init_distributed
    from sashimi.train import Trainer

    P, run = _load(spec)
    device = torch.device(spec["device"])
    if run.kind == "classifier":
        return _train_classifier(P, run, spec, device)

    class TimedTrainer(Trainer):
        """The trainer, timing each optimiser step and noting the RSS before the first."""

        times: list[float] = []
        first_step: int | None = None
        rss_before: float | None = None

        def _train_step(self, x, y):
            if self.first_step is None:
                self.first_step, self.rss_before = self.step, _current_rss_mb()
            t0 = time.perf_counter()
            out = super()._train_step(x, y)
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - t0)
            return out

    trainer = TimedTrainer(
        P, run, device=device, dist=init_distributed(device), resume=spec["resume"],
        root=Path.cwd(), progress=False,
    )  # fmt: skip
    summary = trainer.fit()
    if spec["resume"] and trainer.first_step != spec["steps"] - 1:
        raise UserError(f"resumed at step {trainer.first_step}, expected {spec['steps'] - 1}")
    return {
        "params": trainer.n_params,
        "step": summary["step"],
        "step_s": trainer.times,
        "rss_before_step_mb": trainer.rss_before,
    }


def _train_classifier(P, run, spec: dict, device) -> dict:
    """`sashimi train` of the classifier run; its trainer has no per-step hook, so the time per
    step is the whole fit (validation included) over the steps it ran: an upper bound."""
    from sashimi.classifier_train import train_classifier_run

    done = 0
    last = Path(run.run_dir) / "checkpoints" / "last.pt"
    if spec["resume"] and last.is_file():
        from sashimi.checkpoints import load_checkpoint

        done = int(load_checkpoint(last).get("step", 0))
    t0 = time.perf_counter()
    res = train_classifier_run(P, run, device=device, resume=spec["resume"])
    elapsed = time.perf_counter() - t0
    ran = max(1, res["step"] - done)
    return {
        "params": res["n_params"],
        "step": res["step"],
        "step_s": [elapsed / ran] * ran,
        "rss_before_step_mb": None,  # unknown: memory is not scaled to the paper batch
        "upper_bound": True,
    }


def _sample(spec: dict) -> dict:
    import torch

    from sashimi.sample import sample_run

    P, run = _load(spec)
    if run.kind == "classifier":
        return {"shape": "n/a"}
    device = torch.device(spec["device"])
    common = dict(checkpoint=None, out=None, device=device, progress=False, root=Path.cwd(),
                  temperature=run.sample.temperature, top_p=run.sample.top_p)  # fmt: skip
    if run.kind == "ar":
        b = run.sample.batch_size
        res = sample_run(P, run, n=b, seconds=SAMPLE_STEPS / SAMPLE_RATE, batch_size=b, **common)
        speed = _read_json(res["summary"])
        return {"shape": f"{b} x {SAMPLE_STEPS} steps", "s_per_step": speed["seconds_per_step"]}
    length = sequence_length(P, run)
    res = sample_run(P, run, n=DIFFUSION_CLIPS, seconds=length / SAMPLE_RATE,
                     batch_size=DIFFUSION_CLIPS, sampler="fast", fast_steps=DIFFUSION_STEPS,
                     **common)  # fmt: skip
    speed = _read_json(res["summary"])
    return {
        "shape": f"{DIFFUSION_CLIPS} x {length} x {DIFFUSION_STEPS} denoising steps",
        "s_per_step": speed["generation_seconds"] / DIFFUSION_STEPS,
    }


def _evaluate(spec: dict) -> dict:
    import torch

    from sashimi import evaluate

    P, run = _load(spec)
    device = torch.device(spec["device"])
    if run.kind == "classifier":
        from sashimi import classifier

        model = classifier.load_classifier(run.run_dir / "checkpoints", map_location=device)
        res = classifier.confusion_report(model, P.dataset_of(run.key).prepared_dir, run.run_dir)
        return {"eval": f"test accuracy {res['accuracy']:.3f} on {res['n']} clips"}
    parts = []
    if run.kind == "ar":
        parts.append(_nll(P, run, device))
    clf = evaluate.default_classifier_path(P)
    if run.dataset.startswith("sc09") and clf.is_file():
        res = evaluate.evaluate_sc09(P, run, classifier_path=clf, samples=None, device=device)
        parts.append(f"FID {res['fid']:.3g} on {res['n_scored']} of {res['n_generated']} clips")
    return {"eval": "; ".join(parts) or "nothing to evaluate"}


def _nll(P, run, device) -> str:
    import torch

    from sashimi.checkpoints import load_model
    from sashimi.data.datasets import AutoregressiveDataset, load_split
    from sashimi.evaluate import nll_bits

    model, _ = load_model(run.run_dir, map_location=device)
    ds = P.dataset_of(run.key)
    split = load_split(ds.prepared_dir, "test")
    data = AutoregressiveDataset(split, ds.quantization, ds.chunk_length,
                                 context=int(getattr(model, "context", 0)))  # fmt: skip
    n = max(1, min(len(data), EVAL_TOKENS // sequence_length(P, run)))
    with torch.inference_mode():
        bits, count = nll_bits(model, torch.utils.data.Subset(data, range(n)), n, device)
    return f"NLL {bits:.3f} bits on {n} test items"


def _read_json(path) -> dict:
    from sashimi.io import read_json

    return read_json(path)


PHASES = {"train": _train, "sample": _sample, "evaluate": _evaluate}


# ============================================================================ one run
def rehearse_run(P, key: str, base_spec: dict, max_tokens: int | None, timeout_s: float) -> dict:
    """Every phase of run `key`; a table row. Stops at the first failing phase."""
    run = P.run(key)
    paper_b = run.train.batch_size
    b = rehearsal_batch(paper_b, item_tokens(P, run), max_tokens)
    budget, budget_source = step_budget(P, run)
    row: dict[str, Any] = {
        "run": key, "kind": run.kind, "model": run.model_name, "paper_batch": paper_b,
        "rehearsed_batch": b, "length": sequence_length(P, run), "budget_steps": budget,
        "budget_source": budget_source,
    }  # fmt: skip
    spec = dict(base_spec, run=key, batch=b)
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


def passed_rows(path: Path) -> dict[str, dict]:
    """The rows of an earlier table whose run passed (--keep continues a rehearsal)."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = [{k: (None if v == "" else v) for k, v in r.items()} for r in csv.DictReader(f)]
    return {r["run"]: r for r in rows if r.get("status") == "ok"}


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
