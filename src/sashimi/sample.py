"""`sashimi sample --run RUN`: generate clips from a trained run (resumable, seeded per batch).

    sashimi sample --run sashimi-sc09 [--n N] [--seconds S] [--batch-size B] [--temperature T]
                   [--top-p P] [--prefix WAV --prefix-seconds s] [--checkpoint PATH] [--out DIR]

Autoregressive runs generate through the model's recurrent step mode (`setup_step`,
`default_state`, `step`), all clips of a batch at once, starting from token 128; the step
mode is unbounded, so clips may be longer than the training chunks. Tokens are decoded
with the run's own quantiser (`datasets.<ds>.quantization`: linear for Beethoven, mu-law
otherwise). Diffusion runs use `sample_ancestral` or `sample_fast` (`sample.sampler`).

Outputs (default `results/runs/RUN/samples/`): `<i:05d>.wav` (16 kHz, 16-bit) and
`loglik.csv` (name, loglik_nats, bits_per_sample). THE LOG-LIKELIHOOD is the model's own:
the sum over generated positions of log p_model(x_t | x_<t) at temperature 1 and without
top-p truncation, whatever temperature / top-p sampled the clip (at the protocol's T = 1,
top-p = 1 this is exactly the sampling distribution's likelihood). The SC09 protocol
sorts clips by it. Prefix tokens are conditioned on, not scored. `bits_per_sample` =
-loglik / (generated samples * ln 2). Diffusion runs leave both columns empty.

Resumable: clips are generated in batches of `--batch-size`; batch b draws from a generator
seeded by (seed, b), so a restarted job skips complete batches and regenerates the others
identically. The settings are stored in `samples/sample_config.json`; resuming with
different settings (other than a larger --n) is refused.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sashimi.errors import UserError
from sashimi.io import atomic_write, read_json, write_json, write_wav

SAMPLE_RATE = 16000
ZERO_TOKEN = 128
LN2 = math.log(2.0)
CSV_FIELDS = ("name", "loglik_nats", "bits_per_sample")


# ============================================================================ sampling
def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose mass reaches top_p
    (the most likely token always stays), renormalised. probs (B, K) -> (B, K)."""
    if top_p >= 1.0:
        return probs
    p_sorted, idx = probs.sort(dim=-1, descending=True)  # (B, K)
    keep = (p_sorted.cumsum(-1) - p_sorted) < top_p  # (B, K): mass before this token < top_p
    p_sorted = p_sorted * keep
    out = torch.zeros_like(probs).scatter_(-1, idx, p_sorted)  # (B, K)
    return out / out.sum(-1, keepdim=True)


