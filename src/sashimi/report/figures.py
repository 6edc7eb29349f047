"""The report's figures (training curves, NLL vs parameters, speed, log-mel spectrograms) and
the audio clips report.html plays. Figures are seaborn on matplotlib's Agg backend."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np

from sashimi.config import Params
from sashimi.io import atomic_write, read_audio, write_wav
from sashimi.report.cells import num
from sashimi.report.reference import paper_label
from sashimi.report.results import RunResult


def _read_clips(
    prepared: Path, split: str, k: int, max_seconds: float, sr: int
) -> list[np.ndarray]:
    audio_path, off_path = prepared / f"{split}.audio.npy", prepared / f"{split}.offsets.npy"
    if not (audio_path.exists() and off_path.exists()):
        return []
    audio = np.load(audio_path, mmap_mode="r")  # (total,)
    offsets = np.load(off_path)  # (n_clips + 1,)
    n = min(k, len(offsets) - 1)
    limit = int(max_seconds * sr)
    return [
        np.asarray(audio[offsets[i] : min(offsets[i + 1], offsets[i] + limit)], dtype=np.float32)
        for i in range(n)
    ]


def copy_audio(
    P: Params, results: dict[str, RunResult], out: Path, clips: int, max_seconds: float = 8.0
) -> dict[str, list[Path]]:
    """Real test clips and the first generated clips of each run under out/audio/, so that
    report.html plays them from relative paths. Returns {group: [wav paths]}."""
    audio_dir = out / "audio"
    if audio_dir.exists():
        shutil.rmtree(audio_dir)
    groups: dict[str, list[Path]] = {}
    used = {P.runs[k].dataset for k in results if P.runs[k].table}
    for ds_key in sorted(used):
        ds = P.datasets[ds_key]
        paths = []
        for i, clip in enumerate(
            _read_clips(ds.prepared_dir, "test", clips, max_seconds, ds.sample_rate)
        ):
            p = audio_dir / f"real-{ds_key}" / f"test-{i:02d}.wav"
            write_wav(p, clip, ds.sample_rate)
            paths.append(p)
        if paths:
            groups[f"real-{ds_key}"] = paths
    for key, res in results.items():
        paths = []
        for src in res.samples[:clips]:
            x, sr = read_audio(src)
            dst = audio_dir / key / src.name
            write_wav(dst, x[: int(max_seconds * sr)], sr)  # at most max_seconds per clip
            paths.append(dst)
        if paths:
            groups[key] = paths
    return groups


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt, sns


def save_figure(fig, path: Path) -> Path:
    """Write a figure as PNG atomically and free it."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def fig_training_curves(P: Params, results: dict[str, RunResult], path: Path) -> Path | None:
    import pandas as pd

    frames = []
    for key, res in results.items():
        if not res.log:
            continue
        df = pd.DataFrame(res.log)
        df["step"] = pd.to_numeric(df.get("step"), errors="coerce")
        bits = pd.to_numeric(df.get("bits_per_sample", pd.Series(dtype=float)), errors="coerce")
        loss = pd.to_numeric(df.get("loss", pd.Series(dtype=float)), errors="coerce")
        use_bits = bits.notna().any()
        df["value"] = bits if use_bits else loss
        table = res.run.table or res.run.kind
        df["panel"] = f"{table}: {'bits/sample' if use_bits else 'loss'}"
        df["run"] = key
        df["split"] = df.get("split", "train")
        frames.append(df[["step", "value", "panel", "run", "split"]].dropna())
    if not frames:
        return None
    data = pd.concat(frames, ignore_index=True)
    if data.empty:
        return None
    plt, sns = _plt()
    g = sns.relplot(
        data=data,
        x="step",
        y="value",
        hue="run",
        style="split",
        col="panel",
        col_wrap=min(3, data["panel"].nunique()),
        kind="line",
        markers=True,
        height=3,
        aspect=1.3,
        facet_kws={"sharey": False, "sharex": False},
    )
    g.set_titles("{col_name}")
    g.set_axis_labels("step", "")
    g.figure.suptitle(f"Training curves ({P.scale} scale)", y=1.02)
    return save_figure(g.figure, path)


def fig_nll_vs_params(
    P: Params, results: dict[str, RunResult], ref: dict, path: Path
) -> Path | None:
    import pandas as pd

    pts = []
    for key, res in results.items():
        nll, pm = res.get("nll_bits"), res.params_m()
        if nll is not None and pm is not None and res.run.table:
            pts.append(
                {"params_m": pm, "nll": nll, "table": res.run.table, "source": "ours", "label": key}
            )
    for table in ("youtubemix", "sc09"):
        for row in ref.get(table, {}).get("rows", []):
            if num(row.get("nll")) is not None and num(row.get("params")) is not None:
                pts.append(
                    {
                        "params_m": row["params"],
                        "nll": row["nll"],
                        "table": table,
                        "source": "paper",
                        "label": paper_label(row),
                    }
                )
    if not any(p["source"] == "ours" for p in pts):
        return None
    plt, sns = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.scatterplot(
        data=pd.DataFrame(pts), x="params_m", y="nll", hue="table", style="source", s=60, ax=ax
    )
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("test NLL (bits/sample)")
    ax.set_title(f"NLL vs parameters ({P.scale} scale; paper points for reference)")
    return save_figure(fig, path)


def fig_speed(P: Params, results: dict[str, RunResult], path: Path) -> Path | None:
    import pandas as pd

    rows = []
    for key, res in results.items():
        for metric, name in (
            ("sample_realtime_factor", "sampling (× real time)"),
            ("tokens_per_s", "training (tokens/s)"),
        ):
            v = res.get(metric)
            if v is not None:
                rows.append({"run": key, "value": v, "metric": name})
    if not rows:
        return None
    plt, sns = _plt()
    data = pd.DataFrame(rows)
    g = sns.catplot(
        data=data,
        y="run",
        x="value",
        col="metric",
        kind="bar",
        sharex=False,
        height=max(2.5, 0.3 * data["run"].nunique()),
        aspect=1.2,
    )
    g.set_titles("{col_name}")
    g.figure.suptitle(f"Speed ({P.scale} scale, this machine)", y=1.02)
    return save_figure(g.figure, path)


def log_mel(x: np.ndarray, sr: int) -> np.ndarray:
    """Log-mel spectrogram in dB (80 bands, 1024-point FFT, hop 256): (n_mels, frames)."""
    import torch
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=sr, n_fft=1024, hop_length=256, n_mels=80
    )
    s = mel(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))  # (80, frames)
    return torchaudio.functional.amplitude_to_DB(s, 10.0, 1e-10, 0.0, top_db=80.0).numpy()


def fig_spectrograms(
    P: Params, groups: dict[str, list[Path]], ds_key: str, path: Path
) -> Path | None:
    panels = []
    if f"real-{ds_key}" in groups:
        panels.append(("real (test)", groups[f"real-{ds_key}"][0]))
    for key, run in P.runs.items():
        if run.dataset == ds_key and run.table and key in groups:
            panels.append((run.label or key, groups[key][0]))
    if not panels:
        return None
    plt, _ = _plt()
    ncol = min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.4 * nrow), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, wav) in zip(axes.flat, panels):
        x, sr = read_audio(wav)
        ax.imshow(log_mel(x, sr), origin="lower", aspect="auto", cmap="magma")
        ax.set_title(title, fontsize=8)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Log-mel spectrograms: {ds_key} ({P.scale} scale)", y=1.0 + 0.08 / nrow)
    fig.tight_layout()
    return save_figure(fig, path)
