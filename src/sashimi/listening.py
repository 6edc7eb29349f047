"""The paper's human evaluation (MOS), as a self-contained listening page and its aggregation.

`write_page` puts real and generated clips on one HTML page, shuffled and blinded: a clip is
shown under an opaque id, and the id -> model key goes to a separate CSV that the page never
sees. Listeners rate each clip 1-5 on the paper's two questions (SC09: quality and
intelligibility; music: fidelity and musicality) and export their ratings to a CSV from the
browser (no server). `mos_table` turns rating CSVs into a mean opinion score with a 95%
confidence interval (Student t) per dataset, model and question.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from sashimi.errors import UserError
from sashimi.io import atomic_write

# The questions of the paper's MOS studies, per kind of dataset.
QUESTIONS = {
    "speech": ("quality", "intelligibility"),
    "music": ("fidelity", "musicality"),
}
RATING_FIELDS = ("rater", "clip", "question", "rating")
KEY_FIELDS = ("clip", "dataset", "model", "source")


def clip_id(path: Path, salt: str) -> str:
    """An opaque, stable id: reveals nothing about the model that made the clip."""
    return "c" + hashlib.sha256(f"{salt}:{path}".encode()).hexdigest()[:10]


def _data_uri(path: Path) -> str:
    return "data:audio/wav;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def plan(clips: Mapping[tuple[str, str], Sequence[Path]], seed: int = 0) -> list[dict[str, str]]:
    """Rows (clip, dataset, model, source) for {(dataset, model): wavs}, shuffled by `seed`.
    `model` is "real" for real recordings."""
    salt = str(seed)
    rows = [
        {"clip": clip_id(p, salt), "dataset": ds, "model": model, "source": str(p)}
        for (ds, model), paths in sorted(clips.items())
        for p in paths
    ]
    random.Random(seed).shuffle(rows)
    return rows


_SCRIPT = """
const QUESTIONS = %(questions)s;
function ratings() {
  const rows = [];
  for (const el of document.querySelectorAll('input[type=radio]:checked')) {
    rows.push([el.dataset.clip, el.dataset.question, el.value]);
  }
  return rows;
}
function exportRatings() {
  const rater = (document.getElementById('rater').value || 'anonymous').replace(/[^A-Za-z0-9_-]/g, '_');
  const lines = ['rater,clip,question,rating'];
  for (const [clip, q, v] of ratings()) lines.push([rater, clip, q, v].join(','));
  const text = lines.join('\\n') + '\\n';
  document.getElementById('csv').value = text;
  const total = document.querySelectorAll('.clip').length * 2;
  document.getElementById('progress').textContent = (lines.length - 1) + ' of ' + total + ' answered';
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([text], {type: 'text/csv'}));
  a.download = 'ratings-' + rater + '.csv';
  document.body.appendChild(a); a.click(); a.remove();
}
"""

_STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto}"
    ".clip{border:1px solid #ccc;padding:.5em;margin:.5em 0}"
    ".q{margin:.2em 0}label{margin-right:.8em}textarea{width:100%;height:8em}"
)


def _clip_html(row: Mapping[str, str], questions: Iterable[str], uri: str, k: int) -> str:
    cid = html.escape(row["clip"])
    parts = [f"<div class='clip' id='{cid}'><b>Clip {k}</b> <audio controls src='{uri}'></audio>"]
    for q in questions:
        radios = "".join(
            f"<label><input type='radio' name='{cid}-{q}' value='{v}' data-clip='{cid}' "
            f"data-question='{q}'>{v}</label>"
            for v in range(1, 6)
        )
        parts.append(f"<div class='q'>{q} (1 bad - 5 excellent): {radios}</div>")
    return "".join(parts) + "</div>"


def write_page(
    rows: Sequence[Mapping[str, str]],
    kinds: Mapping[str, str],
    out_html: Path,
    key_csv: Path,
    title: str = "SaShiMi listening test",
) -> None:
    """The blinded page (`out_html`, audio embedded) and its key (`key_csv`).
    `kinds` maps a dataset to "speech" or "music" (which questions are asked)."""
    sections = []
    for ds in sorted({r["dataset"] for r in rows}):
        kind = kinds.get(ds)
        if kind not in QUESTIONS:
            raise UserError(f"listening test: dataset {ds!r} has no kind (speech or music)")
        mine = [r for r in rows if r["dataset"] == ds]
        clips = "".join(
            _clip_html(r, QUESTIONS[kind], _data_uri(Path(r["source"])), k + 1)
            for k, r in enumerate(mine)
        )
        sections.append(f"<h2>{html.escape(ds)}</h2>{clips}")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        "<p>Listen to each clip and rate it from 1 (bad) to 5 (excellent). Clips are shuffled "
        "and their source is hidden. When done, press Export: a CSV of your ratings is saved "
        "(and shown below); send it to the organiser.</p>"
        "<p>Your name or id: <input id='rater' value=''></p>"
        + "".join(sections)
        + "<p><button id='export' onclick='exportRatings()'>Export ratings</button> "
        "<span id='progress'></span></p><textarea id='csv' readonly></textarea>"
        f"<script>{_SCRIPT % {'questions': json.dumps(QUESTIONS)}}</script></body></html>"
    )
    with atomic_write(out_html, "w") as f:
        f.write(page)
    with atomic_write(key_csv, "w") as f:
        w = csv.DictWriter(f, fieldnames=KEY_FIELDS)
        w.writeheader()
        w.writerows({k: r[k] for k in KEY_FIELDS} for r in rows)


def _read_csv(path: Path, fields: Sequence[str]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise UserError(f"{path}: cannot read ({str(e).splitlines()[0][:120]})") from None
    missing = [f for f in fields if f not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column {missing[0]!r} (needs {', '.join(fields)})")
    return df


def read_ratings(paths: Sequence[Path], key_csv: Path) -> pd.DataFrame:
    """Every rating joined with the key: columns rater, clip, question, rating, dataset, model."""
    key = _read_csv(key_csv, KEY_FIELDS)
    frames = []
    for p in paths:
        df = _read_csv(Path(p), RATING_FIELDS)
        r = pd.to_numeric(df["rating"], errors="coerce")
        bad = df.index[~r.isin([1, 2, 3, 4, 5])]
        if len(bad):
            raise UserError(f"{p}: rating {df['rating'][bad[0]]!r} is not 1-5")
        unknown = set(df["clip"]) - set(key["clip"])
        if unknown:
            raise UserError(f"{p}: clip {sorted(unknown)[0]!r} is not in {key_csv}")
        frames.append(df.assign(rating=r.astype(int)))
    if not frames:
        raise UserError("--ratings: no rating files given")
    return pd.concat(frames).merge(key[["clip", "dataset", "model"]], on="clip")


def mos_table(ratings: pd.DataFrame) -> pd.DataFrame:
    """MOS and the half-width of its 95% confidence interval per (dataset, model, question)."""
    rows = []
    for (ds, model, q), g in ratings.groupby(["dataset", "model", "question"]):
        x = g["rating"].to_numpy(float)
        n = len(x)
        half = float(stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan
        rows.append(
            {"dataset": ds, "model": model, "question": q, "n": n, "mos": x.mean(), "ci95": half}
        )
    return pd.DataFrame(rows)
