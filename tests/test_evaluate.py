"""Evaluation: test NLL equals a direct computation (whole clips and music chunks), metrics.json
is merged, diffusion NLL is skipped, SC09 metrics and the real-data rows, missing checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from test_train import (
    REAL,
    TinyAR,
    cli,
    make_prepared,
    setup_workdir,
    tiny_run,
    write_params,
)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    return setup_workdir(tmp_path, monkeypatch)


def _direct_nll_bits(
    model, prepared, split, chunk_length, quantization="mu-law"
) -> tuple[float, int]:
    """Clip by clip (or chunk by chunk), no batching, no padding: sum of nats / count / ln 2."""
    from sashimi.data.quantize import encode

    audio = np.load(prepared / f"{split}.audio.npy")
    offsets = np.load(prepared / f"{split}.offsets.npy")
    total, count = 0.0, 0
    for a, b in zip(offsets[:-1], offsets[1:]):
        clip = torch.from_numpy(audio[a:b])
        pieces = (
            [clip]
            if chunk_length is None
            else [
                clip[s : s + chunk_length]
                for s in range(0, len(clip) - chunk_length + 1, chunk_length)
            ]
        )
        for piece in pieces:
            q = encode(piece, quantization).long()  # (L,)
            x = torch.cat([torch.full((model.context + 1,), 128), q[:-1]])  # (context + L,)
            with torch.no_grad():
                logits = model(x[None])[0].double()  # (L, 256)
            total += float(F.cross_entropy(logits, q, reduction="sum"))
            count += len(q)
    return total / count / math.log(2), count


def _set_eval(root, **values):
    """Set params.yaml `eval` keys (e.g. nll_batch_size) in the test's params file."""
    path = root / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["eval"] = dict(raw.get("eval") or {}, **values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.parametrize("flag", ["--batch-size", "--max-clips"])
def test_evaluate_settings_are_not_flags(workdir, flag):
    """NLL batch and real-clip subset live in params.yaml `eval`: the flags are argparse errors."""
    write_params(workdir, {"tiny": tiny_run()})
    with pytest.raises(SystemExit) as e:
        cli("evaluate", "--run", "tiny", flag, "2")
    assert e.value.code == 2


@pytest.mark.parametrize("chunk_length", [None, 128])
def test_nll_equals_direct_computation(workdir, chunk_length):
    from sashimi.checkpoints import load_model

    ds = {
        "tiny": {
            "format": "folder",
            "download": None,
            "quantization": "mu-law",
            "chunk_length": chunk_length,
        }
    }
    write_params(workdir, {"tiny": tiny_run(train={"max_steps": 3, "batch_size": 3})}, ds)
    assert cli("train", "--run", "tiny") == 0
    out = workdir / "results/runs/tiny/metrics.json"
    out.write_text(json.dumps({"fid": 1.5}))  # other keys survive
    _set_eval(workdir, nll_batch_size=2)
    assert cli("evaluate", "--run", "tiny") == 0
    m = json.loads(out.read_text())
    model, ckpt = load_model(workdir / "results/runs/tiny")
    bits, n = _direct_nll_bits(model, workdir / "data/prepared/tiny", "test", chunk_length)
    assert m["nll_bits"] == pytest.approx(bits, rel=1e-6)
    assert m["n_tokens"] == n and m["fid"] == 1.5
    assert m["nll_step"] == ckpt["step"] and m["nll_checkpoint"].endswith("best.pt")
    assert m["params"] == sum(p.numel() for p in model.parameters())
    # a chosen checkpoint and split
    assert (
        cli(
            "evaluate",
            "--run",
            "tiny",
            "--checkpoint",
            "results/runs/tiny/checkpoints/last.pt",
            "--split",
            "validation",
        )
        == 0
    )
    m = json.loads(out.read_text())
    assert m["nll_split"] == "validation" and m["nll_checkpoint"].endswith("last.pt")
    # the default batch is large (every test item at once) and gives the same number
    _set_eval(workdir, nll_batch_size=None)
    assert cli("evaluate", "--run", "tiny") == 0
    m = json.loads(out.read_text())
    assert m["nll_batch_size"] == (5 if chunk_length is None else n // chunk_length)
    assert m["nll_bits"] == pytest.approx(bits, rel=1e-6)
    # the training budget behind the checkpoint (train_log.csv)
    assert m["train_steps"] == 3 and 0 < m["train_minutes"] < 5


def test_nll_runs_in_inference_mode_with_a_large_default_batch(tmp_path):
    from sashimi.data.datasets import AutoregressiveDataset, load_split
    from sashimi.evaluate import NLL_BATCH_TOKENS, default_nll_batch, nll_bits

    assert default_nll_batch(4, 16000, 24) == 24  # the whole demo SC09 test split at once
    assert default_nll_batch(4, 16000, 10240) == NLL_BATCH_TOKENS // 16000
    assert default_nll_batch(8, 131072, 100) == 8  # never below the training batch
    assert default_nll_batch(4, 10**9, 3) == 3

    class Spy(TinyAR):
        def forward(self, x):
            seen.append((torch.is_inference_mode_enabled(), x.shape[0]))
            return super().forward(x)

    seen: list = []
    model = Spy(d_model=8)
    split = load_split(make_prepared(tmp_path, splits={"test": 3}), "test")
    data = AutoregressiveDataset(split, "mu-law", None, context=model.context)
    bits, n = nll_bits(model, data, 2, torch.device("cpu"))
    assert seen == [(True, 2), (True, 1)] and n == int(split.offsets[-1]) and 0 < bits < 9


def test_missing_prepared_dataset_says_how_to_prepare(workdir, capsys):
    import shutil

    write_params(workdir, {"tiny": tiny_run(train={"max_steps": 1})})
    assert cli("train", "--run", "tiny") == 0
    shutil.rmtree(workdir / "data/prepared/tiny")
    capsys.readouterr()
    for verb in ("train", "evaluate"):
        assert cli(verb, "--run", "tiny", "--no-resume" if verb == "train" else "--split=test") == 2
        err = capsys.readouterr().err
        assert "run `sashimi prepare --key tiny`" in err, err


def test_missing_checkpoint_names_the_path(workdir, capsys):
    write_params(workdir, {"tiny": tiny_run()})
    assert cli("evaluate", "--run", "tiny") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "results/runs/tiny" in err and len(err.splitlines()) == 1
    assert cli("evaluate", "--run", "tiny", "--checkpoint", "nowhere/best.pt") == 2
    assert "nowhere/best.pt: checkpoint not found" in capsys.readouterr().err
    assert cli("evaluate", "--run", "tiny", "--metrics", "fad") == 2
    assert "unknown metric 'fad'" in capsys.readouterr().err


def train_tiny_diffwave(workdir, steps: int) -> None:
    """Write params with one tiny DiffWave run `dw` on the `tiny` folder dataset and train it."""
    from sashimi.models import MODELS

    try:
        MODELS["diffwave"]
    except (ImportError, AttributeError) as e:
        pytest.skip(f"diffwave not importable ({e})")
    kind, model, train = REAL["diffwave"]
    ds = {
        "tiny": {"format": "folder", "download": None, "quantization": "mu-law", "clip_length": 256}
    }
    run = {"kind": kind, "dataset": "tiny", "model": model,
           "train": dict({"max_steps": steps}, **train)}  # fmt: skip
    write_params(workdir, {"dw": run}, ds)
    assert cli("train", "--run", "dw") == 0


def test_diffusion_nll_is_skipped(workdir):
    train_tiny_diffwave(workdir, steps=1)
    assert cli("evaluate", "--run", "dw") == 0
    m = json.loads((workdir / "results/runs/dw/metrics.json").read_text())
    assert "nll_bits" not in m and "not defined" in m["nll_note"] and m["params"] > 0
    assert m["train_steps"] == 1 and m["train_minutes"] >= 0


def test_params_and_budget_are_written_without_nll(workdir, monkeypatch):
    """A diffusion SC09 run is evaluated with --metrics sc09 only: params and the training
    budget still land in metrics.json."""
    from sashimi import evaluate

    train_tiny_diffwave(workdir, steps=2)
    monkeypatch.setattr(evaluate, "evaluate_sc09", lambda *a, **k: {"fid": 1.0})
    assert cli("evaluate", "--run", "dw", "--metrics", "sc09") == 0
    m = json.loads((workdir / "results/runs/dw/metrics.json").read_text())
    from sashimi.checkpoints import load_model

    net, _ = load_model(workdir / "results/runs/dw")
    assert m["params"] == sum(p.numel() for p in net.parameters())
    assert m["train_steps"] == 2 and m["train_minutes"] >= 0 and m["fid"] == 1.0
    assert "nll_note" not in m


def _tiny_classifier(path):
    from sashimi.classifier import DigitClassifier

    clf = DigitClassifier(width=0.0625, depth=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"model": clf.state_dict(), "model_name": "resnext", "model_kwargs": clf.config}, path
    )


def test_sc09_metrics_and_real_rows(workdir):
    sample = {"n": 16, "seconds": 0.01, "batch_size": 8}
    write_params(workdir, {"tiny": tiny_run(train={"max_steps": 2}, sample=sample)})
    _tiny_classifier(workdir / "results/runs/classifier-sc09/checkpoints/best.pt")
    assert cli("train", "--run", "tiny") == 0
    assert cli("sample", "--run", "tiny") == 0
    assert cli("evaluate", "--run", "tiny", "--metrics", "nll,sc09") == 0
    m = json.loads((workdir / "results/runs/tiny/metrics.json").read_text())
    for k in ("nll_bits", "fid", "is", "is_textbook", "mis", "am"):
        assert math.isfinite(m[k]), k
    # 16 clips -> held-out half of 8 -> drop the bottom 3 (40%) and top 0 (5%) by likelihood
    assert m["n_generated"] == 16 and m["n_scored"] == 5
    assert m["sc09_reference"] == "data/prepared/tiny"

    assert cli("evaluate", "--real", "tiny", "--split", "test") == 0
    r = json.loads((workdir / "results/runs/real-test/metrics.json").read_text())
    assert r["n_scored"] == 5 and math.isfinite(r["fid"]) and r["split"] == "test"
    # eval.real_max_clips: a seeded subset of the split
    _set_eval(workdir, real_max_clips=3)
    assert cli("evaluate", "--real", "tiny", "--split", "test") == 0
    r = json.loads((workdir / "results/runs/real-test/metrics.json").read_text())
    assert r["n_scored"] == 3 and r["n_generated"] == 5


# ============================================================================ folders of wavs
def _wav_folder(folder, names, seed=0):
    from sashimi.io import write_wav

    rng = np.random.default_rng(seed)
    t = np.arange(16000) / 16000
    for k, name in enumerate(names):
        x = 0.4 * np.sin(2 * np.pi * (180 + 70 * k) * t) + 0.05 * rng.standard_normal(16000)
        write_wav(folder / name, x)


def _sc09_workdir(workdir, eval_block=None):
    """params.yaml whose `eval.reference` is the prepared `tiny` split, our classifier trained
    (stand-in) and a released one at another path."""
    import yaml

    p = write_params(workdir, {"tiny": tiny_run(train={"max_steps": 2})})
    raw = yaml.safe_load(p.read_text())
    raw["runs"]["classifier-sc09"] = {
        "kind": "classifier",
        "dataset": "tiny",
        "model": {"name": "resnext", "width": 0.0625, "depth": 11},
    }
    raw["eval"] = dict(
        {"reference": "tiny", "released_classifier": "rel/resnext.pth"}, **(eval_block or {})
    )
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    _tiny_classifier(workdir / "results/runs/classifier-sc09/checkpoints/best.pt")
    torch.manual_seed(1)
    _tiny_classifier(workdir / "rel/resnext.pth")  # a different stand-in: other weights


def test_wavs_without_likelihoods_are_scored_whole(workdir):
    from sashimi.classifier import load_classifier
    from sashimi.classifier_data import labelled_split, read_clips
    from sashimi.metrics import fid
    from sashimi.sc09_scoring import classify

    _sc09_workdir(workdir)
    names = [f"clip_{c}.wav" for c in "abcdefg"]
    _wav_folder(workdir / "clips", names)
    assert cli("evaluate", "--wavs", "clips", "--out", "out/clips.json") == 0
    m = json.loads((workdir / "out/clips.json").read_text())
    assert m["n_scored"] == m["n_generated"] == 7 and m["selection"] == "all"
    assert m["trimming"].startswith("not applied") and "log-likelihoods" in m["trimming"]
    assert m["sc09_classifier_source"] == "ours"
    assert m["sc09_classifier"].endswith("classifier-sc09/checkpoints/best.pt")
    clf = load_classifier(workdir / "results/runs/classifier-sc09/checkpoints/best.pt")
    feats, _ = classify(clf, read_clips([workdir / "clips" / n for n in names]))
    ref, _ = classify(clf, labelled_split(workdir / "data/prepared/tiny", "train"))
    assert m["fid"] == pytest.approx(fid(feats, ref), rel=1e-6)


def test_wavs_with_loglik_csv_are_trimmed(workdir):
    _sc09_workdir(workdir)
    names = [f"{i:05d}.wav" for i in range(10)]
    _wav_folder(workdir / "clips", names)
    rows = ["name,loglik_nats,bits_per_sample"] + [
        f"{n},{-float(i)},1.0" for i, n in enumerate(names)
    ]
    (workdir / "clips/loglik.csv").write_text("\n".join(rows) + "\n")
    assert cli("evaluate", "--wavs", "clips", "--out", "m.json") == 0
    m = json.loads((workdir / "m.json").read_text())
    # 10 clips -> held-out half of 5 -> drop the 2 least likely (40%) -> 3
    assert m["selection"] == "loglik" and m["n_scored"] == 3 and m["untrimmed"]["n_scored"] == 10
    assert m["trimming"].startswith("applied")


def test_params_pick_the_released_classifier(workdir):
    _sc09_workdir(workdir, {"sc09_classifier": "released"})
    _wav_folder(workdir / "clips", ["a.wav", "b.wav", "c.wav"])
    assert cli("evaluate", "--wavs", "clips", "--out", "rel.json") == 0
    rel = json.loads((workdir / "rel.json").read_text())
    assert (
        rel["sc09_classifier"] == "rel/resnext.pth" and rel["sc09_classifier_source"] == "released"
    )
    ours = workdir / "results/runs/classifier-sc09/checkpoints/best.pt"
    assert cli("evaluate", "--wavs", "clips", "--out", "ours.json", "--classifier", str(ours)) == 0
    o = json.loads((workdir / "ours.json").read_text())
    assert o["sc09_classifier_source"] == "ours" and o["fid"] != pytest.approx(rel["fid"])


def test_released_classifier_missing_names_the_file(workdir, capsys):
    _sc09_workdir(workdir, {"sc09_classifier": "released", "released_classifier": "nope.pth"})
    _wav_folder(workdir / "clips", ["a.wav", "b.wav"])
    assert cli("evaluate", "--wavs", "clips", "--out", "x.json") == 2
    assert "nope.pth" in capsys.readouterr().err
    assert cli("evaluate", "--wavs", "clips") == 2  # --out is required
    assert cli("evaluate", "--wavs", "missing", "--out", "x.json") == 2
    assert "missing: no such folder" in capsys.readouterr().err
    assert cli("evaluate", "--release", "nosuch") == 2
    assert "eval.released_models.nosuch" in capsys.readouterr().err


def test_likelihood_order_needs_one_numbered_sequence(tmp_path):
    from sashimi.score_folder import likelihood_selection, rank_from_names, wav_files

    good = [f"x_gen_{i}.wav" for i in (1, 2, 3, 10, 4, 5, 6, 7, 8, 9)]
    for n in good:
        (tmp_path / n).write_bytes(b"")
    wavs = wav_files(tmp_path)
    assert [w.name for w in wavs][-2:] == ["x_gen_9.wav", "x_gen_10.wav"]  # natural order
    assert rank_from_names(wavs).tolist() == list(range(10))
    loglik, selection, _ = likelihood_selection(tmp_path, wavs, sorted_by_likelihood=True)
    assert selection == "likelihood-order" and loglik.tolist() == list(range(10))
    _, selection, note = likelihood_selection(tmp_path, wavs, sorted_by_likelihood=False)
    assert selection == "all" and note.startswith("not applied")
    (tmp_path / "x_gen_12.wav").write_bytes(b"")  # a gap: not one sequence
    gap = wav_files(tmp_path)
    assert rank_from_names(gap) is None
    _, selection, note = likelihood_selection(tmp_path, gap, sorted_by_likelihood=True)
    assert selection == "all" and "not one numbered sequence" in note
    assert rank_from_names([tmp_path / "a.wav", tmp_path / "b.wav"]) is None


def test_wavs_scored_with_the_released_format_pickle(workdir, fixtures_dir):
    """The authors' classifier as released (a pickled DataParallel of `models.resnext`, here the
    fixture's small instance) scores a folder of wavs through params.yaml, safely."""
    from sashimi.classifier import load_classifier
    from sashimi.classifier_data import labelled_split, read_clips
    from sashimi.metrics import fid
    from sashimi.sc09_scoring import classify

    fx = torch.load(fixtures_dir / "sc09_classifier_official.pt", weights_only=True)
    _sc09_workdir(workdir, {"sc09_classifier": "released"})
    released = workdir / "rel/resnext.pth"
    released.write_bytes(fx["pickled_wrapped_bytes"].numpy().tobytes())
    names = [f"clip_{c}.wav" for c in "abcde"]
    _wav_folder(workdir / "clips", names)
    assert cli("evaluate", "--wavs", "clips", "--out", "rel.json") == 0
    m = json.loads((workdir / "rel.json").read_text())
    assert m["sc09_classifier_source"] == "released" and m["n_scored"] == 5
    clf = load_classifier(released)
    feats, _ = classify(clf, read_clips([workdir / "clips" / n for n in names]))
    ref, _ = classify(clf, labelled_split(workdir / "data/prepared/tiny", "train"))
    assert feats.shape[1] == 512 and m["fid"] == pytest.approx(fid(feats, ref), rel=1e-6)
