"""`sashimi sample --run RUN`: generate clips from a trained run (resumable, seeded per batch).

    sashimi sample --run RUN [--checkpoint PATH] [--out DIR] [--prefix WAV]

How many clips, how long and how they are drawn is the run's `sample` block in params.yaml.
AR runs step the model's recurrent mode from token 128 (`sashimi.ar_sampling`) and decode with
the run's quantiser; diffusion runs use `sample.sampler`. Writes `<i:05d>.wav` (16 kHz, 16-bit)
and `loglik.csv`: each clip's log-likelihood under the model itself (temperature 1, no top-p,
prefix not scored), by which the SC09 protocol sorts clips; empty for diffusion runs.
Batch b draws from a generator seeded by (seed, b): a restarted job skips complete batches and
regenerates the others identically; `sample_config.json` refuses to resume with other settings
(a larger n aside). `summary.json` holds this job's speed.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sashimi import compiling
from sashimi.ar_sampling import (  # noqa: F401  (the sampling primitives are public here too)
    ZERO_TOKEN,
    GumbelNoise,
    generate_ar,
    initial_state,
    sample_token,
    setup_ar,
    top_p_filter,
)
from sashimi.errors import UserError
from sashimi.io import SAMPLE_RATE, atomic_write, read_json, write_json, write_wav

LN2 = math.log(2.0)
# loglik.csv; bits_per_sample = -loglik_nats / (generated samples * ln 2)
CSV_FIELDS = ("name", "loglik_nats", "bits_per_sample")


# ============================================================================ inputs
def batch_generator(seed: int, batch_index: int, device: torch.device) -> torch.Generator:
    """The generator of batch `batch_index`: a function of (seed, batch index) only."""
    s = int(
        np.random.SeedSequence([seed % 2**32, batch_index]).generate_state(1, dtype=np.uint64)[0]
    )
    g = torch.Generator(device=device)
    g.manual_seed(s % 2**63)
    return g


def load_prefix(path: str | os.PathLike, seconds: float, quantization: str) -> torch.Tensor:
    """The first `seconds` of a real clip at 16 kHz, quantised with the run's quantiser -> (P,)."""
    from sashimi.data.quantize import encode
    from sashimi.io import read_audio

    audio, sr = read_audio(path)
    x = torch.from_numpy(audio)  # (L,)
    if sr != SAMPLE_RATE:
        import torchaudio

        x = torchaudio.functional.resample(x, sr, SAMPLE_RATE)
    x = x[: max(1, round(seconds * SAMPLE_RATE))]  # (P,)
    if x.numel() < 2:
        raise UserError(f"{path}: prefix is shorter than 2 samples")
    return encode(x, quantization).long()  # (P,)


# ============================================================================ outputs
def read_loglik_csv(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not set(CSV_FIELDS) <= set(rows[0]):
        raise UserError(f"{path}: expected columns {', '.join(CSV_FIELDS)}")
    return {r["name"]: r for r in rows}


def write_loglik_csv(path: str | os.PathLike, rows: dict[str, dict[str, Any]]) -> None:
    with atomic_write(path, "w") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, lineterminator="\n")
        w.writeheader()
        for name in sorted(rows):
            w.writerow({k: rows[name].get(k, "") for k in CSV_FIELDS})


def clip_name(i: int) -> str:
    return f"{i:05d}.wav"


def _check_settings(out: Path, settings: dict) -> None:
    """Refuse to resume a samples folder made with other settings (n may grow)."""
    f = out / "sample_config.json"
    if f.is_file():
        old = read_json(f)
        for k, v in settings.items():
            if k != "n" and k in old and old[k] != v:
                raise UserError(
                    f"{f}: samples here were made with {k}={old[k]!r}, now {k}={v!r}; "
                    f"delete {out} or pass --out to sample elsewhere"
                )
    write_json(f, settings)


# ============================================================================ driver
@dataclass
class _Job:
    """What one `sample_run` call generates, resolved from its arguments and the run."""

    run: Any
    model: torch.nn.Module
    ckpt: dict
    kind: str  # "ar" or "diffusion"
    quantization: str
    device: torch.device
    out: Path
    n: int
    seconds: float
    batch_size: int
    seed: int
    length: int  # samples per clip, prefix included
    temperature: float
    top_p: float
    sampler: str
    fast_steps: int
    prefix_tokens: torch.Tensor | None = None  # (P,)

    @property
    def n_generated(self) -> int:
        """Samples per clip that are generated (and scored), not forced by the prefix."""
        return self.length - (0 if self.prefix_tokens is None else self.prefix_tokens.numel())

    def clips(self, b: int) -> range:
        """Clip indices of batch `b`."""
        return range(b * self.batch_size, min(self.n, (b + 1) * self.batch_size))

    def complete(self, b: int, rows: dict) -> bool:
        """Batch `b` is done: every wav is there and listed in loglik.csv."""
        return all(
            (self.out / clip_name(i)).is_file() and clip_name(i) in rows for i in self.clips(b)
        )


