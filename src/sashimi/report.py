"""`sashimi report`: the paper's tables with our numbers beside the published ones, figures,
and a self-contained `results/report.html`.

Reads params.yaml (through `sashimi.config`), each run's `results/runs/<run>/` (`metrics.json`,
`train_log.csv`, `bench.json`, `samples/*.wav`), the real-data SC09 rows written by
`sashimi evaluate --real sc09` (`results/runs/real-<split>/metrics.json`), and the published
numbers (package data `sashimi/reference/paper_results.yaml`). Writes

    results/tables/<table>.{md,csv,tex}   beethoven, youtubemix, sc09, sc09_diffwave_ablation, runs
    results/figures/*.png                 training curves, NLL vs parameters, speed, spectrograms
    results/audio/<run>/*.wav             a few real and generated clips (played by report.html)
    results/report.html                   tables + figures (embedded) + audio players

A value this pipeline has not produced yet renders as an em dash, never as a number; a row the
paper has but this pipeline does not run shows "n/a". Published values stand beside ours as
"ours (paper)"; values the reference file marks `recalled` carry a dagger and a footnote.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import importlib.resources
import io
import json
import math
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sashimi.config import Params, RunConfig, load_params
from sashimi.errors import UserError
from sashimi.io import atomic_write, read_audio, write_wav

MISSING = "—"  # em dash: not computed (yet)
NOT_RUN = "n/a"  # the paper has this row, this pipeline has no such run
DAGGER = "†"
TABLES = ("beethoven", "youtubemix", "sc09", "sc09_diffwave_ablation", "runs")
FORMATS = ("md", "csv", "tex")
REAL_SPLITS = ("train", "test")  # the SC09 table's real-data rows
REAL_LABELS = {"train": ("Train set", "train-set"), "test": ("Test set", "test-set")}


def real_metrics_path(split: str) -> Path:
    """Where `sashimi evaluate --real sc09 --split SPLIT` writes the real-data SC09 metrics."""
    return Path("results/runs") / f"real-{split}" / "metrics.json"


def table_paths(out: str | Path = "results") -> list[Path]:
    """Every table file `sashimi report` writes (the workflow's targets)."""
    return [Path(out) / "tables" / f"{t}.{f}" for t in TABLES for f in FORMATS]


# ----------------------------------------------------------------------------- reference


def load_reference() -> dict:
    """The published numbers (package data; a copy of ../shared/reference/paper_results.yaml)."""
    text = importlib.resources.files("sashimi").joinpath("reference/paper_results.yaml").read_text()
    return yaml.safe_load(text)


def _norm(s: str | None) -> str:
    return re.sub(r"[^a-z0-9]", "", (s or "").lower())


def _paper_label(row: dict) -> str:
    """'SampleRNN 3-tier', 'DiffWave (SaShiMi)', 'SaShiMi small' ... from a reference row."""
    names = {
        "sashimi": "SaShiMi",
        "wavenet": "WaveNet",
        "samplernn": "SampleRNN",
        "diffwave": "DiffWave",
        "wavegan": "WaveGAN",
        "train-set": "Train set",
        "test-set": "Test set",
    }
    model = row.get("model")
    parts = [names.get(model, model)] if model else []
    if row.get("backbone"):
        bb = names.get(row["backbone"], row["backbone"])
        parts.append(f"({bb})" if model else bb)
    if row.get("variant"):
        parts.append(str(row["variant"]))
    return " ".join(parts)


def match_paper_row(label: str | None, model_name: str, rows: list[dict]) -> dict | None:
    """The reference row a run's `label` names: equal after dropping case and punctuation
    ('SaShiMi 8 layers' == sashimi + '8-layers'); else the model's only un-qualified or
    'replication' row."""
    key = _norm(label)
    for row in rows:
        if key and _norm(_paper_label(row)) == key:
            return row
    same = [
        r
        for r in rows
        if r.get("model", r.get("backbone")) == model_name
        and r.get("variant") in (None, "replication")
    ]
    return same[0] if len(same) == 1 else None


# ----------------------------------------------------------------------------- cells


@dataclass
class Cell:
    """One result: ours beside the published value."""

    ours: float | None = None  # None: missing
    paper: float | None = None
    recalled: bool = False
    digits: int = 3
    applicable: bool = True  # False: no such run in this pipeline ("n/a")

    def ours_text(self) -> str:
        if not self.applicable:
            return NOT_RUN
        v = _num(self.ours)
        return MISSING if v is None else _fmt(v, self.digits)

    def paper_text(self, dagger: str = DAGGER) -> str:
        if self.paper is None:
            return ""
        return _fmt(self.paper, self.digits) + (dagger if self.recalled else "")

    def text(self, dagger: str = DAGGER) -> str:
        p = self.paper_text(dagger)
        return f"{self.ours_text()} ({p})" if p else self.ours_text()


def _fmt(v: float, digits: int) -> str:
    if abs(v) >= 1e4 or (digits == 0 and abs(v) >= 1e3):
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _num(x: Any) -> float | None:
    """A finite float, else None (absent, null, NaN, non-numeric all read as missing)."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


@dataclass
class Table:
    key: str
    title: str
    headers: list[str]
    rows: list[list[str | Cell]]
    notes: list[str] = field(default_factory=list)

    def any_recalled(self) -> bool:
        return any(
            isinstance(c, Cell) and c.recalled and c.paper is not None for r in self.rows for c in r
        )


# ----------------------------------------------------------------------------- run outputs


@dataclass
class RunResult:
    run: RunConfig
    metrics: dict
    bench: dict
    log: list[dict]  # train_log.csv rows
    samples: list[Path]
    sample_summary: dict = field(default_factory=dict)  # samples/summary.json, if written

    @property
    def finished(self) -> bool:
        return bool(self.metrics)

    def get(self, key: str) -> float | None:
        """A number from metrics.json, else bench.json, else samples/summary.json; else None.
        Training speed falls back to what the trainer measured in train_log.csv."""
        for source in (self.metrics, self.bench, self.sample_summary):
            v = _num(source.get(key))
            if v is not None:
                return v
        if key == "tokens_per_s":
            return self._median([_num(r.get("tokens_per_s")) for r in self._train_rows()])
        if key == "train_seconds_per_step":
            return self.seconds_per_step()
        return None

    def _train_rows(self) -> list[dict]:
        return [r for r in self.log if r.get("split") == "train"]

    @staticmethod
    def _median(values: list[float | None]) -> float | None:
        v = [x for x in values if x is not None]
        return float(np.median(v)) if v else None

    def seconds_per_step(self) -> float | None:
        """Median wall seconds per optimiser step between consecutive train log rows with no
        validation in between (train_log.csv `elapsed_s`)."""
        rates, prev = [], None
        for r in self.log:
            if r.get("split") != "train":
                prev = None
                continue
            step, t = _num(r.get("step")), _num(r.get("elapsed_s"))
            if prev is not None and step is not None and t is not None and step > prev[0]:
                rates.append((t - prev[1]) / (step - prev[0]))
            prev = (step, t) if step is not None and t is not None else None
        return self._median(rates)

    @property
    def steps(self) -> int | None:
        steps = [_num(r.get("step")) for r in self.log]
        steps = [s for s in steps if s is not None]
        return int(max(steps)) if steps else None

    @property
    def minutes(self) -> float | None:
        t = [_num(r.get("elapsed_s")) for r in self.log]
        t = [s for s in t if s is not None]
        return max(t) / 60 if t else None

    def best_val(self) -> float | None:
        v = [
            _num(r.get("bits_per_sample"))
            for r in self.log
            if r.get("split") in ("val", "validation")
        ]
        v = [x for x in v if x is not None]
        return min(v) if v else None

    def params_m(self) -> float | None:
        p = self.get("params")
        return p / 1e6 if p is not None else None


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    return obj if isinstance(obj, dict) else {}


def _read_log(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def collect(run: RunConfig) -> RunResult:
    d = run.run_dir
    return RunResult(
        run=run,
        metrics=_read_json(d / "metrics.json"),
        bench=_read_json(d / "bench.json"),
        log=_read_log(d / "train_log.csv"),
        samples=sorted((d / "samples").glob("*.wav")),
        sample_summary=_read_json(d / "samples" / "summary.json"),
    )


# ----------------------------------------------------------------------------- tables


def _is_confirmed(section: dict, row: dict, metric: str) -> bool:
    return section.get("status") == "confirmed" or metric in (row.get("confirmed") or [])


def _paper_cell(
    section: dict,
    row: dict | None,
    metric: str,
    ours: float | None,
    digits: int,
    applicable: bool = True,
) -> Cell:
    paper = _num(row.get(metric)) if row else None
    recalled = paper is not None and not _is_confirmed(section, row, metric)
    return Cell(ours=ours, paper=paper, recalled=recalled, digits=digits, applicable=applicable)


@dataclass(frozen=True)
class Metric:
    header: str
    key: str  # reference-file key
    ours: Callable[[RunResult], float | None]
    digits: int = 3
    applies: Callable[[RunConfig], bool] = lambda run: True  # False: "n/a" for this run


def _paper_table(
    P: Params,
    results: dict[str, RunResult],
    ref: dict,
    key: str,
    title: str,
    metrics: list[Metric],
    extra_rows: Iterable[list[str | Cell]] = (),
    descriptor: tuple[str, Callable[[dict | None], str]] | None = None,
) -> Table:
    """Rows in the paper's order (with the matching run's numbers), then our runs the paper
    lacks. A run is placed by its `table` and `label` fields in params.yaml."""
    section = ref.get(key, {})
    paper_rows = list(section.get("rows", []))
    runs = [r for r in P.runs.values() if r.table == key]
    matched: dict[int, RunConfig] = {}
    unmatched: list[RunConfig] = []
    for r in runs:
        row = match_paper_row(
            r.label,
            r.model_name if r.model_name != "diffwave" else r.model.get("backbone", ""),
            paper_rows,
        )
        if row is not None and id(row) not in matched:
            matched[id(row)] = r
        else:
            unmatched.append(r)
    headers = (
        ["Model", "Run"] + ([descriptor[0]] if descriptor else []) + [m.header for m in metrics]
    )
    rows: list[list[str | Cell]] = []

    def line(label: str, run: RunConfig | None, prow: dict | None) -> list[str | Cell]:
        res = results.get(run.key) if run else None
        cells: list[str | Cell] = [label, run.key if run else ""]
        if descriptor:
            cells.append(descriptor[1](prow))
        for m in metrics:
            ours = m.ours(res) if res is not None else None
            applicable = run is not None and m.applies(run)
            cells.append(_paper_cell(section, prow, m.key, ours, m.digits, applicable=applicable))
        return cells

    for prow in paper_rows:
        if prow.get("model") in ("train-set", "test-set"):
            continue  # the real-data rows come last (extra_rows)
        run = matched.get(id(prow))
        rows.append(line(run.label if run and run.label else _paper_label(prow), run, prow))
    for run in unmatched:
        rows.append(line(run.label or run.key, run, None))
    rows.extend(extra_rows)
    return Table(key=key, title=title, headers=headers, rows=rows)


def _metric(key: str) -> Callable[[RunResult], float | None]:
    return lambda res: res.get(key)


PARAMS = Metric("Params (M)", "params", lambda res: res.params_m(), 2)
NLL = Metric("NLL (bits)", "nll", _metric("nll_bits"), 3, applies=lambda run: run.kind == "ar")
SC09_METRICS = [
    Metric("FID ↓", "fid", _metric("fid"), 2),
    Metric("IS ↑", "is", _metric("is"), 2),
    Metric("mIS ↑", "mis", _metric("mis"), 2),
    Metric("AM ↓", "am", _metric("am"), 2),
]


def build_tables(
    P: Params, results: dict[str, RunResult], ref: dict, real: dict[str, dict] | None = None
) -> dict[str, Table]:
    real = real or {}
    tables: dict[str, Table] = {}

    tables["beethoven"] = _paper_table(
        P,
        results,
        ref,
        "beethoven",
        "Beethoven: test NLL (bits per sample), linear 8-bit",
        [NLL],
        descriptor=(
            "Context (paper)",
            lambda row: f"{row['context']:,}" if row and row.get("context") else "",
        ),
    )

    speed = [
        Metric("Train s/step", "-", _metric("train_seconds_per_step"), 3),
        Metric("Train tokens/s", "-", _metric("tokens_per_s"), 0),
        Metric("Sampling × real time", "-", _metric("sample_realtime_factor"), 3),
    ]
    t = _paper_table(
        P,
        results,
        ref,
        "youtubemix",
        "YouTubeMix: parameters, test NLL (bits per sample, mu-law 8-bit) and speed",
        [PARAMS, NLL, *speed],
    )
    t.notes.append(
        "Speed columns are ours only, measured on this run's hardware: training seconds per "
        "step and tokens per second (metrics.json, else the trainer's train_log.csv); sampling "
        "speed as seconds of audio generated per wall-clock second (`sample_realtime_factor` in "
        "metrics.json, bench.json or samples/summary.json). The paper's time per epoch, "
        "sampling throughput and MOS are not reproduced here."
    )
    tables["youtubemix"] = t

    section = ref.get("sc09", {})
    paper_rows = section.get("rows", [])
    extra = []
    for split in REAL_SPLITS:
        label, model = REAL_LABELS[split]
        prow = next((r for r in paper_rows if r.get("model") == model), None)
        m = real.get(split, {})
        cells: list[str | Cell] = [label, f"real: {split} split"]
        for metric in [PARAMS, NLL, *SC09_METRICS]:
            ours = None if metric in (PARAMS, NLL) else _num(m.get(metric.key))
            applicable = metric not in (PARAMS, NLL)
            cell = _paper_cell(
                section, prow, metric.key, ours, metric.digits, applicable=applicable
            )
            if not applicable and cell.paper is None:
                cell = Cell(ours=None, applicable=False, digits=metric.digits)
            cells.append(cell)
        extra.append(cells)
    t = _paper_table(
        P,
        results,
        ref,
        "sc09",
        "SC09 (1 s spoken digits): NLL and automatic metrics (FID, IS, mIS, AM)",
        [PARAMS, NLL, *SC09_METRICS],
        extra_rows=extra,
    )
    t.notes.append(
        "IS is the paper-compatible variant (see `sashimi.metrics.inception_score`); "
        "autoregressive models are scored on the paper's likelihood-trimmed half of their "
        "samples, diffusion models on all. Train/Test set rows score real clips."
    )
    tables["sc09"] = t

    tables["sc09_diffwave_ablation"] = _paper_table(
        P,
        results,
        ref,
        "sc09_diffwave_ablation",
        "SC09 DiffWave backbone ablation (unconditional, paper: 500k steps)",
        [PARAMS, *SC09_METRICS],
    )
    tables["sc09_diffwave_ablation"].notes.append(
        "The full-size WaveNet and SaShiMi backbones are not trained again for this table: "
        "this pipeline's full-size DiffWave runs are the SC09 table's rows (their own step counts)."
    )
    tables["runs"] = runs_table(P, results)
    return tables


def runs_table(P: Params, results: dict[str, RunResult]) -> Table:
    """The training budget and status of every run: what the numbers above rest on."""
    headers = [
        "Run",
        "Table",
        "Label",
        "Model",
        "Dataset",
        "Status",
        "Steps",
        "Minutes",
        "Best val bits",
        "Test NLL (bits)",
        "Params (M)",
    ]
    rows: list[list[str | Cell]] = []
    for key, run in P.runs.items():
        res = results[key]
        ckpts = run.run_dir / "checkpoints"
        trained = ckpts.is_dir() and any(ckpts.glob("*.pt"))
        if res.finished or (run.kind == "classifier" and (ckpts / "best.pt").is_file()):
            status = "done"
        else:
            status = "trained" if trained else "missing"

        def f(v: float | None, digits: int) -> str:
            return MISSING if v is None else _fmt(v, digits)

        rows.append(
            [
                key,
                run.table or "",
                run.label or "",
                run.model_name,
                run.dataset,
                status,
                f(res.steps, 0),
                f(res.minutes, 1),
                f(res.best_val(), 3),
                f(res.get("nll_bits"), 3),
                f(res.params_m(), 2),
            ]
        )
    return Table(key="runs", title="Runs: status and training budget", headers=headers, rows=rows)


def scale_note(P: Params) -> str:
    if P.scale == "demo":
        models = [r for r in P.runs.values() if r.kind != "classifier"]  # its budget is epochs
        steps = sorted({r.train.max_steps for r in models if r.train.max_steps})
        mins = sorted({r.train.max_minutes for r in models if r.train.max_minutes})
        budget = f"at most {max(steps)} training steps" if steps else "a short training budget"
        if mins:
            budget += f" or {max(mins):g} minutes"
        return (
            f"Demo scale: synthetic data, tiny models, {budget} per model — numbers are NOT "
            "comparable to the paper."
        )
    return (
        "Paper scale: the paper's datasets and model sizes; each run's training budget "
        "(steps, minutes) is in the runs table."
    )


def _footnotes(table: Table, P: Params) -> list[str]:
    notes = [scale_note(P)]
    if table.key != "runs":
        notes.append(
            f"Cells read ours (paper). {MISSING}: not computed yet (run missing or unfinished); "
            f"{NOT_RUN}: the paper's row, not run by this pipeline."
        )
    if table.any_recalled():
        notes.append(
            f"{DAGGER} Published value recalled, not re-read from the paper's PDF "
            "(status `recalled` in sashimi/reference/paper_results.yaml)."
        )
    return notes + table.notes


# ----------------------------------------------------------------------------- renderers


def to_markdown(table: Table, P: Params) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = [f"### {table.title}", "", f"*{scale_note(P)}*", ""]
    lines.append("| " + " | ".join(esc(h) for h in table.headers) + " |")
    lines.append("|" + "|".join("---" for _ in table.headers) + "|")
    for row in table.rows:
        lines.append(
            "| " + " | ".join(esc(c.text() if isinstance(c, Cell) else c) for c in row) + " |"
        )
    lines.append("")
    for n in _footnotes(table, P)[1:]:
        lines.append(f"- {n}")
    return "\n".join(lines) + "\n"


def to_csv(table: Table, P: Params) -> str:
    """Ours and paper in separate columns (`<header>`, `<header> (paper)`); recalled paper
    values keep their dagger; missing is an em dash."""
    headers = ["scale"]
    for i, h in enumerate(table.headers):
        headers.append(h)
        if any(isinstance(r[i], Cell) and r[i].paper is not None for r in table.rows):
            headers.append(f"{h} (paper)")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(headers)
    for row in table.rows:
        out = [P.scale]
        for i, c in enumerate(row):
            out.append(c.ours_text() if isinstance(c, Cell) else c)
            if any(isinstance(r[i], Cell) and r[i].paper is not None for r in table.rows):
                out.append(c.paper_text() if isinstance(c, Cell) else "")
        w.writerow(out)
    return buf.getvalue()


_TEX_ESC = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    MISSING: "---",
    DAGGER: r"$^\dagger$",
    "×": r"$\times$",
    "↓": r"$\downarrow$",
    "↑": r"$\uparrow$",
}


def _tex(s: str) -> str:
    return "".join(_TEX_ESC.get(ch, ch) for ch in s)


def to_latex(table: Table, P: Params) -> str:
    cols = "l" * 2 + "r" * (len(table.headers) - 2)
    lines = [
        r"% generated by `sashimi report`; needs \usepackage{booktabs}",
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\begin{{tabular}}{{{cols}}}",
        r"\toprule",
        " & ".join(_tex(h) for h in table.headers) + r" \\",
        r"\midrule",
    ]
    for row in table.rows:
        lines.append(" & ".join(_tex(c.text() if isinstance(c, Cell) else c) for c in row) + r" \\")
    lines += [
        r"\bottomrule",
        r"\end{tabular}",
        rf"\caption{{{_tex(table.title)}. {' '.join(_tex(n) for n in _footnotes(table, P))}}}",
        rf"\label{{tab:{table.key.replace('_', '-')}}}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


def to_html(table: Table, P: Params) -> str:
    e = html.escape
    out = [f"<h3 id='{e(table.key)}'>{e(table.title)}</h3>", "<table>", "<thead><tr>"]
    out += [f"<th>{e(h)}</th>" for h in table.headers]
    out.append("</tr></thead><tbody>")
    for row in table.rows:
        tds = []
        for c in row:
            if isinstance(c, Cell):
                paper = (
                    f" <span class='paper'>({e(c.paper_text())})</span>"
                    if c.paper is not None
                    else ""
                )
                cls = " class='missing'" if c.ours_text() in (MISSING, NOT_RUN) else ""
                tds.append(f"<td{cls}>{e(c.ours_text())}{paper}</td>")
            else:
                tds.append(f"<td>{e(c)}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    out += [f"<p class='note'>{e(n)}</p>" for n in _footnotes(table, P)[1:]]
    return "\n".join(out)


# ----------------------------------------------------------------------------- audio


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


# ----------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt, sns


def _save(fig, path: Path) -> Path:
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
    return _save(g.figure, path)


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
            if _num(row.get("nll")) is not None and _num(row.get("params")) is not None:
                pts.append(
                    {
                        "params_m": row["params"],
                        "nll": row["nll"],
                        "table": table,
                        "source": "paper",
                        "label": _paper_label(row),
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
    return _save(fig, path)


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
    return _save(g.figure, path)


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
    return _save(fig, path)


# ----------------------------------------------------------------------------- html

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border-bottom:1px solid #ddd;padding:.25em .6em;text-align:right}
th:first-child,td:first-child,th:nth-child(2),td:nth-child(2){text-align:left}
.paper{color:#777}.missing{color:#aaa}.note{font-size:.85em;color:#555;margin:.2em 0}
.banner{background:#fff3cd;border:1px solid #e0c36a;padding:.6em 1em;border-radius:4px}
img{max-width:100%}.clips{display:flex;flex-wrap:wrap;gap:1em}.clip{font-size:.8em}
"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}'>"


def render_html(
    P: Params,
    tables: dict[str, Table],
    figures: list[Path],
    groups: dict[str, list[Path]],
    out: Path,
) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>SaShiMi reproduction report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>SaShiMi reproduction: results</h1>",
        f"<p class='banner'><b>{e(scale_note(P))}</b></p>",
        "<p>Each cell reads <i>ours (paper)</i>. "
        + e(MISSING)
        + " = not computed yet; "
        + e(NOT_RUN)
        + " = not run by this pipeline; "
        + e(DAGGER)
        + " = published value recalled, not re-read from the paper.</p>",
    ]
    parts.append("<h2>Tables</h2>")
    parts += [to_html(tables[k], P) for k in TABLES if k in tables]
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [
            f"<figure>{_img(f)}<figcaption>{e(f.name)}</figcaption></figure>" for f in figures
        ]
    if groups:
        parts.append("<h2>Audio</h2>")
        for name, paths in groups.items():
            parts.append(f"<h4>{e(name)}</h4><div class='clips'>")
            for p in paths:
                rel = p.relative_to(out).as_posix()
                parts.append(
                    f"<div class='clip'><audio controls preload='none' src='{e(rel)}'></audio>"
                    f"<br>{e(p.name)}</div>"
                )
            parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- entry points


def make_report(
    P: Params, out: str | Path = "results", clips: int = 3, figures: bool = True
) -> dict:
    """Write tables, figures, audio and report.html under `out`. Returns what was written."""
    out = Path(out)
    ref = load_reference()
    results = {k: collect(r) for k, r in P.runs.items()}
    real = {s: _read_json(real_metrics_path(s)) for s in REAL_SPLITS}
    tables = build_tables(P, results, ref, real)
    written: dict[str, list[Path]] = {"tables": [], "figures": [], "audio": []}
    for key, t in tables.items():
        for fmt, render in (("md", to_markdown), ("csv", to_csv), ("tex", to_latex)):
            p = out / "tables" / f"{key}.{fmt}"
            with atomic_write(p, "w") as f:
                f.write(render(t, P))
            written["tables"].append(p)

    groups = copy_audio(P, {k: r for k, r in results.items() if r.run.table}, out, clips)
    written["audio"] = [p for ps in groups.values() for p in ps]
    figs: list[Path] = []
    if figures:
        fig_dir = out / "figures"
        for old in fig_dir.glob("*.png"):
            old.unlink()
        made = [
            fig_training_curves(P, results, fig_dir / "training_curves.png"),
            fig_nll_vs_params(P, results, ref, fig_dir / "nll_vs_params.png"),
            fig_speed(P, results, fig_dir / "speed.png"),
        ]
        for ds_key in sorted({r.dataset for r in P.runs.values() if r.table}):
            made.append(fig_spectrograms(P, groups, ds_key, fig_dir / f"spectrograms_{ds_key}.png"))
        figs = [p for p in made if p is not None]
    written["figures"] = figs
    report = out / "report.html"
    with atomic_write(report, "w") as f:
        f.write(render_html(P, tables, figs, groups, out))
    written["html"] = [report]
    return written


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", default="results", help="folder for tables/, figures/, audio/, report.html"
    )
    p.add_argument(
        "--clips", type=int, default=3, help="real and generated clips per run in report.html"
    )
    p.add_argument("--no-figures", action="store_true", help="tables and report.html only")


def run(args: argparse.Namespace) -> int:
    P = load_params(args.params, check_models=False)
    if args.clips < 0:
        raise UserError(f"--clips: {args.clips} is negative")
    written = make_report(P, args.out, clips=args.clips, figures=not args.no_figures)
    done = sum(collect(r).finished for r in P.runs.values())
    print(
        f"report ({P.scale} scale): {done}/{len(P.runs)} runs finished; "
        f"{len(written['tables'])} table files, {len(written['figures'])} figures, "
        f"{len(written['audio'])} clips -> {Path(args.out) / 'report.html'}"
    )
    return 0


__all__ = [
    "make_report",
    "build_tables",
    "load_reference",
    "match_paper_row",
    "Cell",
    "Table",
    "TABLES",
    "FORMATS",
    "MISSING",
    "NOT_RUN",
    "DAGGER",
    "table_paths",
    "real_metrics_path",
    "configure_parser",
    "run",
]
