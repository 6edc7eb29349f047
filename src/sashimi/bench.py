"""`sashimi bench {train,generate,sample,cauchy}`: speed benchmarks that print ONE JSON line.

Models are built at the paper's sizes (SaShiMi: the SC09 model with GLU; WaveNet, SampleRNN,
DiffWave: the paper's), with random weights and synthetic tokens. `--naive` also times the
slow reference in the same process (training: the official materialised Cauchy kernel;
generation: the official-style dense S4 step, or the forward recomputed over the prefix or
WaveNet's receptive field) and reports `naive_seconds_per_step` and `speedup`.

Output keys: seconds_per_step, peak_rss_mb, params, device, model, batch, length | steps,
threads, load_average (1-minute, before and after). Generation is timed in 8 chunks
(seconds_per_step: the median chunk's; seconds_per_step_mean: all) and adds realtime_factor,
seconds of 16 kHz audio per wall-clock second, all clips together; training adds tokens_per_s
and, on CUDA, peak_gpu_mb. `benchmark_kernel` and `benchmark_step` time one S4 kernel / step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sashimi import compiling
from sashimi.errors import UserError
from sashimi.io import SAMPLE_RATE

# Paper-size constructor kwargs per registered model (None: the class defaults are the paper's).
PAPER_KWARGS: dict[str, dict] = {
    "sashimi": dict(d_model=64, n_layers=8, pool=[4, 4], expand=2, ff=2, glu=True),
    "wavenet": dict(
        layers=10,
        blocks=4,
        residual_channels=64,
        dilation_channels=64,
        skip_channels=1024,
        end_channels=512,
    ),  # fmt: skip
    "samplernn": dict(frame_sizes=[8, 2, 2], n_rnn=1, d_hidden=1024, d_model=256),
    "diffwave": dict(backbone="wavenet"),
}


# ---------------------------------------------------------------------------- helpers


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], n: int, warmup: int, device: torch.device) -> list[float]:
    """Wall-clock seconds of each of `n` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _build(name: str, kwargs_json: str | None, device: torch.device, **extra) -> torch.nn.Module:
    from sashimi.models import MODELS, build_model

    if name not in MODELS:
        raise UserError(f"bench: unknown model {name!r} (known: {', '.join(MODELS)})")
    kwargs = dict(PAPER_KWARGS.get(name, {}))
    if kwargs_json:
        try:
            over = json.loads(kwargs_json)
        except json.JSONDecodeError as e:
            raise UserError(f"bench: --model-kwargs is not valid JSON ({e.msg})") from None
        if not isinstance(over, dict):
            raise UserError("bench: --model-kwargs must be a JSON object")
        kwargs.update(over)
    kwargs.update(extra)
    torch.manual_seed(0)
    return build_model(name, **kwargs).to(device)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _device(arg: str) -> torch.device:
    if arg == "cuda" and not torch.cuda.is_available():
        raise UserError("bench: --device cuda but CUDA is not available")
    return torch.device(arg)


def _autocast(args, device: torch.device):
    if args.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _emit(result: dict, out: str | None) -> None:
    line = json.dumps(result, sort_keys=False)
    print(line, flush=True)
    if out:
        from sashimi.io import write_json

        write_json(out, result)


def _common(args, device: torch.device, model_name: str) -> dict:
    return {
        "model": model_name,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }


# ---------------------------------------------------------------------------- train


def _train_step_fn(model, args, device) -> Callable[[], float]:
    context = int(getattr(model, "context", 0))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, context + args.length), generator=g).to(
        device
    )  # (B, ctx + L)
    y = torch.randint(0, 256, (args.batch, args.length), generator=g).to(device)  # (B, L)
    from sashimi.config import TrainConfig
    from sashimi.optim import build_optimizer

    opt = build_optimizer(model, TrainConfig())  # what `sashimi train` uses: AdamW, fused
    model.train()
    fwd = torch.compile(model) if compiling.compile_whole(model, args.compile) else model

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with _autocast(args, device):
            logits = fwd(x)  # (B, L, 256)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        opt.step()
        return loss.item()

    return step


