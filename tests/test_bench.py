"""`sashimi bench`: each sub-verb prints one JSON line with the documented keys (tiny models)."""

from __future__ import annotations

import json

import pytest

from sashimi.cli import main

TINY_SASHIMI = json.dumps({"d_model": 8, "n_layers": 1, "glu": False})
TINY_WAVENET = json.dumps({"layers": 3, "blocks": 1, "residual_channels": 8, "dilation_channels": 8,
                           "skip_channels": 8, "end_channels": 8})  # fmt: skip


def _run(argv, capsys) -> dict:
    assert main(argv) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_bench_train_with_naive(capsys, tmp_path):
    out = tmp_path / "b.json"
    r = _run(["bench", "train", "--model", "sashimi", "--model-kwargs", TINY_SASHIMI, "--batch", "2",
              "--length", "64", "--steps", "2", "--warmup", "0", "--naive", "--compile", "never", "--out", str(out)], capsys)  # fmt: skip
    for k in ("seconds_per_step", "peak_rss_mb", "params", "device", "model", "batch", "length",
              "naive_seconds_per_step", "speedup"):  # fmt: skip
        assert k in r, k
    assert (
        r["model"] == "sashimi" and r["batch"] == 2 and r["length"] == 64 and r["device"] == "cpu"
    )
    assert r["seconds_per_step"] > 0 and r["params"] > 0
    assert r["tokens_per_s"] == pytest.approx(2 * 64 / r["seconds_per_step"], rel=1e-3)
    assert json.loads(out.read_text()) == r
    assert r["compile"] == "never" and r["compiled_whole"] is False


def test_bench_generate_sashimi_with_naive(capsys):
    r = _run(["bench", "generate", "--model", "sashimi", "--model-kwargs", TINY_SASHIMI, "--batch", "2",
              "--steps", "20", "--compile", "never", "--naive", "--naive-steps", "5"], capsys)  # fmt: skip
    for k in (
        "seconds_per_step",
        "realtime_factor",
        "steps",
        "naive_seconds_per_step",
        "speedup",
        "naive",
    ):
        assert k in r, k
    assert r["steps"] == 20 and r["compile"] == "never" and r["compiled"] is False
    assert r["realtime_factor"] == pytest.approx(
        2 * 20 / 16000 / (r["seconds_per_step"] * 20), rel=1e-2
    )


def test_bench_generate_wavenet_naive(capsys):
    r = _run(["bench", "generate", "--model", "wavenet", "--model-kwargs", TINY_WAVENET,
              "--steps", "10", "--naive"], capsys)  # fmt: skip
    assert r["model"] == "wavenet" and "receptive field" in r["naive"] and r["speedup"] > 0


def test_bench_sample_diffwave(capsys):
    kw = json.dumps(
        {"res_channels": 4, "skip_channels": 4, "num_res_layers": 2, "dilation_cycle": 2}
    )
    r = _run(["bench", "sample", "--model", "diffwave", "--model-kwargs", kw, "--length", "64",
              "--fast-steps", "2", "--ancestral-estimate"], capsys)  # fmt: skip
    assert (
        r["seconds_per_clip_fast"] > 0
        and r["seconds_per_clip_ancestral"] > r["seconds_per_clip_fast"]
    )
    assert r["ancestral_steps"] == 200


def test_bench_errors(capsys):
    assert main(["bench", "train", "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["bench", "train", "--model", "wavenet", "--model-kwargs", TINY_WAVENET, "--length", "16",
                 "--steps", "1", "--warmup", "0", "--naive"]) == 2  # fmt: skip
    assert "no naive reference" in capsys.readouterr().err
    assert main(["bench", "generate", "--model-kwargs", "[1"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
