"""report.html: every table, the figures embedded as PNG data, and audio players for the
clips under results/audio/ (relative paths, so the folder can be moved as a whole)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from sashimi.config import Params
from sashimi.report.cells import DAGGER, MISSING, NOT_RUN, Table
from sashimi.report.registry import TABLES
from sashimi.report.render import to_html
from sashimi.report.tables import scale_note

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border-bottom:1px solid #ddd;padding:.25em .6em;text-align:right}
th:first-child,td:first-child,th:nth-child(2),td:nth-child(2){text-align:left}
tr.section th{text-align:left;font-style:italic;font-weight:normal;padding-top:.8em}
.paper{color:#777}.missing{color:#aaa}.note{font-size:.85em;color:#555;margin:.2em 0}
.banner{background:#fff3cd;border:1px solid #e0c36a;padding:.6em 1em;border-radius:4px}
img{max-width:100%}.clips{display:flex;flex-wrap:wrap;gap:1em}.clip{font-size:.8em}
"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}'>"


def _audio(groups: dict[str, list[Path]], out: Path) -> list[str]:
    e = html.escape
    parts = ["<h2>Audio</h2>"]
    for name, paths in groups.items():
        parts.append(f"<h4>{e(name)}</h4><div class='clips'>")
        for p in paths:
            rel = p.relative_to(out).as_posix()
            parts.append(
                f"<div class='clip'><audio controls preload='none' src='{e(rel)}'></audio>"
                f"<br>{e(p.name)}</div>"
            )
        parts.append("</div>")
    return parts


def _csv_table(csv: Path) -> str:
    """A table written as CSV by its own module (speed, stability), titled by its .md."""
    import pandas as pd

    md = csv.with_suffix(".md")
    title = md.read_text().splitlines()[0].lstrip("# ") if md.is_file() else csv.stem
    body = pd.read_csv(csv).to_html(index=False, na_rep=MISSING, border=0)
    return f"<h3>{html.escape(title)}</h3>{body}"


def render_html(
    P: Params,
    tables: dict[str, Table],
    figures: list[Path],
    groups: dict[str, list[Path]],
    out: Path,
    measured: list[Path] = (),
) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>SaShiMi reproduction report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>SaShiMi reproduction: results</h1>",
        f"<p class='banner'><b>{e(scale_note(P))}</b></p>",
        f"<p>Each cell reads <i>ours (paper)</i>. {e(MISSING)} = not computed yet; "
        f"{e(NOT_RUN)} = not run by this pipeline; {e(DAGGER)} = published value recalled, "
        "not re-read from the paper.</p>",
        "<h2>Tables</h2>",
    ]
    order = [k for k in TABLES if k in tables] + [k for k in tables if k not in TABLES]
    parts += [to_html(tables[k], P) for k in order]
    parts += [_csv_table(p) for p in measured]
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [
            f"<figure>{_img(f)}<figcaption>{e(f.name)}</figcaption></figure>" for f in figures
        ]
    if groups:
        parts += _audio(groups, out)
    if (out / "listening_test.html").is_file():
        parts.append(
            "<h2>Listening test</h2><p><a href='listening_test.html'>listening_test.html</a>: "
            "the blinded MOS page (rate, export the CSV, then <code>sashimi report --ratings "
            "FILE...</code> adds the MOS table).</p>"
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