def sample_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), nucleus-filtered. (B, K) -> (B,).

    Gumbel-max: argmax(z + G) with G = -log(-log U), U ~ U(0, 1), is an exact draw from
    softmax(z) (about 3x cheaper per step than softmax + multinomial on a CPU)."""
    if temperature <= 0:
        return logits.argmax(-1)
    z = logits.float() / temperature  # (B, K)
    if top_p < 1.0:
        keep = top_p_filter(torch.softmax(z, dim=-1), top_p) > 0  # (B, K)
        z = z.masked_fill(~keep, float("-inf"))
    u = torch.rand(z.shape, generator=generator, device=z.device).clamp_(min=1e-30)  # (B, K)
    return (z - torch.log(-torch.log(u))).argmax(-1)  # (B,)


@torch.no_grad()
def generate_ar(
    model: torch.nn.Module,
    n: int,
    length: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    prefix: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    progress=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched generation in step mode. Returns (tokens LongTensor[n, length], loglik float64 [n]).

    Step t consumes x[t] (x[0] = 128) and yields the logits for y[t]. Positions t < len(prefix)
    are forced to the prefix's tokens; the others are sampled. loglik sums log p_model(y[t])
    (temperature 1, no top-p) over the sampled positions only.
    """
    device = device or next(model.parameters()).device
    model.setup_step()
    state = model.default_state(n, device=device)
    token = torch.full((n,), ZERO_TOKEN, dtype=torch.long, device=device)  # (n,)
    out = torch.empty((n, length), dtype=torch.long, device=device)  # (n, L)
    loglik = torch.zeros(n, dtype=torch.float64, device=device)  # (n,)
    n_prefix = 0 if prefix is None else int(prefix.numel())
    if prefix is not None:
        prefix = prefix.to(device)
    for t in range(length):
        logits, state = model.step(token, state)  # (n, 256)
        logits = logits.float()
        if t < n_prefix:
            token = prefix[t].expand(n)
        else:
            token = sample_token(logits, temperature, top_p, generator)  # (n,)
            logp = torch.log_softmax(logits, dim=-1)  # (n, 256): the model's own distribution
            loglik += logp.gather(1, token[:, None])[:, 0].double()
        out[:, t] = token
        if progress is not None and (t + 1) % 250 == 0:
            progress.update(250)
    if progress is not None:
        progress.update(length % 250)
    return out, loglik


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
def sample_run(
    P,
    run,
    *,
    n: int,
    seconds: float,
    batch_size: int,
    temperature: float,
    top_p: float,
    checkpoint: str | os.PathLike | None,
    out: str | os.PathLike | None,
    prefix: str | os.PathLike | None = None,
    prefix_seconds: float = 1.0,
    device: torch.device | None = None,
    seed: int | None = None,
    sampler: str | None = None,
    fast_steps: int | None = None,
    progress: bool | None = None,
    root: Path | None = None,
) -> dict:
    """Generate `n` clips of `seconds` into `out`; skip complete batches already there."""
    from tqdm import tqdm

    from sashimi.data.quantize import decode
    from sashimi.train import load_model

    if n < 1 or batch_size < 1 or seconds <= 0:
        raise UserError(
            f"sample: need n >= 1, batch size >= 1, seconds > 0 (got {n}, {batch_size}, {seconds})"
        )
    if not 0 < top_p <= 1:
        raise UserError(f"sample: --top-p {top_p} must be in (0, 1]")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = P.dataset_of(run.key)
    model, ckpt = load_model(checkpoint or run.run_dir, map_location=device)
    kind = ckpt.get("kind", run.kind)
    seed = int(run.train.seed if seed is None else seed)
    out = Path(out or Path(run.run_dir) / "samples")
    out.mkdir(parents=True, exist_ok=True)
    length = round(seconds * SAMPLE_RATE)
    sampler = sampler or run.sample.sampler
    fast_steps = fast_steps or run.sample.fast_steps

    prefix_tokens = None
    if prefix is not None:
        if kind != "ar":
            raise UserError("--prefix: only autoregressive runs can continue a clip")
        prefix_tokens = load_prefix(prefix, prefix_seconds, ds.quantization)
        if prefix_tokens.numel() >= length:
            raise UserError(
                f"--prefix-seconds {prefix_seconds}: the prefix must be shorter than --seconds {seconds}"
            )

    settings = {
        "n": n,
        "seconds": seconds,
        "batch_size": batch_size,
        "seed": seed,
        "kind": kind,
        "checkpoint": str(ckpt["path"]),
        "checkpoint_step": int(ckpt.get("step", 0)),
        "quantization": ds.quantization,
    }
    if kind == "ar":
        settings.update(
            temperature=temperature,
            top_p=top_p,
            prefix=None if prefix is None else str(prefix),
            prefix_seconds=prefix_seconds,
        )
    else:
        settings.update(sampler=sampler, fast_steps=fast_steps if sampler == "fast" else None)
    _check_settings(out, settings)

    rows = read_loglik_csv(out / "loglik.csv")
    n_batches = math.ceil(n / batch_size)
    todo = []
    for b in range(n_batches):
        names = [clip_name(i) for i in range(b * batch_size, min(n, (b + 1) * batch_size))]
        if not all((out / nm).is_file() and nm in rows for nm in names):
            todo.append(b)
    show = (
        progress
        if progress is not None
        else (sys.stderr.isatty() and os.environ.get("SASHIMI_PROGRESS", "1") != "0")
    )
    total = sum(min(n, (b + 1) * batch_size) - b * batch_size for b in todo)
    bar = tqdm(
        total=total * length if kind == "ar" else len(todo),
        disable=not show,
        leave=False,
        unit="sample" if kind == "ar" else "batch",
        unit_scale=True,
        desc=f"sample {run.key}",
    )
    n_generated = length - (0 if prefix_tokens is None else prefix_tokens.numel())
    try:
        for b in todo:
            lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
            g = batch_generator(seed, b, device)
            if kind == "ar":
                tokens, loglik = generate_ar(
                    model,
                    hi - lo,
                    length,
                    temperature=temperature,
                    top_p=top_p,
                    prefix=prefix_tokens,
                    generator=g,
                    device=device,
                    progress=bar if show else None,
                )
                audio = decode(tokens.cpu(), ds.quantization).numpy()  # (B, L) in [-1, 1]
                ll = loglik.cpu().numpy()
            else:
                from sashimi.models import diffwave

                with torch.no_grad():
                    if sampler == "fast":
                        wave = diffwave.sample_fast(model, hi - lo, length, fast_steps, generator=g)
                    else:
                        wave = diffwave.sample_ancestral(model, hi - lo, length, generator=g)
                audio = wave.float().cpu().numpy()  # (B, L)
                ll = None
                bar.update(1)
            for k, i in enumerate(range(lo, hi)):
                write_wav(out / clip_name(i), audio[k], sr=SAMPLE_RATE)
                rows[clip_name(i)] = {
                    "name": clip_name(i),
                    "loglik_nats": "" if ll is None else f"{ll[k]:.6f}",
                    "bits_per_sample": "" if ll is None else f"{-ll[k] / (n_generated * LN2):.6f}",
                }
            write_loglik_csv(
                out / "loglik.csv", rows
            )  # after the wavs: a batch is complete once listed
    finally:
        bar.close()
    summary = {
        "run": run.key,
        "out": str(out),
        "n": n,
        "generated_batches": len(todo),
        "skipped_batches": n_batches - len(todo),
        "checkpoint": str(ckpt["path"]),
    }
    if kind == "ar":
        bits = [
            float(rows[clip_name(i)]["bits_per_sample"])
            for i in range(n)
            if rows.get(clip_name(i), {}).get("bits_per_sample")
        ]
        summary["mean_bits_per_sample"] = float(np.mean(bits)) if bits else None
    _track(run, out, summary, root)
    return summary