def sample_run(
    P,
    run,
    *,
    n: int | None = None,
    seconds: float | None = None,
    batch_size: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    checkpoint: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    prefix: str | os.PathLike | None = None,
    prefix_seconds: float | None = None,
    device: torch.device | None = None,
    seed: int | None = None,
    sampler: str | None = None,
    fast_steps: int | None = None,
    progress: bool | None = None,
    root: Path | None = None,
    compile: str | None = None,
) -> dict:
    """Generate `n` clips of `seconds` into `out`; skip complete batches already there.
    A value left None is the run's `sample.<name>` (seed: else `train.seed`).
    `compile` (default: the run's `compile`, auto | always | never): SaShiMi's compiled step."""
    from sashimi.checkpoints import load_model

    v = _values(run, n=n, seconds=seconds, batch_size=batch_size, temperature=temperature,
                top_p=top_p, prefix_seconds=prefix_seconds, seed=seed, sampler=sampler,
                fast_steps=fast_steps)  # fmt: skip
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = P.dataset_of(run.key)
    model, ckpt = load_model(checkpoint or run.run_dir, map_location=device)
    job = _Job(
        run=run, model=model, ckpt=ckpt, kind=ckpt.get("kind", run.kind),
        quantization=ds.quantization, device=device,
        out=Path(out or Path(run.run_dir) / "samples"), n=v["n"], seconds=v["seconds"],
        batch_size=v["batch_size"], seed=v["seed"], length=round(v["seconds"] * SAMPLE_RATE),
        temperature=v["temperature"], top_p=v["top_p"], sampler=v["sampler"],
        fast_steps=v["fast_steps"],
    )  # fmt: skip
    job.out.mkdir(parents=True, exist_ok=True)
    if prefix is not None:
        job.prefix_tokens = _job_prefix(job, prefix, v["prefix_seconds"])
    _check_settings(job.out, _settings(job, prefix, v["prefix_seconds"]))
    rows = read_loglik_csv(job.out / "loglik.csv")
    n_batches = math.ceil(job.n / job.batch_size)
    todo = [b for b in range(n_batches) if not job.complete(b, rows)]
    show = (
        progress
        if progress is not None
        else (sys.stderr.isatty() and os.environ.get("SASHIMI_PROGRESS", "1") != "0")
    )
    mode = run.compile if compile is None else compiling.check(compile, "sample_run: compile")
    stats, wall_s, tracker = _generate(job, todo, rows, show, root, mode)
    summary = _summary(job, rows, len(todo), n_batches)
    speed_file = job.out / "summary.json"
    if stats["clips"] or not speed_file.is_file():  # nothing new: keep the previous figures
        write_json(speed_file, _speed(job, stats, wall_s, summary))
    summary["summary"] = str(speed_file)
    summary["sample_realtime_factor"] = read_json(speed_file).get("sample_realtime_factor")
    _track(tracker, job.out, summary)
    return summary


def _values(run, **given) -> dict:
    """The job's sample settings: each given value, else the run's `sample` block; checked,
    naming the params key."""
    v = {k: getattr(run.sample, k) if x is None else x for k, x in given.items()}
    v["seed"] = int(run.train.seed if v["seed"] is None else v["seed"])
    where = f"runs.{run.key}.sample"
    for k in ("n", "batch_size", "fast_steps"):
        if v[k] < 1:
            raise UserError(f"{where}.{k}: {v[k]} must be >= 1")
    for k in ("seconds", "prefix_seconds"):
        if not v[k] > 0:
            raise UserError(f"{where}.{k}: {v[k]} must be > 0")
    if not 0 < v["top_p"] <= 1:
        raise UserError(f"{where}.top_p: {v['top_p']} must be in (0, 1]")
    if v["sampler"] not in ("ancestral", "fast"):
        raise UserError(f"{where}.sampler: {v['sampler']!r} is not one of ancestral, fast")
    return v


