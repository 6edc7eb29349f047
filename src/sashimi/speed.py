"""`sashimi speed --kind KIND`: the speed table's measurements for one model kind.

The model is built with random weights at the sizes of the run `speed.runs.KIND` in
params.yaml and timed on the machine the DAG runs on through `sashimi bench`, each beside the
naive or official-style reference that the bench offers, in the same process:

    sashimi    train: our S4 kernel vs the naive (official, materialised) Cauchy kernel
               generate: our modal step vs the official-style dense step
    wavenet    train; generate: activation-queue step vs recomputing the causal conv
    samplernn  train; generate (no reference)
    diffwave   train (timed here: the run's loss, AdamW); sample: fast vs ancestral sampler

Output: results/bench/KIND.json. `write_speed_table(results_dir)` puts every such file and
the paper's efficiency statements (only those in reference/paper_results.yaml; the others
say "not confirmed") into results/tables/speed.{md,csv,tex} and results/figures/speed_bench.png."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from sashimi import compiling
from sashimi.errors import UserError
from sashimi.io import SAMPLE_RATE

KINDS = ("sashimi", "wavenet", "samplernn", "diffwave")
LABELS = {"sashimi": "SaShiMi", "wavenet": "WaveNet", "samplernn": "SampleRNN",
          "diffwave": "DiffWave"}  # fmt: skip
NOT_CONFIRMED = "not confirmed"


def _bench(*argv: object) -> dict:
    """One `sashimi bench ...` measurement, in this process (its JSON result as a dict)."""
    from sashimi import bench

    parser = argparse.ArgumentParser(prog="sashimi bench")
    bench.configure_parser(parser)
    args = parser.parse_args([str(a) for a in argv])
    fn = {"train": bench.bench_train, "generate": bench.bench_generate,
          "sample": bench.bench_sample}[args.bench]  # fmt: skip
    return fn(args)


def _diffusion_train(run, batch: int, length: int, steps: int, device: torch.device) -> dict:
    """Seconds per training step of a diffusion run: its loss, backward and optimiser step."""
    from sashimi.models import build_model
    from sashimi.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model(run.model_name, **run.model).to(device).train()
    compiling.apply_to_model(model, run.compile)  # as the trainer: the run's compile setting
    whole = compiling.compile_whole(model, run.compile)
    loss_fn = torch.compile(model.training_loss) if whole else model.training_loss
    opt = build_optimizer(model, run.train)
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(batch, length, generator=g, device=device) * 2 - 1  # (B, L) audio in [-1, 1]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(x0, generator=g).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    n = sum(p.numel() for p in model.parameters())
    return {"batch": batch, "length": length, "params": n, "seconds_per_step": sec,
            "tokens_per_s": round(batch * length / sec, 1), "device": str(device),
            "compile": run.compile}  # fmt: skip


def measure(P, kind: str, device: torch.device) -> dict:
    """Training and generation speed of model kind `kind` (see the module docstring)."""
    spec = P.raw.get("speed") or {}
    if kind not in KINDS:
        raise UserError(f"sashimi speed --kind: {kind!r} is not one of {', '.join(KINDS)}")
    runs = spec.get("runs") or {}
    if kind not in runs:
        raise UserError(f"{P.path}: speed.runs.{kind}: missing (the run whose sizes to time)")
    run = P.run(runs[kind])
    tr, ge, sa = spec.get("train") or {}, spec.get("generate") or {}, spec.get("sample") or {}
    dev = device.type
    kw = json.dumps(run.model)
    res = {
        "kind": kind,
        "run": run.key,
        "label": run.label or LABELS[kind],
        "scale": P.scale,
        "load_average_before": round(os.getloadavg()[0], 2),
    }  # timings on a loaded machine are noisy
    if kind == "diffwave":
        res["train"] = _diffusion_train(run, int(tr.get("batch", 1)), int(tr.get("length", 16000)),
                                        int(tr.get("steps", 3)), device)  # fmt: skip
        sample = ["sample", "--model", "diffwave", "--model-kwargs", kw, "--device", dev,
                  "--backbone", run.model.get("backbone", "wavenet"),
                  "--batch", sa.get("batch", 1), "--length", sa.get("length", 16000),
                  "--fast-steps", sa.get("fast_steps", 50)]  # fmt: skip
        if sa.get("ancestral_estimate", True):
            sample.append("--ancestral-estimate")
        res["sample"] = _bench(*sample)
        res["load_average_after"] = round(os.getloadavg()[0], 2)
        return res
    common = ["--model", run.model_name, "--model-kwargs", kw, "--device", dev]
    train = ["train", *common, "--batch", tr.get("batch", 1), "--length", tr.get("length", 16000),
             "--steps", tr.get("steps", 3), "--compile", run.compile]  # fmt: skip
    gen = ["generate", *common, "--batch", ge.get("batch", 1), "--steps", ge.get("steps", 1000),
           "--compile", run.compile]  # fmt: skip
    if kind == "sashimi":
        train += ["--naive", "--naive-steps", tr.get("naive_steps", 1)]
    if kind in ("sashimi", "wavenet"):
        gen += ["--naive", "--naive-steps", ge.get("naive_steps", 200)]
    res["train"] = _bench(*train)
    res["generate"] = _bench(*gen)
    res["load_average_after"] = round(os.getloadavg()[0], 2)
    return res


# ----------------------------------------------------------------------------- table + figure


def _paper_training_claim() -> str:
    """The paper's training-speed statement if the reference file holds it, else 'not confirmed'."""
    import yaml

    ref = yaml.safe_load((Path(__file__).parent / "reference" / "paper_results.yaml").read_text())
    section = ref.get("youtubemix") or {}
    note = str(section.get("note", ""))
    if "training 3x faster" in note:
        return (f"3x faster, 1.29M SaShiMi vs 4.24M WaveNet at better NLL (YouTubeMix; "
                f"{section.get('status', 'recalled')})")  # fmt: skip
    return NOT_CONFIRMED


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _train_tps(b: dict, naive: bool = False) -> float | None:
    sec = b.get("naive_seconds_per_step" if naive else "seconds_per_step")
    return b["batch"] * b["length"] / sec if sec else None


