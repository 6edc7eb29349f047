"""The "released samples, scored here" table: the authors' generated SC09 clips
(krandiash/sashimi-release `samples/sc09/<folder>/`), scored by `sashimi evaluate --release`
with the released classifier, beside the numbers the paper published for the same models.

params.yaml `eval.released_models` maps each release folder to the paper row it produced.
"""

from __future__ import annotations

from sashimi.config import Params
from sashimi.report.cells import MISSING, Row, Table, fmt, num
from sashimi.report.reference import match_paper_row, paper_cell
from sashimi.report.registry import release_metrics_path
from sashimi.report.results import read_json
from sashimi.report.tables import CLASSIFIER_HEADER, CLASSIFIER_NOTE, SC09_METRICS, classifier_of

KEY = "sc09_release"
SELECTIONS = {
    "loglik": "trimmed by log-likelihood",
    "likelihood-order": "trimmed by file order (= likelihood order)",
    "all": "all clips, no trimming",
}


def release_models(P: Params) -> dict[str, dict]:
    """{release folder: {table, label, sorted_by_likelihood}} from params.yaml `eval`."""
    return dict((P.raw.get("eval") or {}).get("released_models") or {})


def read_release_metrics(P: Params) -> dict[str, dict]:
    return {m: read_json(release_metrics_path(m)) for m in release_models(P)}


def _clips(m: dict) -> str:
    n, total = num(m.get("n_scored")), num(m.get("n_generated"))
    if n is None:
        return MISSING
    return fmt(n, 0) if total is None else f"{fmt(n, 0)} of {fmt(total, 0)}"


def _label(spec: dict, folder: str) -> str:
    label = spec.get("label") or folder
    if spec.get("table") == "sc09_diffwave_ablation":
        return f"DiffWave ({label}), ablation"
    return label


def release_table(P: Params, ref: dict, scored: dict[str, dict]) -> Table:
    """One row per released SC09 model: our FID/IS/mIS/AM (paper), `—` where not scored."""
    ev = P.raw.get("eval") or {}
    headers = ["Model", "Release folder"] + [m.header for m in SC09_METRICS]
    headers += ["Clips scored", "Selection", CLASSIFIER_HEADER]
    rows: list[Row] = []
    for folder, spec in release_models(P).items():
        section = ref.get(spec.get("table", "sc09"), {})
        prow = match_paper_row(spec.get("label"), "", section.get("rows", []))
        m = scored.get(folder, {})
        cells: Row = [_label(spec, folder), f"samples/sc09/{folder}"]
        for metric in SC09_METRICS:
            cells.append(paper_cell(section, prow, metric.key, num(m.get(metric.key)), 2))
        cells.append(_clips(m))
        cells.append(SELECTIONS.get(m.get("selection"), "") if m else "")
        cells.append(classifier_of(m, ev.get("released_classifier")) or MISSING)
        rows.append(cells)
    t = Table(
        key=KEY,
        title="Released samples, scored here: the authors' SC09 clips, FID / IS / mIS / AM",
        headers=headers,
        rows=rows,
    )
    t.notes += [
        "Clips: krandiash/sashimi-release `samples/sc09/<folder>/`, put under "
        f"`{ev.get('released_samples', 'data/raw/release/samples/sc09')}`; scored by "
        "`sashimi evaluate --release <folder>` with the classifier at "
        f"`{ev.get('released_classifier', '?')}`, against the TRAIN split of the "
        f"`{ev.get('reference', 'sc09')}` dataset prepared at this scale (at demo scale: "
        "synthetic digits, so the scores are not comparable). Published values: the paper row "
        "each folder produced.",
        "Selection: the release carries no log-likelihood values. The authors' generation "
        "script names the autoregressive clips in increasing log-likelihood order "
        "(`..._gen_1.wav` lowest), so for those folders the protocol's trim (held-out half, "
        "drop the bottom 40% and top 5%) is applied by that rank; a folder whose names are not "
        "such a sequence, and every diffusion / GAN folder, is scored whole.",
        CLASSIFIER_NOTE,
    ]
    return t