def _job_prefix(job: _Job, prefix: str | os.PathLike, prefix_seconds: float) -> torch.Tensor:
    """The prefix tokens (P,) an AR job continues; refused for diffusion or a too-long prefix."""
    if job.kind != "ar":
        raise UserError("--prefix: only autoregressive runs can continue a clip")
    tokens = load_prefix(prefix, prefix_seconds, job.quantization)
    if tokens.numel() >= job.length:
        where = f"runs.{job.run.key}.sample"
        raise UserError(
            f"{where}.prefix_seconds: {prefix_seconds}: the prefix must be shorter than "
            f"{where}.seconds {job.seconds}"
        )
    return tokens


def _settings(job: _Job, prefix, prefix_seconds: float) -> dict:
    """The settings a resumed job must share (`sample_config.json`)."""
    settings = {
        "n": job.n,
        "seconds": job.seconds,
        "batch_size": job.batch_size,
        "seed": job.seed,
        "kind": job.kind,
        "checkpoint": str(job.ckpt["path"]),
        "checkpoint_step": int(job.ckpt.get("step", 0)),
        "quantization": job.quantization,
    }
    if job.kind == "ar":
        settings.update(
            temperature=job.temperature,
            top_p=job.top_p,
            prefix=None if prefix is None else str(prefix),
            prefix_seconds=prefix_seconds,
        )
    else:
        fast_steps = job.fast_steps if job.sampler == "fast" else None
        settings.update(sampler=job.sampler, fast_steps=fast_steps)
    return settings


def _generate(job: _Job, todo: list[int], rows: dict, show: bool, root, compile: str):
    """Generate and write the batches `todo`, with a progress bar and the run's MLflow run
    started meanwhile. Returns (stats, wall seconds, tracker); the tracker is closed here
    unless every batch was written."""
    from tqdm import tqdm

    total = sum(len(job.clips(b)) for b in todo)
    bar = tqdm(
        total=total * job.length if job.kind == "ar" else len(todo),
        disable=not show,
        leave=False,
        unit="sample" if job.kind == "ar" else "batch",
        unit_scale=True,
        desc=f"sample {job.run.key}",
    )
    tracker = _open_tracker(job.run, root)  # MLflow starts in the background while we generate
    status = "FAILED"
    t_loop = time.perf_counter()
    if job.kind == "ar" and todo:
        setup_ar(job.model, compiling.compile_step(compile, job.device))
    try:
        stats = _generate_batches(job, todo, rows, bar, show)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        bar.close()
        if status != "FINISHED":
            tracker.close(status)
    return stats, time.perf_counter() - t_loop, tracker


def _generate_batches(job: _Job, todo: list[int], rows: dict, bar, show: bool) -> dict:
    """Generate each batch of `todo`, write its wavs, then list them in loglik.csv.
    Returns the generation wall time, batch steps and clips of this job."""
    from sashimi.data.quantize import decode

    gen_s, steps, clips = 0.0, 0, 0
    for b in todo:
        idx = job.clips(b)
        g = batch_generator(job.seed, b, job.device)
        t0 = time.perf_counter()
        drawn, ll = _draw_batch(job, len(idx), g, bar if show else None)
        gen_s += time.perf_counter() - t0
        if job.kind == "ar":
            steps += job.length
            audio = decode(drawn, job.quantization).numpy()  # (B, L) in [-1, 1]
        else:
            audio = drawn
            bar.update(1)
        clips += len(idx)
        for k, i in enumerate(idx):
            write_wav(job.out / clip_name(i), audio[k], sr=SAMPLE_RATE)
            bits = None if ll is None else -ll[k] / (job.n_generated * LN2)
            rows[clip_name(i)] = {
                "name": clip_name(i),
                "loglik_nats": "" if ll is None else f"{ll[k]:.6f}",
                "bits_per_sample": "" if ll is None else f"{bits:.6f}",
            }
        # after the wavs: a batch is complete once listed
        write_loglik_csv(job.out / "loglik.csv", rows)
    return {"generation_seconds": gen_s, "steps": steps, "clips": clips}


def _draw_batch(job: _Job, size: int, g: torch.Generator, progress):
    """One batch of `size` clips: AR tokens (B, L) on the CPU with their logliks (B,), or
    diffusion audio (B, L) as numpy with no loglik."""
    if job.kind == "ar":
        tokens, loglik = generate_ar(
            job.model,
            size,
            job.length,
            temperature=job.temperature,
            top_p=job.top_p,
            prefix=job.prefix_tokens,
            generator=g,
            device=job.device,
            progress=progress,
            setup=False,
        )
        return tokens.cpu(), loglik.cpu().numpy()
    from sashimi.models import diffwave

    with torch.no_grad():
        if job.sampler == "fast":
            wave = diffwave.sample_fast(job.model, size, job.length, job.fast_steps, generator=g)
        else:
            wave = diffwave.sample_ancestral(job.model, size, job.length, generator=g)
    return wave.float().cpu().numpy(), None  # (B, L)


