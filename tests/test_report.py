"""`sashimi report`: tables beside the paper's numbers, missing runs as em dashes, recalled values
marked, three formats, and a report.html whose every local reference exists."""

from __future__ import annotations

import csv
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from sashimi import report as R
from sashimi.cli import main
from sashimi.config import ROOT, load_params
from sashimi.io import write_json, write_wav

PARAMS = ROOT / "params.yaml"


def _row(md: str, run_key: str, col: int = 1) -> list[str]:
    """The cells of the Markdown row whose column `col` (the Run column) is `run_key`."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > col and cells[col] == run_key:
            return cells
    raise AssertionError(f"no row for {run_key} in\n{md}")


def _fake_outputs(root: Path) -> None:
    """Finished sashimi-sc09 and diffwave-sashimi-sc09 runs, a real-train row, a prepared SC09
    test split; every other run is missing."""
    run = root / "results/runs/sashimi-sc09"
    write_json(
        run / "metrics.json",
        {
            "nll_bits": 2.5,
            "params": 1_234_567,
            "fid": 7.25,
            "is": 1.5,
            "mis": 2.0,
            "am": 1.25,
            "tokens_per_s": 900.0,
        },
    )
    write_json(run / "bench.json", {"sample_realtime_factor": 0.05})
    with open(run / "train_log.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "split", "loss", "bits_per_sample", "lr", "tokens_per_s", "elapsed_s"])
        for s in (5, 10, 15, 20):
            w.writerow([s, "train", 4.0 - s / 10, (4.0 - s / 10) / np.log(2), 1e-3, 800, s * 1.5])
        w.writerow([20, "validation", 3.0, 3.0 / np.log(2), 1e-3, "", 31.0])
    t = np.linspace(0, 1, 16000, endpoint=False)
    for i in range(4):
        write_wav(run / "samples" / f"{i:05d}.wav", 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t))
    diff = root / "results/runs/diffwave-sashimi-sc09"
    write_json(
        diff / "metrics.json", {"fid": 3.5, "is": 2.5, "mis": 4.0, "am": 1.0, "params": 50_000}
    )
    write_wav(diff / "samples" / "00000.wav", 0.1 * np.sin(2 * np.pi * 300 * t))
    write_json(
        root / "results/runs/real-train/metrics.json",
        {"fid": 0.01, "is": 9.0, "mis": 300.0, "am": 0.1},
    )
    prep = root / "data/prepared/sc09"
    prep.mkdir(parents=True)
    clips = [0.2 * np.sin(2 * np.pi * f * t).astype(np.float32) for f in (220, 330)]
    np.save(prep / "test.audio.npy", np.concatenate(clips))
    np.save(prep / "test.offsets.npy", np.array([0, 16000, 32000], dtype=np.int64))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    shutil.copy(PARAMS, root / "params.yaml")
    _fake_outputs(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["report", "--clips", "2"]) == 0
    return root


def test_every_table_in_three_formats(rendered: Path):
    for t in R.TABLES:
        for fmt in R.FORMATS:
            assert (rendered / "results/tables" / f"{t}.{fmt}").stat().st_size > 0, (t, fmt)
    tex = (rendered / "results/tables/sc09.tex").read_text()
    assert r"\begin{tabular}" in tex and r"\bottomrule" in tex
    assert "---" in tex and "—" not in tex  # em dash spelled the LaTeX way
    rows = list(csv.DictReader(io.StringIO((rendered / "results/tables/sc09.csv").read_text())))
    sashimi = next(r for r in rows if r["Run"] == "sashimi-sc09")
    assert sashimi["NLL (bits)"] == "2.500" and sashimi["NLL (bits) (paper)"] == "1.891"
    assert sashimi["scale"] == "demo"


def test_finished_run_beside_paper_and_missing_runs_are_dashes(rendered: Path):
    md = (rendered / "results/tables/sc09.md").read_text()
    row = _row(md, "sashimi-sc09")
    assert row[0] == "SaShiMi"
    assert row[2] == "1.23 (4.10)"  # params in millions, ours (paper)
    assert row[3] == "2.500 (1.891)"
    assert row[4] == "7.25 (1.99)"
    missing = _row(md, "wavenet-sc09")
    assert missing[3] == "— (1.925)" and missing[4] == "— (5.08)"
    # a missing run never shows a number of its own: every cell starts with the em dash
    for key in ("wavenet-sc09", "samplernn-sc09", "diffwave-wavenet-sc09"):
        for cell in _row(md, key)[2:]:
            assert cell.startswith("—") or cell.startswith(R.NOT_RUN), (key, cell)
    # diffusion runs have no NLL: "n/a", not missing
    assert _row(md, "diffwave-sashimi-sc09")[3] == "n/a"
    assert _row(md, "diffwave-sashimi-sc09")[4] == "3.50 (1.42)"
    # real rows: train present, test missing; the paper's numbers beside both
    assert _row(md, "real: train split")[4] == "0.01 (0.00)"
    assert _row(md, "real: test split")[4] == "— (0.02)"
    # a paper row this pipeline does not run
    assert "| WaveGAN |  | n/a (19.10) |" in md


def test_recalled_values_carry_a_dagger_and_footnote(rendered: Path):
    sc09 = (rendered / "results/tables/sc09.md").read_text()
    assert R.DAGGER not in sc09  # SC09 numbers are confirmed
    ym = (rendered / "results/tables/youtubemix.md").read_text()
    row = _row(ym, "sashimi-youtubemix")
    assert row[2] == f"— (4.05{R.DAGGER})"  # recalled
    assert row[3] == "— (1.294)"  # confirmed inside a recalled table
    assert f"{R.DAGGER} Published value recalled" in ym
    bee = (rendered / "results/tables/beethoven.md").read_text()
    assert f"— (0.946{R.DAGGER})" in _row(bee, "sashimi-beethoven")


def test_scale_and_budget_are_stated(rendered: Path):
    md = (rendered / "results/tables/sc09.md").read_text()
    assert "Demo scale" in md and "NOT comparable to the paper" in md
    runs = (rendered / "results/tables/runs.md").read_text()
    row = _row(runs, "sashimi-sc09", col=0)
    assert row[5] == "done"
    assert row[6] == "20" and row[7] == "0.5"  # steps, minutes from train_log.csv
    assert _row(runs, "wavenet-sc09", col=0)[5] == "missing"


def test_html_references_only_existing_files(rendered: Path):
    out = rendered / "results"
    text = (out / "report.html").read_text()
    refs = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", text)
    local = [r for r in refs if not r.startswith(("data:", "http:", "https:", "#"))]
    assert local, "expected audio players with relative paths"
    for r in local:
        assert not Path(r).is_absolute() and (out / r).is_file(), r
    assert "<audio" in text and "audio/sashimi-sc09/00000.wav" in text
    assert "audio/real-sc09/test-00.wav" in text
    assert text.count("data:image/png;base64,") >= 3  # curves, NLL vs params, spectrograms
    assert "Demo scale" in text
    figs = {p.name for p in (out / "figures").glob("*.png")}
    assert {
        "training_curves.png",
        "nll_vs_params.png",
        "spectrograms_sc09.png",
        "speed.png",
    } <= figs


def test_report_with_nothing_finished(tmp_path, monkeypatch):
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    P = load_params("params.yaml", check_models=False)
    written = R.make_report(P, "results", figures=True)
    assert not written["figures"] and not written["audio"]
    md = (tmp_path / "results/tables/sc09.md").read_text()
    assert "2.500" not in md and "— (1.891)" in md
    assert "<audio" not in (tmp_path / "results/report.html").read_text()


@pytest.mark.parametrize("scale", ["demo", "paper"])
def test_every_table_run_lands_on_a_paper_row(scale):
    """params.yaml labels place each run on the paper row it reproduces (no orphan rows)."""
    P = load_params(PARAMS, scale=scale, check_models=False)
    ref = R.load_reference()
    for run in P.runs.values():
        if not run.table:
            continue
        rows = ref[run.table]["rows"]
        name = run.model.get("backbone") if run.model_name == "diffwave" else run.model_name
        assert R.match_paper_row(run.label, name, rows) is not None, (run.key, run.label)


def test_package_reference_matches_the_shared_copy(shared_dir):
    """The package data is the shared reference file (plus `confirmed:` markers only)."""
    shared = yaml.safe_load((shared_dir / "reference/paper_results.yaml").read_text())
    ours = R.load_reference()
    for section in ours.values():
        for row in section.get("rows", []) if isinstance(section, dict) else []:
            row.pop("confirmed", None)
    assert ours == shared


def test_missing_is_never_a_number():
    c = R.Cell(ours=None, paper=1.5, recalled=True)
    assert c.text() == f"— (1.500{R.DAGGER})"
    assert R.Cell(ours=float("nan"), paper=None).text() == R.MISSING
    assert R.Cell(ours=0.0, paper=None).text() == "0.000"
    assert R.Cell(ours=None, applicable=False).text() == R.NOT_RUN
    assert R._num(float("inf")) is None and R._num("—") is None and R._num(True) is None


def test_speed_comes_from_metrics_bench_or_the_train_log(rendered, monkeypatch):
    monkeypatch.chdir(rendered)
    P = load_params("params.yaml", check_models=False)
    res = R.collect(P.run("sashimi-sc09"))
    assert res.get("train_seconds_per_step") == pytest.approx(1.5)  # train_log: 5 steps per 7.5 s
    assert res.get("tokens_per_s") == 900.0  # metrics.json beats the log's 800
    assert res.get("sample_realtime_factor") == 0.05  # bench.json
    assert R.collect(P.run("wavenet-sc09")).get("tokens_per_s") is None