def _rows(benches: dict[str, dict], results_dir: Path) -> list[dict]:
    rows = []
    for kind in (k for k in KINDS if k in benches):
        r, name = benches[kind], LABELS[kind]
        t = r.get("train") or {}
        naive_t = _train_tps(t, naive=True)
        rows.append({"measure": "training throughput (samples/s)", "model": name,
                     "ours": _fmt(_train_tps(t)), "reference": _fmt(naive_t),
                     "reference is": "naive Cauchy kernel" if naive_t else "-",
                     "speedup": _fmt(t.get("speedup")), "paper": NOT_CONFIRMED})  # fmt: skip
        g = r.get("generate")
        if g:
            naive_g = g.get("naive_seconds_per_step")
            rows.append({"measure": f"generation (x real time, batch {g['batch']})", "model": name,
                         "ours": _fmt(g.get("realtime_factor")),
                         "reference": _fmt(g["batch"] / SAMPLE_RATE / naive_g if naive_g else None),
                         "reference is": g.get("naive", "-"), "speedup": _fmt(g.get("speedup")),
                         "paper": NOT_CONFIRMED})  # fmt: skip
        s = r.get("sample")
        if s:
            rows.append({"measure": f"sampling (x real time, {s['fast_steps']}-step fast sampler)",
                         "model": name, "ours": _fmt(s.get("realtime_factor_fast")),
                         "reference": _fmt(s.get("realtime_factor_ancestral")),
                         "reference is": f"{s['ancestral_steps']}-step ancestral sampler "
                                         f"({s.get('ancestral_method', 'measured')})",
                         "speedup": _fmt(s.get("speedup")), "paper": NOT_CONFIRMED})  # fmt: skip
    if "sashimi" in benches and "wavenet" in benches:
        ratio = _train_tps(benches["sashimi"]["train"]) / _train_tps(benches["wavenet"]["train"])
        nll = {k: _test_nll(results_dir, benches[k]["run"]) for k in ("sashimi", "wavenet")}
        rows.append({"measure": "SaShiMi trains faster than WaveNet at equal NLL "
                                f"(samples/s ratio; test NLL {_fmt(nll['sashimi'], 4)} vs "
                                f"{_fmt(nll['wavenet'], 4)} bits)",
                     "model": "SaShiMi / WaveNet", "ours": f"{ratio:.3g}x", "reference": "-",
                     "reference is": "-", "speedup": "-", "paper": _paper_training_claim()})  # fmt: skip
    return rows


