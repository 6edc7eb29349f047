"""The authors' released SC09 classifier (`resnext.pth`, a pickled DataParallel or bare
CifarResNeXt) loads into our DigitClassifier and reproduces the official outputs on 8 real
clips, from the raw audio through our torchaudio front end (fixture sc09_classifier_official.pt)."""

from __future__ import annotations

import json

import pytest
import torch

from sashimi.classifier import DigitClassifier, load_classifier
from sashimi.errors import UserError
from sashimi.released_classifier import convert_key, convert_state_dict, infer_kwargs


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    return torch.load(fixtures_dir / "sc09_classifier_official.pt", weights_only=True)


def _official_sd(fx) -> dict:
    return {k[len("state_dict.") :]: v for k, v in fx.items() if k.startswith("state_dict.")}


def _write(fx, tmp_path, form: str):
    p = tmp_path / f"resnext_{form}.pth"
    p.write_bytes(fx[f"pickled_{form}_bytes"].numpy().tobytes())
    return p


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("form", ["wrapped", "unwrapped"])
def test_released_pickle_reproduces_official_logits(fx, tmp_path, form):
    p = _write(fx, tmp_path, form)
    model = load_classifier(p)
    assert model.checkpoint_sha256 == fx[f"pickled_{form}_sha256"]
    assert model.feature_dim == 512
    wav = fx["waveforms_int16"].float() / 32768  # (8, 16000), as librosa.load reads the clips
    with torch.no_grad():
        feats, logits = model.features_and_logits(wav)
        spec = model.spectrogram(wav)  # (8, 1, 32, 32)
        logits_from_spec = model.fc(model.embed(fx["input_features_reflect"][:, None]))
    assert _err(spec[:, 0], fx["input_features_reflect"]) < 1e-3  # dB
    assert _err(logits, fx["logits_reflect"]) < 1e-3
    assert torch.equal(logits.argmax(1), fx["logits_reflect"].argmax(1))
    assert _err(feats, fx["penultimate_reflect"]) < 1e-3
    assert _err(torch.softmax(logits, 1), fx["probs_reflect"]) < 1e-4
    assert _err(logits_from_spec, fx["logits_reflect_fp64"]) < 1e-4


def test_key_map_is_one_to_one(fx):
    official = _official_sd(fx)
    ours, kwargs = convert_state_dict(official)
    assert len(ours) == len(official) == 134
    assert {convert_key(k) for k in official} == set(ours)
    for k, v in official.items():
        assert torch.equal(ours[convert_key(k)], v), k
    assert kwargs == dict(width=1.0, depth=20, cardinality=8, base_width=2, widen_factor=2,
                          n_classes=10)  # fmt: skip
    assert {k: v for k, v in json.loads(fx["constructor_kwargs"]).items() if k in kwargs} == {
        k: kwargs[k] for k in ("depth", "cardinality", "base_width", "widen_factor")
    }
    model = DigitClassifier(**kwargs)
    assert sum(p.numel() for p in model.parameters()) == 346_762
    with pytest.raises(UserError, match="unexpected keys for the SC09 classifier"):
        convert_state_dict(dict(official, **{"stage_1.extra.weight": torch.zeros(1)}))


def test_full_size_is_inferred_from_shapes():
    """The released model's size: ResNeXt-29 8x64d widen 4 -> 1024-d features, 34,425,546 params."""
    model = DigitClassifier()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("frontend.")}
    kw = infer_kwargs(sd)
    assert kw == dict(width=1.0, depth=29, cardinality=8, base_width=64, widen_factor=4,
                      n_classes=10)  # fmt: skip
    assert model.feature_dim == 1024
    assert sum(p.numel() for p in model.parameters()) == 34_425_546


def test_import_checkpoint_converts_to_our_format(fx, tmp_path, capsys):
    from sashimi.cli import main

    src, out = _write(fx, tmp_path, "wrapped"), tmp_path / "clf" / "imported.pt"
    assert main(["import-checkpoint", "--src", str(src), "--out", str(out)]) == 0
    assert "346,762 parameters" in capsys.readouterr().out
    ck = torch.load(out, weights_only=True)  # ours: plain tensors and values
    assert ck["model_name"] == "resnext" and ck["kind"] == "classifier"
    a, b = load_classifier(out), load_classifier(src)
    wav = fx["waveforms_int16"].float() / 32768
    with torch.no_grad():
        assert torch.equal(a(wav), b(wav))
    assert load_classifier(out.parent).checkpoint_sha256 == a.checkpoint_sha256  # folder form
