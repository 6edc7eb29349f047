"""The paper's tables from params.yaml's runs, the runs table, and the notes under them.

A run is placed on the paper row it reproduces by its `table` and `label` in params.yaml.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sashimi.config import Params, RunConfig
from sashimi.report.cells import DAGGER, MISSING, NOT_RUN, Cell, Heading, Row, Table, fmt, num
from sashimi.report.reference import NAMES, match_paper_row, paper_cell, paper_label
from sashimi.report.registry import REAL_SPLITS
from sashimi.report.results import RunResult

REAL_LABELS = {"train": ("Train set", "train-set"), "test": ("Test set", "test-set")}
LATER_HEADING = "later work on this benchmark"
CLASSIFIER_HEADER = "Classifier"
CLASSIFIER_NOTE = (
    "Classifier column: the digit classifier behind FID/IS/mIS/AM. "
    "ours = classifier: ours (trained here), the classifier-sc09 run; "
    "released = classifier: released (krandiash/sashimi-release resnext.pth), the authors' "
    "classifier behind every published number. Which one scores is params.yaml's "
    "`eval.sc09_classifier`."
)


@dataclass(frozen=True)
class Metric:
    header: str
    key: str  # reference-file key
    ours: Callable[[RunResult], float | None]
    digits: int = 3
    applies: Callable[[RunConfig], bool] = lambda run: True  # False: "n/a" for this run


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


def classifier_of(metrics: dict, released_path: str | None = None) -> str:
    """'ours' / 'released' / 'other' for metrics.json with SC09 scores, '' without.

    evaluate writes `sc09_classifier_source`; older files only name the checkpoint path."""
    if num(metrics.get("fid")) is None:
        return ""
    source = metrics.get("sc09_classifier_source")
    if source:
        return str(source)
    path = str(metrics.get("sc09_classifier", ""))
    if path and (path == released_path or Path(path).name == "resnext.pth"):
        return "released"
    return "ours" if path else ""


def _released_path(P: Params) -> str | None:
    return (P.raw.get("eval") or {}).get("released_classifier")


def paper_table(
    P: Params,
    results: dict[str, RunResult],
    ref: dict,
    key: str,
    title: str,
    metrics: list[Metric],
    extra_rows: Iterable[Row] = (),
    descriptor: tuple[str, Callable[[dict | None], str]] | None = None,
    classifier: bool = False,
) -> Table:
    """Rows in the paper's order (with the matching run's numbers), then our runs the paper
    lacks. `classifier`: a last column naming the classifier behind each run's SC09 scores."""
    section = ref.get(key, {})
    paper_rows = list(section.get("rows", []))
    matched: dict[int, RunConfig] = {}
    unmatched: list[RunConfig] = []
    for r in (r for r in P.runs.values() if r.table == key):
        name = r.model_name if r.model_name != "diffwave" else r.model.get("backbone", "")
        row = match_paper_row(r.label, name, paper_rows)
        if row is not None and id(row) not in matched:
            matched[id(row)] = r
        else:
            unmatched.append(r)
    headers = ["Model", "Run"] + ([descriptor[0]] if descriptor else [])
    headers += [m.header for m in metrics] + ([CLASSIFIER_HEADER] if classifier else [])
    released = _released_path(P)

    def line(label: str, run: RunConfig | None, prow: dict | None) -> Row:
        res = results.get(run.key) if run else None
        cells: Row = [label, run.key if run else ""]
        if descriptor:
            cells.append(descriptor[1](prow))
        for m in metrics:
            ours = m.ours(res) if res is not None else None
            applicable = run is not None and m.applies(run)
            cells.append(paper_cell(section, prow, m.key, ours, m.digits, applicable=applicable))
        if classifier:
            cells.append((classifier_of(res.metrics, released) or MISSING) if res else "")
        return cells

    rows: list[Row] = []
    for prow in paper_rows:
        if prow.get("model") in ("train-set", "test-set"):
            continue  # the real-data rows come last (extra_rows)
        run = matched.get(id(prow))
        rows.append(line(run.label if run and run.label else paper_label(prow), run, prow))
    for run in unmatched:
        rows.append(line(run.label or run.key, run, None))
    rows.extend(extra_rows)
    return Table(key=key, title=title, headers=headers, rows=rows)


