"""The speed table's stage: `sashimi speed --kind KIND` measurements and their table."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch

from conftest import ROOT  # tests/ is on sys.path
from sashimi.config import load_params
from sashimi.errors import UserError
from sashimi.speed import KINDS, NOT_CONFIRMED, _paper_training_claim, measure, write_speed_table

torch.set_num_threads(1)

TINY = {
    "runs": {"sashimi": "sashimi-sc09", "wavenet": "wavenet-sc09", "samplernn": "samplernn-sc09",
             "diffwave": "diffwave-sashimi-sc09"},
    "train": {"batch": 1, "length": 256, "steps": 1, "naive_steps": 1},
    "generate": {"batch": 1, "steps": 16, "naive_steps": 8},
    "sample": {"batch": 1, "length": 256, "fast_steps": 2, "ancestral_estimate": True},
}  # fmt: skip


@pytest.fixture(scope="module")
def params():
    P = load_params(ROOT / "params.yaml", scale="demo", check_models=False)
    return dataclasses.replace(P, raw=dict(P.raw, speed=TINY))


@pytest.fixture(scope="module")
def benches(params, tmp_path_factory):
    """Every kind measured once at tiny lengths, written as `sashimi speed` writes them."""
    out = tmp_path_factory.mktemp("results")
    for kind in KINDS:
        res = measure(params, kind, torch.device("cpu"))
        (out / "bench").mkdir(exist_ok=True)
        (out / "bench" / f"{kind}.json").write_text(json.dumps(res))
    return out


def _read(results, kind: str) -> dict:
    return json.loads((results / "bench" / f"{kind}.json").read_text())


def test_each_kind_is_timed_beside_its_reference(benches):
    s = _read(benches, "sashimi")
    assert s["train"]["tokens_per_s"] > 0 and s["train"]["naive_seconds_per_step"] > 0
    assert s["train"]["length"] == 256 and s["train"]["params"] > 0
    assert s["generate"]["realtime_factor"] > 0 and s["generate"]["naive_seconds_per_step"] > 0
    assert "dense" in s["generate"]["naive"]  # the official-style step
    w = _read(benches, "wavenet")
    assert (
        w["generate"]["naive_seconds_per_step"] > 0 and "naive_seconds_per_step" not in w["train"]
    )
    r = _read(benches, "samplernn")
    assert r["train"]["tokens_per_s"] > 0 and r["generate"]["realtime_factor"] > 0
    d = _read(benches, "diffwave")
    assert d["train"]["tokens_per_s"] > 0 and d["sample"]["fast_steps"] == 2
    assert d["sample"]["realtime_factor_fast"] > d["sample"]["realtime_factor_ancestral"] > 0


def test_table_puts_the_paper_statements_beside_ours(benches):
    paths = write_speed_table(benches)
    assert sorted(p.name for p in paths) == [
        "speed.csv",
        "speed.md",
        "speed.tex",
        "speed_bench.png",
    ]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    rows = list(csv.DictReader((benches / "tables" / "speed.csv").open()))
    models = {r["model"] for r in rows}
    assert {"SaShiMi", "WaveNet", "SampleRNN", "DiffWave", "SaShiMi / WaveNet"} <= models
    claim = next(r for r in rows if r["model"] == "SaShiMi / WaveNet")
    assert claim["paper"] == _paper_training_claim() and claim["ours"].endswith("x")
    s = _read(benches, "sashimi")["train"]
    w = _read(benches, "wavenet")["train"]
    assert float(claim["ours"][:-1]) == pytest.approx(
        (s["batch"] * s["length"] / s["seconds_per_step"])
        / (w["batch"] * w["length"] / w["seconds_per_step"]),
        rel=0.01,
    )
    # published numbers that the reference file lacks stay out
    assert all(r["paper"] == NOT_CONFIRMED for r in rows if r is not claim)
    assert "not confirmed" in (benches / "tables" / "speed.md").read_text()


def test_paper_claim_only_from_the_reference_file():
    claim = _paper_training_claim()
    ref = (ROOT / "src" / "sashimi" / "reference" / "paper_results.yaml").read_text()
    assert (claim != NOT_CONFIRMED) == ("training 3x faster" in ref)


def test_bad_kind_and_missing_run_are_one_line_errors(params, tmp_path):
    with pytest.raises(UserError, match="--kind"):
        measure(params, "transformer", torch.device("cpu"))
    no_runs = dataclasses.replace(params, raw=dict(params.raw, speed={"train": {}}))
    with pytest.raises(UserError, match=r"speed\.runs\.wavenet"):
        measure(no_runs, "wavenet", torch.device("cpu"))
    assert write_speed_table(tmp_path) == []