def _summary(job: _Job, rows: dict, n_todo: int, n_batches: int) -> dict:
    """What `sashimi sample` prints: the batches done and, for AR, the mean bits per sample."""
    summary = {
        "run": job.run.key,
        "out": str(job.out),
        "n": job.n,
        "generated_batches": n_todo,
        "skipped_batches": n_batches - n_todo,
        "checkpoint": str(job.ckpt["path"]),
    }
    if job.kind == "ar":
        bits = [
            float(rows[clip_name(i)]["bits_per_sample"])
            for i in range(job.n)
            if rows.get(clip_name(i), {}).get("bits_per_sample")
        ]
        summary["mean_bits_per_sample"] = float(np.mean(bits)) if bits else None
    return summary


def _speed(job: _Job, stats: dict, wall_s: float, summary: dict) -> dict:
    """The speed record of this job (`summary.json`): `sample_realtime_factor` is seconds of
    audio generated (prefixes excluded) per wall second, all clips of the job together."""
    clips, gen_s, steps = stats["clips"], stats["generation_seconds"], stats["steps"]
    speed = {
        "run": job.run.key,
        "kind": job.kind,
        "n": job.n,
        "seconds": job.seconds,
        "batch_size": job.batch_size,
        "device": str(job.device),
        "threads": torch.get_num_threads(),
        "checkpoint": str(job.ckpt["path"]),
        "checkpoint_step": int(job.ckpt.get("step", 0)),
        "clips_generated": clips,
        "generated_seconds": clips * job.n_generated / SAMPLE_RATE,
        "wall_seconds": wall_s if clips else None,
        "generation_seconds": gen_s if clips else None,
        "sample_realtime_factor": (
            clips * job.n_generated / SAMPLE_RATE / wall_s if clips and wall_s > 0 else None
        ),
    }
    if job.kind == "ar":
        speed.update(
            temperature=job.temperature,
            top_p=job.top_p,
            seconds_per_step=gen_s / steps if steps else None,
            mean_bits_per_sample=summary["mean_bits_per_sample"],
        )
    else:
        sampler_steps = job.fast_steps if job.sampler == "fast" else int(getattr(job.model, "T", 0))
        speed.update(sampler=job.sampler, sampler_steps=sampler_steps)
    return speed


def _open_tracker(run, root: Path | None):
    """The run's MLflow run (the training one), started in the background (never fails)."""
    from sashimi.tracking import Tracker

    return Tracker(run.key, run_dir=run.run_dir, root=root).start()


def _track(tracker, out: Path, summary: dict, n_clips: int = 4) -> None:
    """Log the first few clips, loglik.csv and summary.json to the run's MLflow run and end it."""
    for i in range(n_clips):
        f = out / clip_name(i)
        if f.is_file():
            tracker.log_artifact(f, "samples")
    for name in ("loglik.csv", "summary.json"):
        if (out / name).is_file():
            tracker.log_artifact(out / name, "samples")
    m = {
        "samples/mean_bits_per_sample": summary.get("mean_bits_per_sample"),
        "samples/realtime_factor": summary.get("sample_realtime_factor"),
    }
    tracker.log_metrics({k: v for k, v in m.items() if v is not None}, step=0)
    tracker.close("FINISHED")


# ============================================================================ CLI
def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run key in params.yaml (settings: its `sample`)")
    p.add_argument(
        "--checkpoint", type=Path, help="checkpoint file (default: the run's best.pt, else last.pt)"
    )
    p.add_argument("--out", type=Path, help="output folder (default results/runs/RUN/samples)")
    p.add_argument(
        "--prefix", type=Path, help="continue this audio file (AR runs; sample.prefix_seconds)"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import json

    from sashimi.config import load_params
    from sashimi.distributed import pick_device

    P = load_params(args.params)
    run_cfg = P.run(args.run)
    if run_cfg.kind == "classifier":
        raise UserError(f"runs.{args.run}: a classifier run does not generate audio")
    summary = sample_run(
        P,
        run_cfg,
        checkpoint=args.checkpoint,
        out=args.out,
        prefix=args.prefix,
        device=pick_device(args.device),
        progress=False if args.no_progress else None,
        root=Path(args.params).resolve().parent,
    )
    print(json.dumps(summary))
    return 0