def _track(run, out: Path, summary: dict, root: Path | None, n_clips: int = 4) -> None:
    """Log the first few clips and loglik.csv to the run's MLflow run (never fails)."""
    from sashimi.tracking import Tracker, tracking_enabled

    if not tracking_enabled():
        return
    with Tracker(run.key, run_dir=run.run_dir, root=root) as tr:
        for i in range(n_clips):
            f = out / clip_name(i)
            if f.is_file():
                tr.log_artifact(f, "samples")
        if (out / "loglik.csv").is_file():
            tr.log_artifact(out / "loglik.csv", "samples")
        if summary.get("mean_bits_per_sample") is not None:
            tr.log_metrics(
                {"samples/mean_bits_per_sample": summary["mean_bits_per_sample"]}, step=0
            )


# ============================================================================ CLI
def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run key in params.yaml")
    p.add_argument("--n", type=int, help="number of clips (default sample.n)")
    p.add_argument(
        "--seconds",
        type=float,
        help="clip length in seconds, prefix included (default sample.seconds)",
    )
    p.add_argument(
        "--batch-size", type=int, help="clips generated at once (default sample.batch_size)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        help="softmax temperature (default sample.temperature; 0 = greedy)",
    )
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default sample.top_p)")
    p.add_argument("--prefix", type=Path, help="continue this audio file (AR runs)")
    p.add_argument(
        "--prefix-seconds", type=float, default=1.0, help="how much of --prefix to condition on"
    )
    p.add_argument(
        "--checkpoint", type=Path, help="checkpoint file (default: the run's best.pt, else last.pt)"
    )
    p.add_argument("--out", type=Path, help="output folder (default results/runs/RUN/samples)")
    p.add_argument("--seed", type=int, help="sampling seed (default train.seed)")
    p.add_argument(
        "--sampler",
        choices=["ancestral", "fast"],
        help="diffusion sampler (default sample.sampler)",
    )
    p.add_argument(
        "--fast-steps", type=int, help="steps of the fast sampler (default sample.fast_steps)"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import json

    from sashimi.config import load_params
    from sashimi.train import pick_device

    P = load_params(args.params)
    run_cfg = P.run(args.run)
    if run_cfg.kind == "classifier":
        raise UserError(f"runs.{args.run}: a classifier run does not generate audio")
    sc = run_cfg.sample
    summary = sample_run(
        P,
        run_cfg,
        n=args.n if args.n is not None else sc.n,
        seconds=args.seconds if args.seconds is not None else sc.seconds,
        batch_size=args.batch_size if args.batch_size is not None else sc.batch_size,
        temperature=args.temperature if args.temperature is not None else sc.temperature,
        top_p=args.top_p if args.top_p is not None else sc.top_p,
        checkpoint=args.checkpoint,
        out=args.out,
        prefix=args.prefix,
        prefix_seconds=args.prefix_seconds,
        device=pick_device(args.device),
        seed=args.seed,
        sampler=args.sampler,
        fast_steps=args.fast_steps,
        progress=False if args.no_progress else None,
        root=Path(args.params).resolve().parent,
    )
    print(json.dumps(summary))
    return 0
