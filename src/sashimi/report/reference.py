"""The published numbers (package data `sashimi/reference/paper_results.yaml`) and which of
their rows a run of ours reproduces."""

from __future__ import annotations

import importlib.resources
import re

import yaml

from sashimi.report.cells import Cell, num

NAMES = {
    "sashimi": "SaShiMi",
    "sashimi-unet": "SaShiMi U-Net",
    "wavenet": "WaveNet",
    "samplernn": "SampleRNN",
    "diffwave": "DiffWave",
    "wavegan": "WaveGAN",
    "mamba": "Mamba",
    "train-set": "Train set",
    "test-set": "Test set",
}


def load_reference() -> dict:
    """The published numbers (package data; a copy of ../shared/reference/paper_results.yaml)."""
    text = importlib.resources.files("sashimi").joinpath("reference/paper_results.yaml").read_text()
    return yaml.safe_load(text)


def _norm(s: str | None) -> str:
    return re.sub(r"[^a-z0-9]", "", (s or "").lower())


def paper_label(row: dict) -> str:
    """'SampleRNN 3-tier', 'DiffWave (SaShiMi)', 'SaShiMi small' ... from a reference row."""
    model = row.get("model")
    parts = [NAMES.get(model, model)] if model else []
    if row.get("backbone"):
        bb = NAMES.get(row["backbone"], row["backbone"])
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
        if key and _norm(paper_label(row)) == key:
            return row
    same = [
        r
        for r in rows
        if r.get("model", r.get("backbone")) == model_name
        and r.get("variant") in (None, "replication")
    ]
    return same[0] if len(same) == 1 else None


def is_confirmed(section: dict, row: dict, metric: str) -> bool:
    return section.get("status") == "confirmed" or metric in (row.get("confirmed") or [])


def paper_cell(
    section: dict,
    row: dict | None,
    metric: str,
    ours: float | None,
    digits: int,
    applicable: bool = True,
) -> Cell:
    """Our value beside the published one of `row` (daggered unless confirmed)."""
    paper = num(row.get(metric)) if row else None
    recalled = paper is not None and not is_confirmed(section, row, metric)
    return Cell(ours=ours, paper=paper, recalled=recalled, digits=digits, applicable=applicable)
