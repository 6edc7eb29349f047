"""Which tables `sashimi report` writes, and where the results it reads live.

The workflow's targets come from here. This module imports nothing but pathlib, so the
Snakefile reads it without importing the report (numpy, matplotlib, the config).
"""

from __future__ import annotations

from pathlib import Path

TABLES = ("beethoven", "youtubemix", "sc09", "sc09_diffwave_ablation", "sc09_release", "runs")
FORMATS = ("md", "csv", "tex")
REAL_SPLITS = ("train", "test")  # the SC09 table's real-data rows
RELEASE_DIR = Path("results/release/sc09")  # the authors' released clips, scored here


def table_paths(out: str | Path = "results") -> list[Path]:
    """Every table file `sashimi report` writes."""
    return [Path(out) / "tables" / f"{t}.{f}" for t in TABLES for f in FORMATS]


def real_metrics_path(split: str) -> Path:
    """Where `sashimi evaluate --real sc09 --split SPLIT` writes the real-data SC09 metrics."""
    return Path("results/runs") / f"real-{split}" / "metrics.json"


def release_metrics_path(model: str) -> Path:
    """Where `sashimi evaluate --release MODEL` writes the metrics of one released folder."""
    return RELEASE_DIR / model / "metrics.json"
