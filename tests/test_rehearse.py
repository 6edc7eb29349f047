"""`sashimi rehearse`: batch cap, step budgets, GPU projection, the table, failures named, and
one real paper-shape training step resumed from its checkpoint (the CI slice of the rehearsal)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from sashimi import rehearse, rehearse_phases, rehearse_table
from sashimi.config import load_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paper():
    return load_params(ROOT / "params.yaml", scale="paper")


def test_batch_cap_keeps_at_least_one_item():
    assert rehearse.rehearsal_batch(32, 16000, None) == 32  # --exact / CUDA
    assert rehearse.rehearsal_batch(32, 16000, 32000) == 2
    assert rehearse.rehearsal_batch(1, 131072, 32000) == 1  # a music chunk is never cut
    assert rehearse.rehearsal_batch(4, 1024, 1_000_000) == 4  # never above the paper batch


def test_shapes_come_from_paper_params(paper):
    sr = paper.run("samplernn-sc09")
    assert rehearse.sequence_length(paper, sr) == 16000
    assert rehearse.item_tokens(paper, sr) == sr.train.tbptt  # a TBPTT window per step
    ym = paper.run("sashimi-youtubemix")
    assert rehearse.sequence_length(paper, ym) == paper.dataset("youtubemix").chunk_length


@pytest.mark.parametrize(
    ("run", "per_epoch"),
    [("sashimi-sc09", 973), ("sashimi-beethoven", 3808), ("sashimi-youtubemix", 1484),
     ("samplernn-sc09", 31158 // 128 * 16), ("classifier-sc09", 18620 // 96)],
)  # fmt: skip
def test_step_budget_is_epochs_of_the_full_dataset_or_max_steps(paper, run, per_epoch):
    """Steps per epoch as official_recipes.yaml derives them (973 / 3,808 / 1,484; SampleRNN:
    batches x TBPTT windows), times max_epochs; max_steps when it is the lower."""
    rc = paper.run(run)
    assert rehearse.steps_per_epoch(paper, rc) == per_epoch
    steps, source = rehearse.step_budget(paper, rc)
    by_epochs = rc.train.max_epochs * per_epoch if rc.train.max_epochs else None
    expected = min(x for x in (rc.train.max_steps, by_epochs) if x is not None)
    assert steps == expected
    assert source == ("train.max_steps" if steps == rc.train.max_steps else
                      f"train.max_epochs {rc.train.max_epochs} x {per_epoch} steps/epoch")  # fmt: skip


def test_run_order(paper):
    assert rehearse.paper_runs(paper)[0] == "classifier-sc09"
    assert set(rehearse.paper_runs(paper)) == set(paper.runs)


def test_h100_reference_is_the_readme_figure(paper):
    ref = rehearse.H100_REFERENCE
    readme = (ROOT / "README.md").read_text()
    line = next(
        (ln for ln in readme.splitlines() if f"--batch {ref['batch']} --length {ref['length']}" in ln
         and "--device cuda --amp" in ln),
        None,
    )  # fmt: skip
    assert line is not None, "README.md lost its H100 training figure"
    assert f"{ref['s_per_step']} s/step" in line
    run = paper.run(ref["run"])
    assert run.train.batch_size == ref["batch"]
    assert rehearse.sequence_length(paper, run) == ref["length"]


def _rows():
    return [
        {"run": "sashimi-sc09", "paper_batch": 32, "length": 16000,
         "train_s_per_step_paper_batch": 41.0, "budget_steps": 200000},
        {"run": "wavenet-sc09", "paper_batch": 8, "length": 16000,
         "train_s_per_step_paper_batch": 20.5, "budget_steps": 1000},
        {"run": "broken", "paper_batch": 8, "length": 16000, "budget_steps": 1000,
         "status": "train failed: RuntimeError: out of memory"},
    ]  # fmt: skip


def test_projection_names_its_source():
    rows = _rows()
    rehearse.gpu_seconds(rows, gpu_measured=False)
    ref, other, broken = rows
    assert ref["gpu_s_per_step"] == 0.205 and ref["gpu_source"] == rehearse.H100_SOURCE
    assert ref["projected_gpu_hours"] == round(200000 * 0.205 / 3600, 1)
    for r in (other, broken):  # no GPU figure: no projection rather than a guess
        assert r["gpu_s_per_step"] is None and r["projected_gpu_hours"] is None
        assert r["gpu_source"].startswith("no GPU figure")

    rows = _rows()
    rows[0]["paper_batch"] = "16"  # another shape than README's: its figure does not apply
    rehearse.gpu_seconds(rows, gpu_measured=False)
    assert rows[0]["gpu_s_per_step"] is None

    rows = _rows()
    rehearse.gpu_seconds(rows, gpu_measured=True)
    assert rows[1]["gpu_s_per_step"] == 20.5 and rows[1]["gpu_source"] == "measured here (GPU)"
    assert rows[1]["projected_gpu_hours"] == round(1000 * 20.5 / 3600, 1)


def test_keep_reads_back_only_passed_rows(tmp_path):
    rows = _rows()
    rows[0]["status"] = rows[1]["status"] = "ok"
    rehearse.gpu_seconds(rows, gpu_measured=False)
    csv_path, _ = rehearse_table.write_table(rows, ["# header"], tmp_path / "rehearsal")
    kept = rehearse_table.passed_rows(csv_path)
    assert sorted(kept) == ["sashimi-sc09", "wavenet-sc09"]
    rehearse.gpu_seconds(list(kept.values()), gpu_measured=False)  # strings read back
    assert kept["sashimi-sc09"]["gpu_s_per_step"] == 0.205
    assert kept["sashimi-sc09"]["status"] == "ok" and kept["sashimi-sc09"]["eval"] is None
    assert rehearse_table.passed_rows(tmp_path / "missing.csv") == {}


def test_table_has_one_row_per_run(tmp_path):
    rows = _rows()
    rehearse.gpu_seconds(rows, gpu_measured=False)
    csv_path, md_path = rehearse_table.write_table(rows, ["# header"], tmp_path / "rehearsal")
    with open(csv_path, newline="") as f:
        got = list(csv.DictReader(f))
    assert [r["run"] for r in got] == ["sashimi-sc09", "wavenet-sc09", "broken"]
    assert got[2]["status"] == "train failed: RuntimeError: out of memory"
    md = md_path.read_text().splitlines()
    assert md[0] == "# header"
    assert sum(ln.startswith("| ") for ln in md) == 4  # the column titles and three runs
    assert any("broken" in ln and "out of memory" in ln for ln in md)


def test_a_failing_phase_is_named(tmp_path):
    spec = {"params": str(ROOT / "params.yaml"), "workdir": str(tmp_path), "device": "cpu",
            "threads": 1, "memory_gb": 0, "run": "sashimi-sc09", "batch": 1, "steps": 1,
            "resume": False}  # fmt: skip
    res = rehearse_phases.run_phase("train", spec, timeout_s=300)
    assert res["error"].startswith("train failed: UserError: data/prepared/sc09")
    assert "not prepared" in res["error"] and "\n" not in res["error"]


def test_paper_shape_step_checkpoint_and_resume(tmp_path, paper, monkeypatch):
    """The cheapest paper run (SampleRNN: exact model, 16,000-sample clips, 1,024-sample TBPTT
    windows) at batch 1: one step and a checkpoint, then a second step resumed from it (the
    phases in this process; `sashimi rehearse` runs each in a fresh one)."""
    import torch

    from sashimi.data.prepare import prepare

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SASHIMI_TRACKING", "0")
    monkeypatch.setenv("SASHIMI_PROGRESS", "0")
    torch.set_num_threads(2)
    prepare("synth-digits", None, tmp_path / "data/prepared/sc09", n_clips=10, key="sc09",
            progress=False)  # fmt: skip
    for f in (tmp_path / "data/prepared/sc09").glob("validation.*"):
        f.unlink()  # no validation split: the trainer skips validation (70 s of GRU on a CPU)
    spec = {"params": str(ROOT / "params.yaml"), "device": "cpu", "run": "samplernn-sc09",
            "batch": 1}  # fmt: skip
    first = rehearse_phases.PHASES["train"](dict(spec, steps=1, resume=False))
    ckpt = tmp_path / "results/runs/samplernn-sc09/checkpoints/last.pt"
    assert ckpt.is_file()
    second = rehearse_phases.PHASES["train"](dict(spec, steps=2, resume=True))
    assert second["step"] == 2 and len(second["step_s"]) == 1  # only the resumed step ran
    n_params = sum(p.numel() for p in _build(paper.run("samplernn-sc09")).parameters())
    assert first["params"] == second["params"] == n_params
    assert second["rss_before_step_mb"] > 0 and second["step_s"][0] > 0


def _build(run):
    from sashimi.models import build_model

    return build_model(run.model_name, **run.model)
