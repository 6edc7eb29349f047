"""Generation: exact log-likelihoods, nucleus sampling, valid 16 kHz wavs + loglik.csv,
resumable batches, the run's own quantiser, prefix continuation, diffusion samplers."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from sashimi.errors import UserError
from test_train import REAL, TinyAR, cli, setup_workdir, tiny_run, write_params


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    return setup_workdir(tmp_path, monkeypatch)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_top_p_filter():
    from sashimi.sample import top_p_filter

    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    q = top_p_filter(p, 0.7)
    torch.testing.assert_close(q, torch.tensor([[0.625, 0.375, 0, 0], [0, 0, 0.375, 0.625]]))
    assert torch.equal(top_p_filter(p, 0.5)[0], torch.tensor([1.0, 0, 0, 0]))
    assert torch.equal(top_p_filter(p, 1.0), p)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_loglik_is_the_models_own_likelihood(temperature, top_p):
    """loglik = sum log p_model(y_t | y_<t) at temperature 1, recomputed by a forward pass."""
    from sashimi.sample import generate_ar

    model = TinyAR(d_model=8).eval()
    prefix = torch.tensor([128, 140, 150, 131, 90])
    g = torch.Generator().manual_seed(3)
    tokens, loglik = generate_ar(
        model, 3, 40, temperature=temperature, top_p=top_p, prefix=prefix, generator=g
    )
    assert tokens.shape == (3, 40) and (tokens[:, :5] == prefix).all()
    x = torch.cat([torch.full((3, model.context + 1), 128), tokens[:, :-1]], 1)  # (3, context + 40)
    with torch.no_grad():
        logp = F.log_softmax(model(x).double(), -1).gather(2, tokens[:, :, None])[
            :, :, 0
        ]  # (3, 40)
    torch.testing.assert_close(loglik, logp[:, 5:].sum(1), rtol=1e-5, atol=1e-4)
    # seeded: the same generator state gives the same clips
    tokens2, _ = generate_ar(
        model,
        3,
        40,
        temperature=temperature,
        top_p=top_p,
        prefix=prefix,
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(tokens, tokens2)


def test_sample_writes_wavs_and_csv_and_resumes(workdir, capsys):
    sample = {"n": 5, "seconds": 0.01, "batch_size": 2}
    write_params(workdir, {"tiny": tiny_run(train={"max_steps": 2}, sample=sample)})
    assert cli("train", "--run", "tiny") == 0
    argv = ["sample", "--run", "tiny"]
    assert cli(*argv) == 0
    out = workdir / "results/runs/tiny/samples"
    wavs = sorted(out.glob("*.wav"))
    assert [w.name for w in wavs] == [f"{i:05d}.wav" for i in range(5)]
    for w in wavs:
        info = sf.info(str(w))
        assert info.samplerate == 16000 and info.frames == 160 and info.channels == 1
        assert info.subtype == "PCM_16"
    rows = _rows(out / "loglik.csv")
    assert [r["name"] for r in rows] == [w.name for w in wavs]
    for r in rows:
        ll, bits = float(r["loglik_nats"]), float(r["bits_per_sample"])
        assert ll < 0 and bits == pytest.approx(-ll / (160 * math.log(2)), rel=1e-5)

    # resume: a lost clip regenerates its batch identically; other batches are skipped
    before = {w.name: w.read_bytes() for w in wavs}
    mtimes = {w.name: w.stat().st_mtime_ns for w in wavs}
    (out / "00003.wav").unlink()
    capsys.readouterr()
    assert cli(*argv) == 0
    assert '"generated_batches": 1' in capsys.readouterr().out
    for w in sorted(out.glob("*.wav")):
        assert w.read_bytes() == before[w.name]
        if w.name not in ("00002.wav", "00003.wav"):
            assert w.stat().st_mtime_ns == mtimes[w.name]
    assert _rows(out / "loglik.csv") == rows
    # summary.json: the speed of THIS job (one batch of 2 clips of 0.01 s regenerated)
    summ = json.loads((out / "summary.json").read_text())
    assert summ["n"] == 5 and summ["seconds"] == 0.01 and summ["batch_size"] == 2
    assert summ["device"] == "cpu" and summ["clips_generated"] == 2 and summ["kind"] == "ar"
    assert summ["generated_seconds"] == pytest.approx(0.02)
    assert summ["sample_realtime_factor"] == pytest.approx(0.02 / summ["wall_seconds"])
    assert 0 < summ["seconds_per_step"] <= summ["generation_seconds"] / 160 * (1 + 1e-9)
    # nothing new to generate: the previous job's summary stays
    before_summary = (out / "summary.json").read_bytes()
    assert cli(*argv) == 0
    assert '"generated_batches": 0' in capsys.readouterr().out
    assert (out / "summary.json").read_bytes() == before_summary
    # more clips extend the folder; other settings are refused
    write_params(workdir, {"tiny": tiny_run(train={"max_steps": 2}, sample=dict(sample, n=6))})
    assert cli(*argv) == 0
    assert len(list(out.glob("*.wav"))) == 6
    with pytest.raises(UserError, match=r"temperature=1\.0, now temperature=0\.5"):
        from sashimi.config import load_params
        from sashimi.sample import sample_run

        P = load_params("params.yaml")
        sample_run(
            P,
            P.run("tiny"),
            n=5,
            seconds=0.01,
            batch_size=2,
            temperature=0.5,
            top_p=1.0,
            checkpoint=None,
            out=None,
            progress=False,
        )


def test_decoding_uses_the_runs_quantiser(workdir):
    """Same checkpoint and seed under a linear and a mu-law dataset: same tokens, each decoded
    with its own quantiser (Beethoven is linear)."""
    from sashimi.data.quantize import mu_law_decode

    ds = {
        "tiny": {"format": "folder", "download": None, "quantization": "mu-law"},
        "lin": {"format": "folder", "download": None, "quantization": "linear"},
    }
    sample = {"n": 2, "seconds": 0.02}
    runs = {
        "tiny": tiny_run(train={"max_steps": 2}, sample=sample),
        "lin": tiny_run(dataset="lin", sample=sample),
    }
    write_params(workdir, runs, ds)
    assert cli("train", "--run", "tiny") == 0
    ck = str(workdir / "results/runs/tiny/checkpoints/last.pt")
    for key in ("tiny", "lin"):
        assert cli("sample", "--run", key, "--checkpoint", ck, "--out", f"s-{key}") == 0
    lin, _ = sf.read(workdir / "s-lin/00000.wav", dtype="float64")
    mu, _ = sf.read(workdir / "s-tiny/00000.wav", dtype="float64")
    q = np.rint((lin + 1) * 128).astype(np.int64)  # linear: x = q / 128 - 1, exact within PCM-16
    np.testing.assert_allclose(lin, q / 128 - 1, atol=1e-4)
    np.testing.assert_allclose(mu, mu_law_decode(torch.from_numpy(q)).numpy(), atol=1e-4)
    assert np.abs(mu - lin).max() > 1e-2  # the two decodings really differ


@pytest.mark.parametrize(
    "flag", ["--temperature", "--n", "--seconds", "--seed", "--top-p", "--prefix-seconds"]
)
def test_sample_command_line_takes_only_selectors(workdir, flag):
    """Settings live in params.yaml: a hyper-parameter flag is an argparse error (exit 2)."""
    write_params(workdir, {"tiny": tiny_run()})
    with pytest.raises(SystemExit) as e:
        cli("sample", "--run", "tiny", flag, "0.5")
    assert e.value.code == 2


def test_bad_sample_values_name_the_params_key(workdir, capsys):
    from sashimi.config import load_params
    from sashimi.sample import sample_run

    write_params(workdir, {"tiny": tiny_run()})
    P = load_params("params.yaml")
    with pytest.raises(UserError, match=r"^runs\.tiny\.sample\.top_p: 1\.5 must be in \(0, 1\]$"):
        sample_run(P, P.run("tiny"), top_p=1.5)
    with pytest.raises(UserError, match=r"^runs\.tiny\.sample\.n: 0 must be >= 1$"):
        sample_run(P, P.run("tiny"), n=0)
    write_params(workdir, {"tiny": tiny_run(sample={"top_p": 1.5})})
    assert cli("sample", "--run", "tiny") == 2
    assert "runs.tiny.sample.top_p: 1.5 " in capsys.readouterr().err


def test_sample_seed_and_prefix_seconds_come_from_params(workdir):
    """`sample.seed` picks the clips (null: train.seed); `sample.prefix_seconds` the prefix."""
    train = {"max_steps": 2, "seed": 3}

    def sample(out, **values):
        run = tiny_run(train=train, sample=dict({"n": 2, "seconds": 0.01}, **values))
        write_params(workdir, {"tiny": run})
        assert cli("sample", "--run", "tiny", "--out", out) == 0
        return [w.read_bytes() for w in sorted((workdir / out).glob("*.wav"))]

    write_params(workdir, {"tiny": tiny_run(train=train)})
    assert cli("train", "--run", "tiny") == 0
    a, again, b = sample("a", seed=1), sample("again", seed=1), sample("b", seed=2)
    assert len(a) == 2 and a == again and a != b
    default = sample("default")  # seed null: the run's train.seed
    assert json.loads((workdir / "default/sample_config.json").read_text())["seed"] == 3
    assert default == sample("three", seed=3) != a

    sf.write(workdir / "prefix.wav", np.linspace(-0.5, 0.5, 400, dtype=np.float32), 16000)
    for seconds in (0.005, 0.002):
        out = f"cont-{seconds}"
        run = tiny_run(train=train, sample={"n": 1, "seconds": 0.01, "prefix_seconds": seconds})
        write_params(workdir, {"tiny": run})
        assert cli("sample", "--run", "tiny", "--prefix", "prefix.wav", "--out", out) == 0
        settings = json.loads((workdir / out / "sample_config.json").read_text())
        assert settings["prefix_seconds"] == seconds and settings["prefix"] == "prefix.wav"
        row = _rows(workdir / out / "loglik.csv")[0]  # only the generated samples are scored
        n_gen = 160 - round(seconds * 16000)
        assert float(row["bits_per_sample"]) == pytest.approx(
            -float(row["loglik_nats"]) / (n_gen * math.log(2)), rel=1e-5
        )


def test_prefix_continuation(workdir):
    from sashimi.data.quantize import decode, encode

    sample = {"n": 3, "seconds": 0.03, "prefix_seconds": 0.01}
    write_params(workdir, {"tiny": tiny_run(train={"max_steps": 2}, sample=sample)})
    assert cli("train", "--run", "tiny") == 0
    t = np.arange(800) / 8000
    prefix = (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    sf.write(workdir / "prefix.wav", prefix, 8000)  # 8 kHz: resampled to 16 kHz
    assert cli("sample", "--run", "tiny", "--prefix", "prefix.wav", "--out", "cont") == 0
    import torchaudio

    p16 = torchaudio.functional.resample(torch.from_numpy(prefix), 8000, 16000)[:160]
    expect = decode(encode(p16, "mu-law"), "mu-law").numpy()
    for i in range(3):
        x, sr = sf.read(workdir / f"cont/{i:05d}.wav", dtype="float32")
        assert sr == 16000 and len(x) == 480
        np.testing.assert_allclose(x[:160], expect, atol=1e-4)
    rows = _rows(workdir / "cont/loglik.csv")
    r = rows[0]
    assert float(r["bits_per_sample"]) == pytest.approx(
        -float(r["loglik_nats"]) / (320 * math.log(2)), rel=1e-5
    )
    with pytest.raises(UserError, match="prefix must be shorter"):
        from sashimi.config import load_params
        from sashimi.sample import sample_run

        P = load_params("params.yaml")
        sample_run(
            P,
            P.run("tiny"),
            n=1,
            seconds=0.01,
            batch_size=1,
            temperature=1.0,
            top_p=1.0,
            checkpoint=None,
            out="x",
            prefix="prefix.wav",
            prefix_seconds=0.05,
            progress=False,
        )


@pytest.mark.parametrize("name", list(REAL))
def test_real_models_sample(workdir, name):
    """Each real model: a few training steps, then clips through its step mode (AR, longer than
    the 256-sample training clips) or its fast sampler (diffusion)."""
    from sashimi.models import MODELS

    try:
        MODELS[name]
    except (ImportError, AttributeError) as e:
        pytest.skip(f"model {name} not importable yet ({e})")
    kind, model, train = REAL[name]
    ds = {
        "tiny": {"format": "folder", "download": None, "quantization": "mu-law", "clip_length": 256}
    }
    write_params(
        workdir,
        {
            name: {
                "kind": kind,
                "dataset": "tiny",
                "model": model,
                "train": dict({"max_steps": 2}, **train),
                "sample": {
                    "sampler": "fast",
                    "fast_steps": 4,
                    "n": 2,
                    "seconds": 0.04,
                    "batch_size": 2,
                },
            }
        },
        ds,
    )
    assert cli("train", "--run", name) == 0
    assert cli("sample", "--run", name) == 0
    out = workdir / "results/runs" / name / "samples"
    rows = _rows(out / "loglik.csv")
    assert len(rows) == 2
    for r in rows:
        x, sr = sf.read(out / r["name"], dtype="float32")
        assert sr == 16000 and len(x) == 640 and np.isfinite(x).all() and np.abs(x).max() <= 1
        if kind == "ar":
            assert float(r["loglik_nats"]) < 0
        else:
            assert r["loglik_nats"] == "" and r["bits_per_sample"] == ""
    summ = json.loads((out / "summary.json").read_text())
    assert summ["clips_generated"] == 2 and summ["sample_realtime_factor"] > 0
    if kind == "ar":
        assert summ["seconds_per_step"] > 0 and "sampler" not in summ
    else:
        assert summ["sampler"] == "fast" and summ["sampler_steps"] == 4
        assert "seconds_per_step" not in summ


def test_wavenet_starts_from_the_training_state():
    """Training inputs are left-padded with 128: the sampler starts WaveNet primed with 128, so
    its first step equals model(x)[:, 0] for x = [128] * context + [128], and every step's
    likelihood equals a forward pass over the 128-padded clip."""
    from sashimi.models import MODELS, build_model
    from sashimi.sample import generate_ar, initial_state

    try:
        MODELS["wavenet"]
    except (ImportError, AttributeError) as e:
        pytest.skip(f"wavenet not importable ({e})")
    kwargs = {k: v for k, v in REAL["wavenet"][1].items() if k != "name"}
    torch.manual_seed(0)
    model = build_model("wavenet", **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():  # random weights large enough for the padding to matter
            p.normal_(0, 0.3)
    model.setup_step()
    x = torch.full((2, model.context + 1), 128)  # (2, context + 1)
    with torch.no_grad():
        expect = model(x)[:, 0]  # (2, 256)
    first, _ = model.step(torch.full((2,), 128), initial_state(model, 2))
    torch.testing.assert_close(first, expect, rtol=1e-4, atol=1e-4)
    zero, _ = model.step(torch.full((2,), 128), model.default_state(2))  # official zero queues
    assert (zero - expect).abs().max() > 1e-2  # the start state matters

    tokens, loglik = generate_ar(model, 2, 30, generator=torch.Generator().manual_seed(1))
    xs = torch.cat([torch.full((2, model.context + 1), 128), tokens[:, :-1]], 1)
    with torch.no_grad():
        logp = F.log_softmax(model(xs).double(), -1).gather(2, tokens[:, :, None])[:, :, 0]
    torch.testing.assert_close(loglik, logp.sum(1), rtol=1e-5, atol=1e-3)


def test_initial_state_falls_back_to_default_state():
    from sashimi.sample import initial_state

    model = TinyAR(d_model=8)
    assert torch.equal(initial_state(model, 3), model.default_state(3))


def test_sample_token_follows_the_distribution():
    """Gumbel-max draws match softmax(logits / T), restricted to the nucleus under top-p."""
    from sashimi.sample import sample_token, top_p_filter

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    for T, p in ((1.0, 1.0), (0.5, 1.0), (1.0, 0.8)):
        x = sample_token(logits, T, p, g)
        freq = torch.bincount(x, minlength=4).float() / len(x)
        expect = top_p_filter(torch.softmax(logits[:1] / T, -1), p)[0]
        torch.testing.assert_close(freq, expect, atol=0.015, rtol=0)
    assert torch.equal(sample_token(logits[:2], 0.0), torch.tensor([0, 0]))


def test_gumbel_noise_blocks_follow_the_distribution():
    """Noise drawn in blocks (the sampling loop's source) gives the same distribution, a fresh
    draw every step across block boundaries, and the same stream for the same seed."""
    from sashimi.sample import GumbelNoise, sample_token

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(50, 4)
    noise = GumbelNoise((50, 4), torch.Generator().manual_seed(0), block=7)
    draws = [noise.next() for _ in range(400)]  # 57 blocks and a partial one
    assert all(d.shape == (50, 4) for d in draws)
    assert not any(torch.equal(a, b) for a, b in zip(draws, draws[1:]))
    x = torch.cat([sample_token(logits, gumbel=d) for d in draws])
    freq = torch.bincount(x, minlength=4).float() / len(x)
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.015, rtol=0)
    again = GumbelNoise((50, 4), torch.Generator().manual_seed(0), block=7)
    assert all(torch.equal(a, again.next()) for a in draws[:20])
