"""The report's human-evaluation pieces: the blinded listening page, and the MOS table from
the rating CSVs listeners send back (`sashimi report --ratings FILE...`)."""

from __future__ import annotations

from pathlib import Path

from sashimi.config import Params
from sashimi.listening import mos_table, plan, read_ratings, write_page
from sashimi.report.cells import MISSING, Table

PAGE = "listening_test.html"
KEY = "listening_test_key.csv"  # clip id -> model; never linked from the page


def _kind(P: Params, ds_key: str) -> str:
    """SC09-like whole clips are speech; chunked recordings are music."""
    return "speech" if P.datasets[ds_key].chunk_length is None else "music"


def write_listening_page(P: Params, groups: dict[str, list[Path]], out: Path) -> list[Path]:
    """results/listening_test.html (+ its key) from the report's real and generated clips."""
    clips: dict[tuple[str, str], list[Path]] = {}
    for group, paths in groups.items():
        if group.startswith("real-"):
            clips[(group.removeprefix("real-"), "real")] = paths
        elif group in P.runs:
            clips[(P.runs[group].dataset, group)] = paths
    if not clips:
        return []
    kinds = {ds: _kind(P, ds) for ds, _ in clips}
    write_page(plan(clips, seed=0), kinds, out / PAGE, out / KEY)
    return [out / PAGE, out / KEY]


def mos_report_table(P: Params, rating_files: list[Path], out: Path) -> Table:
    """MOS with 95% intervals per dataset, model and question; the paper's MOS stays out
    until confirmed (reference/paper_results.yaml has none)."""
    t = mos_table(read_ratings(rating_files, out / KEY))
    label = {k: r.label or k for k, r in P.runs.items()}
    rows = [
        [
            r.dataset,
            "Real data" if r.model == "real" else label.get(r.model, r.model),
            r.question,
            str(r.n),
            f"{r.mos:.2f}" + ("" if r.ci95 != r.ci95 else f" ± {r.ci95:.2f}"),
            MISSING,
        ]
        for r in t.itertuples()
    ]
    table = Table(
        key="mos",
        title="Mean opinion scores from the listening page (1-5, 95% confidence interval)",
        headers=["Dataset", "Model", "Question", "Ratings", "MOS", "Paper MOS"],
        rows=rows,
    )
    table.notes.append(
        f"From {len(rating_files)} rating file(s) exported by results/{PAGE}. Paper MOS: "
        f"{MISSING} until the published values are confirmed in reference/paper_results.yaml."
    )
    return table
