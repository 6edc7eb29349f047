"""`sashimi report`: tables beside the paper's numbers, missing runs as em dashes, recalled values
marked, three formats, and a report.html whose every local reference exists."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT  # tests/ is on sys.path
from sashimi.cli import main
from sashimi.config import load_params
from sashimi.io import write_json, write_wav
from sashimi.report import cells, reference, registry, results
from sashimi.report.main import make_report

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
    for t in registry.TABLES:
        for fmt in registry.FORMATS:
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
            assert cell.startswith("—") or cell.startswith(cells.NOT_RUN), (key, cell)
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
    assert cells.DAGGER not in sc09  # SC09 numbers are confirmed
    ym = (rendered / "results/tables/youtubemix.md").read_text()
    row = _row(ym, "sashimi-youtubemix")
    assert row[2] == f"— (4.05{cells.DAGGER})"  # recalled
    assert row[3] == "— (1.294)"  # confirmed inside a recalled table
    assert f"{cells.DAGGER} Published value recalled" in ym
    bee = (rendered / "results/tables/beethoven.md").read_text()
    assert f"— (0.946{cells.DAGGER})" in _row(bee, "sashimi-beethoven")


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
    written = make_report(P, "results", figures=True)
    assert not written["figures"] and not written["audio"]
    md = (tmp_path / "results/tables/sc09.md").read_text()
    assert "2.500" not in md and "— (1.891)" in md
    assert "<audio" not in (tmp_path / "results/report.html").read_text()


@pytest.mark.parametrize("scale", ["demo", "paper"])
def test_every_table_run_lands_on_a_paper_row(scale):
    """params.yaml labels place each run on the paper row it reproduces (no orphan rows)."""
    P = load_params(PARAMS, scale=scale, check_models=False)
    ref = reference.load_reference()
    for run in P.runs.values():
        if not run.table:
            continue
        rows = ref[run.table]["rows"]
        name = run.model.get("backbone") if run.model_name == "diffwave" else run.model_name
        assert reference.match_paper_row(run.label, name, rows) is not None, (run.key, run.label)


def test_package_reference_matches_the_shared_copy(shared_dir):
    """The package data is the shared reference file (plus `confirmed:` markers only)."""
    shared = yaml.safe_load((shared_dir / "reference/paper_results.yaml").read_text())
    ours = reference.load_reference()
    for section in ours.values():
        for row in section.get("rows", []) if isinstance(section, dict) else []:
            row.pop("confirmed", None)
    assert ours == shared


def test_missing_is_never_a_number():
    c = cells.Cell(ours=None, paper=1.5, recalled=True)
    assert c.text() == f"— (1.500{cells.DAGGER})"
    assert cells.Cell(ours=float("nan"), paper=None).text() == cells.MISSING
    assert cells.Cell(ours=0.0, paper=None).text() == "0.000"
    assert cells.Cell(ours=None, applicable=False).text() == cells.NOT_RUN
    assert cells.num(float("inf")) is None and cells.num("—") is None and cells.num(True) is None


def test_speed_comes_from_metrics_bench_or_the_train_log(rendered, monkeypatch):
    monkeypatch.chdir(rendered)
    P = load_params("params.yaml", check_models=False)
    res = results.collect(P.run("sashimi-sc09"))
    assert res.get("train_seconds_per_step") == pytest.approx(1.5)  # train_log: 5 steps per 7.5 s
    assert res.get("tokens_per_s") == 900.0  # metrics.json beats the log's 800
    assert res.get("sample_realtime_factor") == 0.05  # bench.json
    assert results.collect(P.run("wavenet-sc09")).get("tokens_per_s") is None


# ----------------------------------------------------------------------------- later rows


def test_sc09_later_rows_under_their_own_heading(rendered: Path):
    """The reference file's `later:` rows follow the paper's rows under a heading, published
    numbers only, in every format."""
    later = reference.load_reference()["sc09"]["later"]
    md = (rendered / "results/tables/sc09.md").read_text()
    lines = md.splitlines()
    head = next(i for i, ln in enumerate(lines) if "later work on this benchmark" in ln)
    assert head > next(i for i, ln in enumerate(lines) if "real: test split" in ln)
    rows = [ln for ln in lines[head + 1 :] if ln.startswith("| ")]
    assert len(rows) == len(later)
    header_cells = lines[4].count("|")
    assert lines[head].count("|") == header_cells  # the heading spans the table
    for ln, row in zip(rows, later):
        cells_ = [c.strip() for c in ln.strip().strip("|").split("|")]
        assert cells_[1] == row["source"]
        assert cells_[4] == f"n/a ({row['fid']:.2f})"  # FID: nothing of ours, the published value
    csv_rows = list(csv.DictReader(io.StringIO((rendered / "results/tables/sc09.csv").read_text())))
    tagged = [r for r in csv_rows if r["section"] == "later work on this benchmark"]
    assert [float(r["mIS ↑ (paper)"]) for r in tagged] == [row["mis"] for row in later]
    assert all(r["section"] == "" for r in csv_rows if r["Run"] == "sashimi-sc09")
    tex = (rendered / "results/tables/sc09.tex").read_text()
    assert r"\textit{later work on this benchmark}" in tex
    html_ = (rendered / "results/report.html").read_text()
    assert "<tr class='section'><th colspan='9'>later work on this benchmark</th></tr>" in html_


# ----------------------------------------------------------------------------- released samples


def _stand_in_classifier(path: Path) -> None:
    """Our tiny digit classifier in our own checkpoint format (stands in for resnext.pth)."""
    import torch

    from sashimi.classifier import DigitClassifier

    torch.manual_seed(0)
    clf = DigitClassifier(width=0.0625, depth=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"model": clf.state_dict(), "model_name": "resnext", "model_kwargs": clf.config}, path
    )


def _clip(k: int) -> np.ndarray:
    t = np.arange(16000) / 16000
    rng = np.random.default_rng(k)
    return 0.4 * np.sin(2 * np.pi * (150 + 60 * k) * t) + 0.05 * rng.standard_normal(16000)


@pytest.fixture(scope="module")
def release_root(tmp_path_factory) -> Path:
    """A project with two released folders present (12 autoregressive clips named in
    likelihood order, 6 diffusion clips), a stand-in released classifier and an SC09 train
    split to score against."""
    from test_train import make_prepared

    root = tmp_path_factory.mktemp("release")
    raw = yaml.safe_load(PARAMS.read_text())
    raw["eval"].update(released_classifier="standin/resnext.pt", released_samples="release/sc09")
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _stand_in_classifier(root / "standin/resnext.pt")
    make_prepared(root, key="sc09", splits={"train": 10})
    for i in range(1, 13):  # gen_1 has the lowest log-likelihood (official generate.py)
        name = f"unconditional_sc09_sashimi_len_1.00s_gen_{i}.wav"
        write_wav(root / "release/sc09/sashimi" / name, _clip(i))
    for i in range(6):
        write_wav(root / "release/sc09/2048-diffwave-1m" / f"{i}.wav", _clip(20 + i))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["evaluate", "--release", "sashimi", "--device", "cpu"]) == 0
        assert main(["evaluate", "--release", "2048-diffwave-1m", "--device", "cpu"]) == 0
        assert main(["report", "--no-figures", "--clips", "0"]) == 0
    return root


def test_released_folder_is_trimmed_by_file_order(release_root: Path):
    """12 clips -> held-out half of 6 -> drop the 2 least likely (40%) -> 4 scored; the
    numbers equal FID / AM computed directly on those 4 clips."""
    from sashimi import metrics
    from sashimi.classifier import load_classifier
    from sashimi.classifier_data import labelled_split, read_clips
    from sashimi.sc09_scoring import classify

    m = json.loads((release_root / "results/release/sc09/sashimi/metrics.json").read_text())
    assert m["selection"] == "likelihood-order" and m["trimming"].startswith("applied by rank")
    assert (m["n_scored"], m["n_generated"], m["untrimmed"]["n_scored"]) == (4, 12, 12)
    assert m["sc09_classifier_source"] == "released"
    keep = metrics.select_paper_subset(np.arange(12.0), seed=0)
    folder = release_root / "release/sc09/sashimi"
    wavs = [folder / f"unconditional_sc09_sashimi_len_1.00s_gen_{i + 1}.wav" for i in keep]
    clf = load_classifier(release_root / "standin/resnext.pt")
    feats, probs = classify(clf, read_clips(wavs))
    ref_feats, ref_probs = classify(
        clf, labelled_split(release_root / "data/prepared/sc09", "train")
    )
    assert m["fid"] == pytest.approx(metrics.fid(feats, ref_feats), rel=1e-6)
    assert m["am"] == pytest.approx(metrics.am_score(ref_probs, probs), rel=1e-6)
    d = json.loads(
        (release_root / "results/release/sc09/2048-diffwave-1m/metrics.json").read_text()
    )
    assert d["selection"] == "all" and d["n_scored"] == d["n_generated"] == 6
    assert d["trimming"].startswith("not applied") and "untrimmed" not in d


def test_released_samples_table(release_root: Path):
    md = (release_root / "results/tables/sc09_release.md").read_text()
    m = json.loads((release_root / "results/release/sc09/sashimi/metrics.json").read_text())
    row = _row(md, "samples/sc09/sashimi")
    assert row[0] == "SaShiMi"
    assert row[2:6] == [
        f"{m['fid']:.2f} (1.99)",
        f"{m['is']:.2f} (4.12)",
        f"{m['mis']:.2f} (24.57)",
        f"{m['am']:.2f} (0.90)",
    ]
    assert row[6] == "4 of 12" and "file order" in row[7] and row[8] == "released"
    diff = _row(md, "samples/sc09/2048-diffwave-1m")
    assert diff[0] == "DiffWave (WaveNet)" and diff[2].endswith("(1.92)")
    assert diff[6] == "6 of 6" and diff[7] == "all clips, no trimming"
    # a released model nobody scored: em dashes beside the published numbers
    wavenet = _row(md, "samples/sc09/wavenet")
    assert wavenet[2:6] == ["— (5.08)", "— (2.27)", "— (5.80)", "— (1.47)"]
    assert wavenet[6] == cells.MISSING and wavenet[8] == cells.MISSING
    small = _row(md, "samples/sc09/2048-sashimi-diffwave-small-500k")
    assert small[0] == "DiffWave (SaShiMi small), ablation"
    assert small[2] == f"— (1.70{cells.DAGGER})"  # the ablation table is recalled
    assert "classifier: released (krandiash/sashimi-release resnext.pth)" in md
    assert "no log-likelihood values" in md
    rows = list(
        csv.DictReader(io.StringIO((release_root / "results/tables/sc09_release.csv").read_text()))
    )
    sashimi = next(r for r in rows if r["Release folder"] == "samples/sc09/sashimi")
    assert sashimi["FID ↓"] == f"{m['fid']:.2f}" and sashimi["FID ↓ (paper)"] == "1.99"
    html_ = (release_root / "results/report.html").read_text()
    assert "<h3 id='sc09_release'>" in html_


def test_sc09_tables_name_the_classifier(rendered: Path, tmp_path, monkeypatch):
    md = (rendered / "results/tables/sc09.md").read_text()
    assert "| Classifier |" in md
    assert _row(md, "sashimi-sc09")[-1] == cells.MISSING  # scored, but no classifier recorded
    assert _row(md, "wavenet-sc09")[-1] == cells.MISSING
    assert "classifier: ours (trained here)" in md
    # what evaluate writes now: the source, per row
    root = tmp_path
    shutil.copy(PARAMS, root / "params.yaml")
    for key, source in (("sashimi-sc09", "released"), ("wavenet-sc09", "ours")):
        write_json(
            root / f"results/runs/{key}/metrics.json",
            {"fid": 2.0, "sc09_classifier": "x.pt", "sc09_classifier_source": source},
        )
    monkeypatch.chdir(root)
    make_report(load_params("params.yaml", check_models=False), "results", figures=False)
    md = (root / "results/tables/sc09.md").read_text()
    assert _row(md, "sashimi-sc09")[-1] == "released" and _row(md, "wavenet-sc09")[-1] == "ours"


def test_release_folders_enter_the_dag_only_when_present(tmp_path):
    """No release files: nothing of the release is planned (the demo needs none). A released
    folder present: it is scored, and the released classifier is fetched for it."""
    from test_workflow import _copy_repo, planned_jobs

    (tmp_path / "repo").mkdir()
    repo = _copy_repo(tmp_path / "repo")
    target = ["results/tables/sc09_release.md"]
    before = {rule for rule, _ in planned_jobs(repo, target)}
    assert "evaluate_release" not in before and "download_release_classifier" not in before
    folder = repo / "data/raw/release/samples/sc09/wavenet"
    write_wav(folder / "unconditional_sc09_wavenet_len_1.00s_gen_1.wav", _clip(1))
    jobs = planned_jobs(repo, target)
    assert {j for j in jobs if j[0] == "evaluate_release"} == {
        ("evaluate_release", "release=wavenet")
    }
    assert "download_release_classifier" in {rule for rule, _ in jobs}
