"""params.yaml: validation errors name the key path; the scale switch resolves overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ROOT  # tests/ is on sys.path
from sashimi.config import load_params, resolve_scale
from sashimi.errors import UserError

PARAMS = ROOT / "params.yaml"


def _write(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load(PARAMS.read_text())
    mutate(raw)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_repository_params_load_at_both_scales():
    demo = load_params(PARAMS, scale="demo", check_models=False)
    paper = load_params(PARAMS, scale="paper", check_models=False)
    assert demo.scale == "demo" and paper.scale == "paper"
    assert set(demo.runs) == set(paper.runs)
    # the paper's configurations, straight from SPEC
    assert paper.run("sashimi-sc09").model["d_model"] == 64
    assert paper.run("sashimi-sc09").model["n_layers"] == 8
    assert paper.run("wavenet-sc09").train.batch_size == 8
    assert paper.run("samplernn-sc09").train.clip_mode == "value"
    assert paper.dataset("youtubemix").chunk_length == 131072
    assert paper.dataset("beethoven").quantization == "linear"
    assert demo.dataset("sc09").format == "synth-digits"
    assert demo.run("sashimi-sc09").model["d_model"] < 64


def test_every_paper_run_is_present():
    P = load_params(PARAMS, scale="paper", check_models=False)
    for m in ("sashimi", "wavenet", "samplernn"):
        for ds in ("beethoven", "youtubemix", "sc09"):
            assert f"{m}-{ds}" in P.runs
    for n in (2, 4, 6):
        assert P.run(f"sashimi-{n}l-youtubemix").model["n_layers"] == n
    assert P.run("wavenet-512-youtubemix").model["skip_channels"] == 512
    for k in (
        "diffwave-wavenet-sc09",
        "diffwave-sashimi-sc09",
        "diffwave-wavenet-small-sc09",
        "diffwave-sashimi-small-sc09",
        "classifier-sc09",
    ):
        assert k in P.runs


def test_run_scale_block_beats_defaults_scale_block():
    P = load_params(PARAMS, scale="demo", check_models=False)
    assert P.run("sashimi-sc09").train.batch_size == 4  # train_defaults.demo beats run.train
    assert P.run("samplernn-sc09").train.tbptt == 1024


def test_unknown_key_names_its_path(tmp_path):
    p = _write(tmp_path, lambda r: r["runs"]["sashimi-sc09"]["train"].update(lrr=1))
    with pytest.raises(UserError, match=r"runs\.sashimi-sc09\.train\.lrr: unknown key"):
        load_params(p, check_models=False)


def test_wrong_type_names_its_path(tmp_path):
    p = _write(tmp_path, lambda r: r["runs"]["wavenet-sc09"]["train"].update(lr="fast"))
    with pytest.raises(
        UserError, match=r"runs\.wavenet-sc09\.train\.lr: 'fast' is not of type 'number'"
    ):
        load_params(p, check_models=False)


def test_temperature_zero_is_greedy_and_negative_is_refused(tmp_path):
    p = _write(tmp_path, lambda r: r["sample_defaults"].update(temperature=0))
    assert load_params(p, check_models=False).run("sashimi-sc09").sample.temperature == 0
    p = _write(tmp_path, lambda r: r["sample_defaults"].update(temperature=-0.5))
    with pytest.raises(UserError, match=r"sample_defaults\.temperature: -0\.5"):
        load_params(p, check_models=False)


def test_missing_dataset_and_missing_run(tmp_path):
    p = _write(tmp_path, lambda r: r["runs"]["wavenet-sc09"].update(dataset="nope"))
    with pytest.raises(UserError, match=r"runs\.wavenet-sc09\.dataset: 'nope'"):
        load_params(p, check_models=False)
    P = load_params(PARAMS, check_models=False)
    with pytest.raises(UserError, match=r"runs\.no-such-run: no such run"):
        P.run("no-such-run")


def test_unknown_model_keyword(tmp_path):
    pytest.importorskip("sashimi.models.wavenet")
    p = _write(tmp_path, lambda r: r["runs"]["wavenet-sc09"]["model"].update(layerz=3))
    with pytest.raises(UserError, match=r"runs\.wavenet-sc09\.model\.layerz: unknown keyword"):
        load_params(p)


def test_bad_scale_and_bad_yaml(tmp_path):
    p = _write(tmp_path, lambda r: r.update(scale="huge"))
    with pytest.raises(UserError, match=r"scale"):
        load_params(p, check_models=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("runs: [\n")
    with pytest.raises(UserError, match=r"invalid YAML"):
        load_params(bad)
    with pytest.raises(UserError, match=r"file not found"):
        load_params(tmp_path / "missing.yaml")


def test_resolve_scale_merges_and_drops_blocks():
    obj = {"a": 1, "b": {"c": 2, "d": 3}, "demo": {"b": {"c": 20}}, "paper": {"a": 100}}
    assert resolve_scale(obj, "demo") == {"a": 1, "b": {"c": 20, "d": 3}}
    assert resolve_scale(obj, "paper") == {"a": 100, "b": {"c": 2, "d": 3}}


def test_flat_config_is_scalar():
    P = load_params(PARAMS, check_models=False)
    flat = P.flat("sashimi-sc09")
    assert flat["model.d_model"] == P.run("sashimi-sc09").model["d_model"]
    assert all(not isinstance(v, (dict, list)) for v in flat.values())


def test_example_params_files_validate():
    """examples/*.yaml (e.g. the FSDD SaShiMi-vs-WaveNet comparison) load through the same schema."""
    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "examples").glob("*.yaml"))
    assert files
    for f in files:
        P = load_params(f)
        assert P.runs, f
    P = load_params(root / "examples" / "fsdd.yaml")
    assert P.run("sashimi-fsdd").compile == "always"
    assert P.run("wavenet-fsdd").compile == "auto"


def test_s4_compile_mode_is_set_on_the_model_not_the_environment(monkeypatch):
    from sashimi.models.sashimi import SaShiMi
    from sashimi.ssm import kernels

    monkeypatch.setenv("SASHIMI_COMPILE", "1")  # no longer read
    m = SaShiMi(d_model=8, n_layers=1)
    kernels.set_compile_mode(m, "never")
    modes = [x.compile_mode for x in m.modules() if hasattr(x, "compile_mode")]
    # 3 stages of [S4, FF]: per stage an S4Block, its S4Kernel and two ChannelNorms
    assert len(modes) == 3 * 4 and set(modes) == {"never"}
    assert not kernels.compile_enabled("never", 1 << 30, "cpu")
    assert kernels.compile_enabled("always", 1, "cpu") or kernels._compile_broken
    assert not kernels.compile_enabled("auto", 1 << 30, "cpu")  # auto: CUDA only
    with pytest.raises(UserError, match="sometimes"):
        kernels.set_compile_mode(m, "sometimes")


def test_val_every_epoch_and_max_epochs(tmp_path):
    def mutate(r):
        r["runs"]["sashimi-sc09"]["train"].update(val_every="epoch", max_epochs=3)

    P = load_params(_write(tmp_path, mutate), scale="paper", check_models=False)
    tc = P.run("sashimi-sc09").train
    assert tc.val_every == "epoch" and tc.max_epochs == 3
    p = _write(tmp_path, lambda r: r["runs"]["sashimi-sc09"]["train"].update(val_every="weekly"))
    with pytest.raises(UserError, match=r"runs\.sashimi-sc09\.train\.val_every: 'weekly'"):
        load_params(p, check_models=False)
    p = _write(tmp_path, lambda r: r["runs"]["sashimi-sc09"]["train"].update(max_epochs=0))
    with pytest.raises(UserError, match=r"runs\.sashimi-sc09\.train\.max_epochs: 0"):
        load_params(p, check_models=False)
