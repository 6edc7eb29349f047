"""results/tables/rehearsal.{csv,md}: one row per paper run of `sashimi rehearse`.

Columns: parameters, status (ok, or the phase that failed with a one-line reason), seconds per
step here and scaled to the paper batch, peak RSS per phase, the run's step budget and the
projected GPU hours. The csv holds every field; --keep reads back the rows of runs that passed.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from sashimi.io import atomic_write

TABLE = Path("results/tables/rehearsal")

FIELDS = (
    "run", "kind", "model", "params", "status", "paper_batch", "rehearsed_batch", "length",
    "train_s_per_step", "train_s_per_step_paper_batch", "train_peak_rss_mb",
    "train_peak_rss_mb_paper_batch", "sample_shape", "sample_s_per_step", "sample_peak_rss_mb",
    "eval_peak_rss_mb", "eval", "budget_steps", "budget_source", "gpu_s_per_step", "gpu_source",
    "projected_gpu_hours", "wall_s",
)  # fmt: skip


def write_table(rows: list[dict], header: list[str], base: Path = TABLE) -> tuple[Path, Path]:
    """results/tables/rehearsal.csv (every field) and .md (the header lines, then a table)."""
    csv_path, md_path = base.with_suffix(".csv"), base.with_suffix(".md")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(csv_path, "w") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows({k: _cell(r.get(k)) for k in FIELDS} for r in rows)
    cols = [
        ("run", "run"), ("params", "params"), ("status", "status"),
        ("batch (paper/here) x length", None), ("train s/step here", "train_s_per_step"),
        ("train s/step, paper batch", "train_s_per_step_paper_batch"),
        ("train peak RSS MB (paper batch)", None), ("sampling", "sample_shape"),
        ("sample s/step", "sample_s_per_step"), ("sample peak RSS MB", "sample_peak_rss_mb"),
        ("eval peak RSS MB", "eval_peak_rss_mb"), ("budget steps", "budget_steps"),
        ("GPU s/step", "gpu_s_per_step"), ("GPU source", "gpu_source"),
        ("projected GPU h", "projected_gpu_hours"),
    ]  # fmt: skip
    lines = [*header, "", "| " + " | ".join(c for c, _ in cols) + " |",
             "|" + "---|" * len(cols)]  # fmt: skip
    for r in rows:
        cells = []
        for title, key in cols:
            if title.startswith("batch"):
                cells.append(
                    f"{r.get('paper_batch')}/{r.get('rehearsed_batch')} x {r.get('length')}"
                )
            elif title.startswith("train peak"):
                here, scaled = r.get("train_peak_rss_mb"), r.get("train_peak_rss_mb_paper_batch")
                cells.append(
                    _cell(here) + ("" if scaled in (None, here) else f" ({_cell(scaled)})")
                )
            else:
                cells.append(_cell(r.get(key)))
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    with atomic_write(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path, md_path


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def passed_rows(path: Path) -> dict[str, dict]:
    """The rows of an earlier table whose run passed (--keep continues a rehearsal)."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = [{k: (None if v == "" else v) for k, v in r.items()} for r in csv.DictReader(f)]
    return {r["run"]: r for r in rows if r.get("status") == "ok"}