def _real_rows(P: Params, section: dict, real: dict[str, dict]) -> list[Row]:
    """The SC09 table's Train / Test set rows: real clips scored like generated ones."""
    rows = []
    for split in REAL_SPLITS:
        label, model = REAL_LABELS[split]
        prow = next((r for r in section.get("rows", []) if r.get("model") == model), None)
        m = real.get(split, {})
        cells: Row = [label, f"real: {split} split"]
        for metric in [PARAMS, NLL, *SC09_METRICS]:
            applicable = metric not in (PARAMS, NLL)
            ours = num(m.get(metric.key)) if applicable else None
            cell = paper_cell(section, prow, metric.key, ours, metric.digits, applicable)
            if not applicable and cell.paper is None:
                cell = Cell(ours=None, applicable=False, digits=metric.digits)
            cells.append(cell)
        cells.append(classifier_of(m, _released_path(P)) or MISSING)
        rows.append(cells)
    return rows


def later_rows(section: dict, metrics: list[Metric], classifier: bool = True) -> list[Row]:
    """The reference file's `later:` results on the same benchmark, under their own heading:
    published numbers only (the Run column names the source)."""
    later = section.get("later") or []
    if not later:
        return []
    rows: list[Row] = [[Heading(LATER_HEADING)]]
    for row in later:
        cells: Row = [NAMES.get(row.get("model"), str(row.get("model"))), row.get("source", "")]
        for m in metrics:
            cells.append(Cell(paper=num(row.get(m.key)), digits=m.digits, applicable=False))
        rows.append(cells + ([""] if classifier else []))
    return rows


def build_tables(
    P: Params, results: dict[str, RunResult], ref: dict, real: dict[str, dict] | None = None
) -> dict[str, Table]:
    """Every table but the released-samples one (see sashimi.report.release)."""
    tables: dict[str, Table] = {}
    tables["beethoven"] = paper_table(
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
    tables["youtubemix"] = _youtubemix(P, results, ref)
    tables["sc09"] = _sc09(P, results, ref, real or {})
    t = paper_table(
        P,
        results,
        ref,
        "sc09_diffwave_ablation",
        "SC09 DiffWave backbone ablation (unconditional, paper: 500k steps)",
        [PARAMS, *SC09_METRICS],
        classifier=True,
    )
    t.notes.append(
        "The full-size WaveNet and SaShiMi backbones are not trained again for this table: "
        "this pipeline's full-size DiffWave runs are the SC09 table's rows (their own step counts)."
    )
    t.notes.append(CLASSIFIER_NOTE)
    tables["sc09_diffwave_ablation"] = t
    tables["runs"] = runs_table(P, results)
    return tables


def _youtubemix(P: Params, results: dict[str, RunResult], ref: dict) -> Table:
    speed = [
        Metric("Train s/step", "-", _metric("train_seconds_per_step"), 3),
        Metric("Train tokens/s", "-", _metric("tokens_per_s"), 0),
        Metric("Sampling × real time", "-", _metric("sample_realtime_factor"), 3),
    ]
    t = paper_table(
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
    return t


def _sc09(P: Params, results: dict[str, RunResult], ref: dict, real: dict[str, dict]) -> Table:
    section = ref.get("sc09", {})
    metrics = [PARAMS, NLL, *SC09_METRICS]
    t = paper_table(
        P,
        results,
        ref,
        "sc09",
        "SC09 (1 s spoken digits): NLL and automatic metrics (FID, IS, mIS, AM)",
        metrics,
        extra_rows=_real_rows(P, section, real) + later_rows(section, metrics),
        classifier=True,
    )
    t.notes.append(
        "IS is the paper-compatible variant (see `sashimi.metrics.inception_score`); "
        "autoregressive models are scored on the paper's likelihood-trimmed half of their "
        "samples, diffusion models on all. Train/Test set rows score real clips."
    )
    if section.get("later"):
        t.notes.append(
            f"Rows under '{LATER_HEADING}': published results on the same benchmark after the "
            "paper (the Run column names the source); the bar to beat, not paper rows."
        )
    t.notes.append(CLASSIFIER_NOTE)
    return t


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

    def f(v: float | None, digits: int) -> str:
        return MISSING if v is None else fmt(v, digits)

    rows: list[Row] = []
    for key, run in P.runs.items():
        res = results[key]
        ckpts = run.run_dir / "checkpoints"
        trained = ckpts.is_dir() and any(ckpts.glob("*.pt"))
        if res.finished or (run.kind == "classifier" and (ckpts / "best.pt").is_file()):
            status = "done"
        else:
            status = "trained" if trained else "missing"
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


def footnotes(table: Table, P: Params) -> list[str]:
    """The scale note first, then the legend, the dagger note and the table's own notes."""
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