def _test_nll(results_dir: Path, run_key: str) -> float | None:
    """The run's test NLL in bits from results/runs/RUN/metrics.json, if it is there."""
    path = results_dir / "runs" / run_key / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    nll = metrics.get("nll_bits")  # written by `sashimi evaluate`
    return float(nll) if isinstance(nll, (int, float)) else None


def write_speed_table(results_dir: str | Path = "results") -> list[Path]:
    """results/tables/speed.{md,csv,tex} and results/figures/speed_bench.png from results/bench/*.json
    ([] when there is none)."""
    import pandas as pd

    from sashimi.io import atomic_write

    results_dir = Path(results_dir)
    benches = {}
    for path in sorted((results_dir / "bench").glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("kind") in KINDS:
            benches[data["kind"]] = data
    if not benches:
        return []
    df = pd.DataFrame(_rows(benches, results_dir))
    where = sorted({r["train"].get("device", "?") for r in benches.values() if r.get("train")})
    scale = next(iter(benches.values())).get("scale")
    caption = (f"Speed on this machine ({', '.join(where)}; {scale} scale sizes, random "
               "weights), each beside its naive or official-style reference in the same process. "
               f"Published numbers not in the reference file: {NOT_CONFIRMED}.")  # fmt: skip
    tables = results_dir / "tables"
    out = [tables / "speed.md", tables / "speed.csv", tables / "speed.tex"]
    texts = [f"{caption}\n\n{df.to_markdown(index=False)}\n", df.to_csv(index=False),
             df.to_latex(index=False, caption=caption, label="tab:speed", escape=True)]  # fmt: skip
    for path, text in zip(out, texts):
        with atomic_write(path, "w") as f:
            f.write(text)
    out.append(_figure(benches, results_dir / "figures" / "speed_bench.png"))
    return out


def _figure(benches: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    kinds = [k for k in KINDS if k in benches]
    train = [
        (_train_tps(benches[k]["train"]), _train_tps(benches[k]["train"], True)) for k in kinds
    ]
    gen = []
    for k in kinds:
        g, s = benches[k].get("generate"), benches[k].get("sample")
        if g:
            ref = (
                g["batch"] / SAMPLE_RATE / g["naive_seconds_per_step"]
                if g.get("naive_seconds_per_step")
                else None
            )
            gen.append((g["realtime_factor"], ref))
        else:
            gen.append((s["realtime_factor_fast"], s["realtime_factor_ancestral"]))
    x = range(len(kinds))
    for ax, vals, title in ((axes[0], train, "training (samples/s)"),
                            (axes[1], gen, "generation (x real time)")):  # fmt: skip
        ax.bar([i - 0.2 for i in x], [v[0] for v in vals], width=0.4, label="ours")
        ax.bar([i + 0.2 for i in x], [v[1] or 0 for v in vals], width=0.4, label="reference")
        ax.set_xticks(list(x), [LABELS[k] for k in kinds])
        ax.set_yscale("log")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.suptitle("Speed on this machine: ours vs the naive / official-style reference", y=1.04)
    from sashimi.report.figures import save_figure

    return save_figure(fig, path)


# ----------------------------------------------------------------------------- CLI


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", required=True, choices=KINDS, help="model kind to time")


def run(args: argparse.Namespace) -> int:
    from sashimi.config import load_params
    from sashimi.io import write_json

    P = load_params(args.params)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = measure(P, args.kind, device)
    path = Path("results") / "bench" / f"{args.kind}.json"
    write_json(path, result)
    print(f"wrote {path}")
    return 0