def bench_train(args) -> dict:
    if args.naive and args.model != "sashimi":
        raise UserError(
            f"bench train --naive: no naive reference for {args.model!r} (only sashimi)"
        )
    device = _device(args.device)
    model = _build(args.model, args.model_kwargs, device)
    compiling.apply_to_model(model, args.compile)  # as the trainer does with the run's setting
    res = _common(args, device, args.model)
    res.update(batch=args.batch, length=args.length, params=_n_params(model))
    res["compile"] = args.compile
    res["compiled_whole"] = compiling.compile_whole(model, args.compile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = _time(_train_step_fn(model, args, device), args.steps, args.warmup, device)
    res.update(seconds_per_step=statistics.median(times), seconds_all=[round(t, 4) for t in times],
               peak_rss_mb=round(peak_rss_mb(), 1))  # fmt: skip
    res["tokens_per_s"] = round(args.batch * args.length / res["seconds_per_step"], 1)
    if device.type == "cuda":
        res["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if args.naive:
        naive = _build(args.model, args.model_kwargs, device, backend="naive")
        naive.load_state_dict(model.state_dict())
        compiling.apply_to_model(naive, args.compile)
        del model
        ntimes = _time(_train_step_fn(naive, args, device), args.naive_steps, 0, device)
        res.update(naive_seconds_per_step=statistics.median(ntimes), naive_seconds_all=[round(t, 3) for t in ntimes],
                   naive_peak_rss_mb=round(peak_rss_mb(), 1))  # fmt: skip
        res["speedup"] = round(res["naive_seconds_per_step"] / res["seconds_per_step"], 2)
    return res


# ---------------------------------------------------------------------------- generate


def _generate_loop(
    step: Callable, state, batch: int, n: int, device
) -> tuple[Callable[[], None], list]:
    """A closure running n autoregressive steps (sampling included) from the carried state,
    sampling as `sashimi sample` does (Gumbel-max with noise drawn in blocks)."""
    from sashimi.sample import GumbelNoise, sample_token

    noise = GumbelNoise((batch, 256), torch.Generator(device=device).manual_seed(0), device)
    box = [torch.full((batch,), 128, dtype=torch.long, device=device), state]

    def run() -> None:
        tok, st = box
        for _ in range(n):
            logits, st = step(tok, st)
            tok = sample_token(logits, gumbel=noise.next())  # (B,)
        box[0], box[1] = tok, st

    return run, box


def _prefix_step(model) -> tuple[Callable, Callable]:
    """Naive AR step for a model with no state: recompute forward over the whole prefix."""
    context = int(getattr(model, "context", 0))

    def default_state(batch: int, device=None):
        return torch.full((batch, context), 128, dtype=torch.long, device=device)

    @torch.no_grad()
    def step(token, tokens):
        tokens = torch.cat([tokens, token[:, None]], 1)  # (B, ctx + t + 1)
        return model(tokens)[:, -1], tokens

    return default_state, step


def bench_generate(args) -> dict:
    device = _device(args.device)
    model = _build(args.model, args.model_kwargs, device).eval()
    res = _common(args, device, args.model)
    res.update(batch=args.batch, steps=args.steps, params=_n_params(model))

    compile_ = compiling.compile_step(args.compile, device) and args.model == "sashimi"
    if args.model == "sashimi":
        graphs = args.cuda_graph and device.type == "cuda"
        model.setup_step(compile=compile_, cuda_graph=graphs)
        res["cuda_graph"] = graphs
    else:
        model.setup_step()
    res["compile"], res["compiled"] = args.compile, bool(compile_)
    # warm-up: enough steps to run every pooled stage at least twice (compiles them)
    warm = args.warmup if args.warmup is not None else (64 if compile_ else 16)
    t0 = time.perf_counter()
    with torch.no_grad():
        run, _ = _generate_loop(
            model.step, model.default_state(args.batch, device=device), args.batch, warm, device
        )
        run()
        _sync(device)
    res["warmup_seconds"] = round(time.perf_counter() - t0, 2)
    # timed in 8 chunks: the median chunk is robust to a burst of load from other processes
    n_chunks = min(8, args.steps)
    chunk = args.steps // n_chunks
    run, _ = _generate_loop(
        model.step, model.default_state(args.batch, device=device), args.batch, chunk, device
    )
    with torch.no_grad():
        times = _time(run, n_chunks, 0, device)
    per_step = statistics.median(times) / chunk
    res.update(
        seconds_per_step=per_step,
        seconds_per_step_mean=sum(times) / (chunk * n_chunks),
        peak_rss_mb=round(peak_rss_mb(), 1),
        realtime_factor=round(args.batch / SAMPLE_RATE / per_step, 4),
    )

    if args.naive:
        nsteps = args.naive_steps or args.steps
        if args.model == "sashimi" and _has_dense_step(model):
            res["naive"] = "official-style eager step, S4 dense state"
            model.setup_step(compile=False, s4_mode="dense", cuda_graph=False)
            default_state, step = model.default_state, model.step
        elif args.model == "wavenet":
            res["naive"] = "recompute the causal conv over the receptive field"
            default_state, step = model.default_state_naive, model.step_naive
        elif args.model == "sashimi":
            res["naive"] = "recompute the conv forward over the whole prefix"
            default_state, step = _prefix_step(model)
        else:
            raise UserError(f"bench generate --naive: no naive reference for {args.model!r}")
        run, _ = _generate_loop(
            step, default_state(args.batch, device=device), args.batch, nsteps, device
        )
        with torch.no_grad():
            (nelapsed,) = _time(run, 1, 0, device)
        res.update(naive_steps=nsteps, naive_seconds_per_step=nelapsed / nsteps,
                   speedup=round(nelapsed / nsteps / res["seconds_per_step"], 2))  # fmt: skip
    return res


def _has_dense_step(model) -> bool:
    import inspect

    return "s4_mode" in inspect.signature(model.setup_step).parameters


# ---------------------------------------------------------------------------- sample (diffusion)


def bench_sample(args) -> dict:
    if args.model != "diffwave":
        raise UserError(f"bench sample: --model must be 'diffwave' (got {args.model!r})")
    from sashimi.models.diffwave import sample_ancestral, sample_fast

    device = _device(args.device)
    model = _build(args.model, args.model_kwargs, device, backbone=args.backbone).eval()
    res = _common(args, device, f"diffwave-{args.backbone}")
    res.update(
        batch=args.batch, length=args.length, params=_n_params(model), fast_steps=args.fast_steps
    )
    T = int(model.T)
    g = torch.Generator(device=device)
    with torch.no_grad(), _autocast(args, device):  # warm-up call (kernel set-up, allocator)
        model(
            torch.zeros(args.batch, args.length, device=device),
            torch.zeros(args.batch, dtype=torch.long, device=device),
        )

    def timed(fn) -> float:
        with _autocast(args, device):
            (t,) = _time(fn, 1, 0, device)
        return t

    t_fast = timed(
        lambda: sample_fast(
            model, args.batch, args.length, args.fast_steps, generator=g.manual_seed(0)
        )
    )
    per_call = t_fast / args.fast_steps
    if args.ancestral_estimate:
        t_anc = per_call * T  # the sampler's own arithmetic is negligible next to a network call
        res["ancestral_method"] = f"estimated: {T} x the fast sampler's seconds per network call"
    else:
        t_anc = timed(
            lambda: sample_ancestral(model, args.batch, args.length, generator=g.manual_seed(0))
        )
        res["ancestral_method"] = "measured"
    res.update(
        seconds_per_clip_ancestral=t_anc / args.batch,
        seconds_per_clip_fast=t_fast / args.batch,
        seconds_per_network_call=per_call,
        ancestral_steps=T,
        speedup=round(t_anc / t_fast, 2),
        realtime_factor_fast=round(args.batch * args.length / SAMPLE_RATE / t_fast, 4),
        realtime_factor_ancestral=round(args.batch * args.length / SAMPLE_RATE / t_anc, 4),
        peak_rss_mb=round(peak_rss_mb(), 1),
    )
    res["seconds_per_step"] = per_call
    return res


# ---------------------------------------------------------------------------- S4 micro-benchmarks


class _PeakRSS:
    """Peak resident memory above the level at entry, sampled from /proc/self/statm in a thread."""

    def __init__(self, interval: float = 1e-3):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(self.interval)

    def __enter__(self) -> _PeakRSS:
        self.base = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self.base)


def benchmark_kernel(
    H: int = 64,
    L: int = 16000,
    backend: str = "auto",
    N: int = 64,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    repeats: int = 3,
    compile: str = "auto",
) -> dict:
    """Time one S4 kernel computation (forward, and forward+backward) and its peak extra memory.

    Builds a fresh n_ssm=1 kernel with H channels and state size N, converts C to C~ at length L
    (not timed), warms up once (this includes torch.compile for the fused backend), then reports
    the median over ``repeats`` runs. Memory is the peak above the level before the measured
    run: CUDA allocator peak on GPUs, sampled process RSS on CPU (so approximate there).
    """
    from sashimi.ssm.kernels import compile_enabled, resolve_backend
    from sashimi.ssm.s4 import S4Kernel

    device = torch.device(device)
    kernel = S4Kernel(H, N=N, backend=backend).to(device=device, dtype=dtype)
    kernel.compile_mode = compile
    with torch.no_grad():
        kernel(L)  # C -> C~ at length L
    weight = torch.randn(1, H, L, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def fwd() -> None:
        with torch.no_grad():
            kernel(L)
        sync()

    def fwd_bwd() -> None:
        kernel.zero_grad(set_to_none=True)
        (kernel(L) * weight).sum().backward()
        sync()

    def measure(fn: Callable[[], None]) -> tuple[float, float]:
        fn()  # warm-up (and compilation)
        times, peak = [], 0
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
                peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
            else:
                with _PeakRSS() as mem:
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                peak = max(peak, mem.peak)
        return sorted(times)[len(times) // 2], peak / 2**20

    fwd_s, fwd_mb = measure(fwd)
    fwd_bwd_s, fwd_bwd_mb = measure(fwd_bwd)
    fused = resolve_backend(backend) == "torch" and compile_enabled(
        compile, H * (L // 2 + 1) * (N // 2), device
    )
    return {
        "H": H,
        "L": L,
        "N": N,
        "backend": resolve_backend(backend)
        + ("-compiled" if fused else ("" if backend == "naive" else "-eager")),
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "forward_s": fwd_s,
        "forward_backward_s": fwd_bwd_s,
        "forward_peak_mb": fwd_mb,
        "forward_backward_peak_mb": fwd_bwd_mb,
    }


def benchmark_step(
    H: int = 64,
    batch: int = 1,
    steps: int = 2000,
    mode: str = "auto",
    compiled: bool = False,
    glu: bool = False,
) -> dict:
    """Seconds per recurrent step of one S4Block (eval, inference mode); optionally torch.compile'd."""
    from sashimi.ssm.s4 import S4Block

    blk = S4Block(H, glu=glu).eval()
    blk.setup_step(mode)
    step = torch.compile(blk.step, fullgraph=True) if compiled else blk.step
    state, u = blk.default_state(batch), torch.randn(batch, H)
    with torch.inference_mode():
        for _ in range(max(10, steps // 20)):  # warm-up (and compilation)
            y, state = step(u, state)
        t0 = time.perf_counter()
        for _ in range(steps):
            y, state = step(u, state)
        seconds = (time.perf_counter() - t0) / steps
    return {"H": H, "batch": batch, "mode": blk._step_mode, "compiled": compiled, "step_s": seconds}


# ---------------------------------------------------------------------------- CLI


def configure_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="WHAT", required=True)

    def common(q: argparse.ArgumentParser, model_default: str) -> None:
        q.add_argument("--model", default=model_default, help="registered model name")
        q.add_argument(
            "--model-kwargs", help="JSON object overriding the paper-size constructor kwargs"
        )
        q.add_argument("--batch", type=int, default=1)
        q.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        q.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
        q.add_argument(
            "--threads", type=int, help="torch.set_num_threads (default: torch's choice)"
        )
        q.add_argument("--out", help="also write the JSON to this file")

    t = sub.add_parser("train", help="seconds per AdamW training step on synthetic tokens")
    common(t, "sashimi")
    t.add_argument("--length", type=int, default=16000)
    t.add_argument("--steps", type=int, default=3, help="timed steps")
    t.add_argument("--warmup", type=int, default=1)
    t.add_argument("--naive", "--compare-naive", dest="naive", action="store_true",
                   help="also time the naive S4 kernel backend")  # fmt: skip
    t.add_argument("--naive-steps", type=int, default=1)
    t.add_argument("--compile", choices=compiling.MODES, default="always",
                   help="as a run's `compile` (default always: the S4 layers' compiled paths, "
                   "whose compile time the warm-up step absorbs)")  # fmt: skip

    g = sub.add_parser("generate", help="seconds per autoregressive step (sampling included)")
    common(g, "sashimi")
    g.add_argument("--steps", type=int, default=1000, help="timed steps")
    g.add_argument("--warmup", type=int, help="untimed steps first (default 64 compiled, 16 eager)")
    g.add_argument("--compile", choices=compiling.MODES, default="always",
                   help="as a run's `compile` (default always: SaShiMi's compiled step)")  # fmt: skip
    g.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="SaShiMi on CUDA: launch every kernel instead of replaying CUDA graphs")  # fmt: skip
    g.add_argument("--naive", "--compare-naive", dest="naive", action="store_true",
                   help="also time the naive step")  # fmt: skip
    g.add_argument(
        "--naive-steps", type=int, help="steps for the naive reference (default --steps)"
    )

    k = sub.add_parser("cauchy", help="seconds per S4 kernel: pure torch vs pykeops (keops extra)")
    k.add_argument("--channels", type=int, default=64, help="H")
    k.add_argument("--length", type=int, default=16000, help="L")
    k.add_argument("--state", type=int, default=64, help="N")
    k.add_argument("--repeats", type=int, default=3)
    k.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    k.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    k.add_argument("--out", help="also write the JSON to this file")

    s = sub.add_parser("sample", help="seconds per clip: full ancestral vs fast diffusion sampler")
    common(s, "diffwave")
    s.add_argument("--backbone", default="wavenet", choices=["wavenet", "sashimi"])
    s.add_argument("--length", type=int, default=SAMPLE_RATE)
    s.add_argument("--fast-steps", type=int, default=50)
    s.add_argument("--ancestral-estimate", action="store_true",
                   help="estimate the full sampler from the fast one's seconds per network call")  # fmt: skip


def bench_cauchy(args) -> dict:
    """The S4 kernel per Cauchy backend, pure torch beside pykeops (sashimi.ssm.keops)."""
    from sashimi.bench_cauchy import bench_backends

    return bench_backends(args.channels, args.length, args.state, args.repeats, args.device)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    fn = {"train": bench_train, "generate": bench_generate, "sample": bench_sample,
          "cauchy": bench_cauchy}[args.bench]  # fmt: skip
    load_before = os.getloadavg()[0]
    result = fn(args)
    # 1-minute load average of the machine before / after: timings on a loaded machine are noisy
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    _emit(result, args.out)
    return 0
