"""`sashimi report`: write every table (Markdown, CSV, LaTeX), the figures, a few audio clips
and report.html under results/.

Reads params.yaml, each run's `results/runs/<run>/`, the real-data SC09 rows
(`results/runs/real-<split>/metrics.json`), the released samples scored here
(`results/release/sc09/<folder>/metrics.json`) and the published numbers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sashimi.config import Params, load_params
from sashimi.errors import UserError
from sashimi.io import atomic_write
from sashimi.report import figures as F
from sashimi.report.html import render_html
from sashimi.report.mos import mos_report_table, write_listening_page
from sashimi.report.reference import load_reference
from sashimi.report.registry import REAL_SPLITS, real_metrics_path
from sashimi.report.release import read_release_metrics, release_table
from sashimi.report.render import to_csv, to_latex, to_markdown
from sashimi.report.results import collect, read_json
from sashimi.report.tables import Table, build_tables
from sashimi.speed import write_speed_table
from sashimi.stability import write_stability_table


def all_tables(P: Params, results: dict) -> dict[str, Table]:
    """Every table of the report, from what results/ holds now (`results`: collect per run)."""
    ref = load_reference()
    real = {s: read_json(real_metrics_path(s)) for s in REAL_SPLITS}
    tables = build_tables(P, results, ref, real)
    tables["sc09_release"] = release_table(P, ref, read_release_metrics(P))
    return tables


def _figures(P: Params, results: dict, groups: dict, fig_dir: Path) -> list[Path]:
    for old in fig_dir.glob("*.png"):
        old.unlink()
    made = [
        F.fig_training_curves(P, results, fig_dir / "training_curves.png"),
        F.fig_nll_vs_params(P, results, load_reference(), fig_dir / "nll_vs_params.png"),
        F.fig_speed(P, results, fig_dir / "speed.png"),
    ]
    for ds_key in sorted({r.dataset for r in P.runs.values() if r.table}):
        made.append(F.fig_spectrograms(P, groups, ds_key, fig_dir / f"spectrograms_{ds_key}.png"))
    return [p for p in made if p is not None]


def make_report(
    P: Params,
    out: str | Path = "results",
    clips: int = 3,
    figures: bool = True,
    ratings: list[Path] | None = None,
) -> dict:
    """Write tables, figures, audio, report.html and the listening page under `out` (and the
    MOS table when rating files are given). Returns what was written."""
    out = Path(out)
    results = {k: collect(r) for k, r in P.runs.items()}
    tables = all_tables(P, results)
    if ratings:
        tables["mos"] = mos_report_table(P, ratings, out)
    written: dict[str, list[Path]] = {"tables": [], "figures": [], "audio": []}
    for key, t in tables.items():
        for fmt, render in (("md", to_markdown), ("csv", to_csv), ("tex", to_latex)):
            p = out / "tables" / f"{key}.{fmt}"
            with atomic_write(p, "w") as f:
                f.write(render(t, P))
            written["tables"].append(p)
    groups = F.copy_audio(P, {k: r for k, r in results.items() if r.run.table}, out, clips)
    written["audio"] = [p for ps in groups.values() for p in ps]
    written["listening"] = write_listening_page(P, groups, out)
    written["figures"] = _figures(P, results, groups, out / "figures") if figures else []
    measured = []  # tables of this machine's own measurements: speed, stability
    for write in (write_speed_table, write_stability_table):
        paths = write(out)
        written["tables"] += [p for p in paths if p.suffix != ".png"]
        written["figures"] += [p for p in paths if p.suffix == ".png"]
        measured += [p for p in paths if p.suffix == ".csv"]
    report = out / "report.html"
    with atomic_write(report, "w") as f:
        f.write(render_html(P, tables, written["figures"], groups, out, measured))
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
    p.add_argument(
        "--ratings",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="rating CSVs exported by listening_test.html: adds the MOS table",
    )


def run(args: argparse.Namespace) -> int:
    P = load_params(args.params, check_models=False)
    if args.clips < 0:
        raise UserError(f"--clips: {args.clips} is negative")
    written = make_report(
        P, args.out, clips=args.clips, figures=not args.no_figures, ratings=args.ratings
    )
    done = sum(collect(r).finished for r in P.runs.values())
    print(
        f"report ({P.scale} scale): {done}/{len(P.runs)} runs finished; "
        f"{len(written['tables'])} table files, {len(written['figures'])} figures, "
        f"{len(written['audio'])} clips -> {Path(args.out) / 'report.html'}"
    )
    return 0
