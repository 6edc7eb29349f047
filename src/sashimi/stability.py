"""`sashimi stability --run RUN`: the S4 stability ablation as a result (paper section 3.2).

RUN is a SaShiMi trained with the original, unconstrained S4 (`model.ssm: unconstrained`,
sashimi.ssm.s4_unconstrained); its `stability.baseline` is the same model trained with ours.
Both generate `steps` samples in recurrent mode from the same seed, with the exact dense S4
step (float64 state, the official-style recurrence), and per bucket of steps we record:

    max_state   the largest |component| of any S4 state (inf once one is not finite)
    max_logit   the largest |logit|
    nonfinite   the fraction of logits that are not finite

plus each model's spectral radius of A-bar (ours is < 1 by construction). Non-finite logits
are zeroed before sampling so generation carries on. Output: results/runs/RUN/stability.json;
`write_stability_table(results_dir)` turns every such file into results/tables/stability.*
and results/figures/stability.png."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import Tensor

from sashimi import compiling
from sashimi.errors import UserError

TABLE = "stability"
COLUMNS = ["ablation", "model", "spectral radius", "steps", "max abs(state)", "max abs(logit)",
           "non-finite (%)"]  # fmt: skip
PAPER = {  # the paper's claim, in words (no number is published for it)
    "stable": "bounded: A-bar's eigenvalues inside the unit disc by construction",
    "unconstrained": "can diverge in recurrent mode",
}


def bucket_edges(steps: int, buckets: int) -> list[int]:
    """`buckets` + 1 step indices splitting [0, steps) into near-equal buckets."""
    buckets = max(1, min(buckets, steps))
    return [round(i * steps / buckets) for i in range(buckets + 1)]


def _max_abs(ts: list[Tensor]) -> Tensor:
    """Largest |x| over the floating tensors `ts` as a float64 scalar tensor; inf if any is not finite."""
    ms = [t.detach().abs().amax().double() for t in ts if t.is_floating_point() and t.numel()]
    if not ms:
        return torch.zeros((), dtype=torch.float64)
    return torch.nan_to_num(torch.stack(ms).amax(), nan=math.inf)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


@torch.no_grad()
def rollout(
    model, steps: int, buckets: int, batch: int = 1, seed: int = 0, compile: bool = False
) -> dict:
    """Recurrent generation of `steps` samples; per bucket max |state|, max |logit|, non-finite fraction.

    Values that are not finite are stored as None (JSON null). `first_nonfinite_step` is the
    first step whose logits hold a non-finite value (None: never). `compile`: the compiled
    step (the run's setting, `compiling.compile_step`).
    """
    from sashimi.generation.cuda_graphs import tensors
    from sashimi.sample import sample_token

    device = next(model.parameters()).device
    model.setup_step(compile=compile, s4_mode="dense", cuda_graph=False)
    state = model.default_state(batch, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    token = torch.full((batch,), model.n_classes // 2, dtype=torch.long, device=device)
    edges = bucket_edges(steps, buckets)
    out: dict = {"edges": edges, "max_state": [], "max_logit": [], "nonfinite": []}
    first_bad = None
    for lo, hi in zip(edges[:-1], edges[1:]):
        m_state = m_logit = torch.zeros((), dtype=torch.float64, device=device)
        bad = torch.zeros((), dtype=torch.int64, device=device)
        for t in range(lo, hi):
            logits, state = model.step(token, state)  # (B, K)
            finite = torch.isfinite(logits)
            n_bad = (~finite).sum()
            if first_bad is None and int(n_bad):
                first_bad = t
            bad += n_bad
            ssm = tensors([state["down"], state["center"], state["up"]])
            m_state = torch.maximum(m_state, _max_abs(ssm))
            m_logit = torch.maximum(m_logit, _max_abs([logits]))
            token = sample_token(torch.where(finite, logits, 0.0), generator=gen)  # (B,)
        out["max_state"].append(_finite_or_none(float(m_state)))
        out["max_logit"].append(_finite_or_none(float(m_logit)))
        out["nonfinite"].append(float(bad) / ((hi - lo) * logits.numel()))
    out["first_nonfinite_step"] = first_bad
    return out


def measure(P, run_key: str, device: torch.device) -> dict:
    """The ablation of run `run_key` (its `stability` block): both models rolled out."""
    from sashimi.checkpoints import load_model
    from sashimi.ssm.s4_unconstrained import spectral_radius

    run = P.run(run_key)
    spec = run.raw.get("stability")
    where = f"{P.path}: runs.{run_key}.stability"
    if not isinstance(spec, dict) or not spec.get("baseline"):
        raise UserError(f"{where}: missing (a stability ablation names its `baseline` run)")
    base = P.run(spec["baseline"])
    steps, buckets = int(spec.get("steps", 16000)), int(spec.get("buckets", 16))
    batch, seed = int(spec.get("batch_size", 1)), int(spec.get("seed", 0))
    result = {"run": run_key, "steps": steps, "buckets": buckets, "batch": batch, "seed": seed,
              "step_mode": "dense S4 step, float64 state", "models": []}  # fmt: skip
    for role, r in (("stable", base), ("unconstrained", run)):
        model, ckpt = load_model(r.run_dir, map_location=device)
        ssm = dict(ckpt.get("model_kwargs") or {}).get("ssm", "stable")
        if ssm != role:
            raise UserError(f"{where}: run {r.key} has model.ssm {ssm!r}, expected {role!r}")
        rho = spectral_radius(model)
        entry = {"role": role, "run": r.key, "label": r.label or r.key, "ssm": ssm,
                 "train_step": int(ckpt.get("step", 0)), "spectral_radius": rho}  # fmt: skip
        compiled = compiling.compile_step(r.compile, device)
        entry["compiled"] = compiled
        entry.update(rollout(model, steps, buckets, batch, seed, compiled))
        result["models"].append(entry)
    return result


# ----------------------------------------------------------------------------- table + figure


def _rows(results: list[dict]) -> list[dict]:
    def num(x: float | None, digits: int = 3) -> str:
        return "inf/nan" if x is None else f"{x:.{digits}g}"

    rows = []
    for res in results:
        for m in res["models"]:
            edges = m["edges"]
            for i in range(len(edges) - 1):
                rows.append({
                    "ablation": res["run"],
                    "model": f"{m['label']} ({m['ssm']})",
                    "spectral radius": f"{m['spectral_radius']:.6f}",
                    "steps": f"{edges[i]}-{edges[i + 1] - 1}",
                    "max abs(state)": num(m["max_state"][i]),
                    "max abs(logit)": num(m["max_logit"][i]),
                    "non-finite (%)": f"{100 * m['nonfinite'][i]:.2f}",
                })  # fmt: skip
    return rows


def _caption(results: list[dict]) -> str:
    parts = []
    for res in results:
        for m in res["models"]:
            parts.append(
                f"{m['label']} ({m['ssm']}): spectral radius of A-bar {m['spectral_radius']:.6f}, "
                f"first non-finite step {m['first_nonfinite_step'] if m['first_nonfinite_step'] is not None else 'none'}"
                f" in {res['steps']}; paper: {PAPER[m['ssm']]}"
            )
    return (
        "Stability ablation: recurrent generation (dense S4 step) from ours and the unconstrained "
        "S4. " + "; ".join(parts) + "."
    )


def write_stability_table(results_dir: str | Path = "results") -> list[Path]:
    """results/tables/stability.{md,csv,tex} and results/figures/stability.png from every
    results/runs/*/stability.json ([] when there is none)."""
    import pandas as pd

    from sashimi.io import atomic_write, read_json

    results_dir = Path(results_dir)
    files = sorted(results_dir.glob("runs/*/stability.json"))
    if not files:
        return []
    results = [read_json(f) for f in files]
    df = pd.DataFrame(_rows(results), columns=COLUMNS)
    caption = _caption(results)
    tables = results_dir / "tables"
    out = [tables / f"{TABLE}.md", tables / f"{TABLE}.csv", tables / f"{TABLE}.tex"]
    texts = [
        f"{caption}\n\n{df.to_markdown(index=False)}\n",
        df.to_csv(index=False),
        df.to_latex(index=False, caption=caption, label="tab:stability", escape=True),
    ]
    for path, text in zip(out, texts):
        with atomic_write(path, "w") as f:
            f.write(text)
    out.append(_figure(results, results_dir / "figures" / f"{TABLE}.png"))
    return out


def _figure(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for res in results:
        for m in res["models"]:
            x = m["edges"][1:]
            name = f"{m['label']} ({m['ssm']}, rho {m['spectral_radius']:.4f})"
            for ax, key in zip(axes, ("max_state", "max_logit")):
                top = max((v for v in m[key] if v is not None), default=1.0)
                y = [v if v is not None else 10 * top for v in m[key]]  # non-finite: drawn above
                ax.plot(x, y, marker="o", ms=3, label=name)
    for ax, title in zip(axes, ("max |state| (dense S4 state)", "max |logit|")):
        ax.set_yscale("log")
        ax.set_xlabel("generation step")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Stability ablation: recurrent generation, ours vs unconstrained S4", y=1.04)
    from sashimi.report.figures import save_figure

    return save_figure(fig, path)


# ----------------------------------------------------------------------------- CLI


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="the unconstrained run (runs.RUN.stability)")


def run(args: argparse.Namespace) -> int:
    from sashimi.config import load_params
    from sashimi.io import write_json

    P = load_params(args.params)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = measure(P, args.run, device)
    path = P.run(args.run).run_dir / "stability.json"
    write_json(path, result)
    for m in result["models"]:
        print(f"{m['label']} ({m['ssm']}): spectral radius {m['spectral_radius']:.6f}, "
              f"max |state| {m['max_state'][-1]}, first non-finite step {m['first_nonfinite_step']}")  # fmt: skip
    print(f"wrote {path}")
    return 0
