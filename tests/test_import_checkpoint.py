"""Official SaShiMi checkpoints -> ours: the fixture's logits (conv and step), key layouts, errors, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import ROOT  # tests/ is on sys.path
from sashimi.cli import main
from sashimi.errors import UserError
from sashimi.import_checkpoint import convert_state_dict, load_into_model
from sashimi.ssm.s4 import convert_v3_kernel_state


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    return torch.load(fixtures_dir / "sashimi_small.pt", weights_only=True)


def _sd(fx, prefix: str = "state_dict.") -> dict:
    return {k[len(prefix) :]: v for k, v in fx.items() if k.startswith(prefix)}


def _model(fx, prefix="state_dict.", dtype=torch.float64):
    our, kw = convert_state_dict(_sd(fx, prefix))
    return load_into_model(our, kw).to(dtype).eval()


def _steps(model, x, T, fused=False):
    model.setup_step(fused=fused)
    state = model.default_state(x.shape[0])
    out = []
    for t in range(T):
        y, state = model.step(x[:, t], state)
        out.append(y)
    return torch.stack(out, 1)


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


# ----------------------------------------------------------------------------- fixture logits


def test_inferred_kwargs_and_param_count(fx):
    _, kw = convert_state_dict(_sd(fx))
    assert kw == dict(d_model=16, n_layers=2, pool=[4, 4], expand=2, ff=2, glu=True, d_state=64,
                      bidirectional=False, unet=False, n_classes=256)  # fmt: skip
    m = load_into_model(*convert_state_dict(_sd(fx)))
    assert sum(p.numel() for p in m.parameters()) == fx["params_total_small"]


def test_conv_logits_fp64_and_fp32(fx):
    x = fx["x"]
    with torch.no_grad():
        y64 = _model(fx, dtype=torch.float64)(x)
        y32 = _model(fx, dtype=torch.float32)(x)
    assert _err(y64, fx["logits_conv_fp64"]) < 1e-8
    assert _err(y32, fx["logits_conv_fp64"]) < 1e-4
    assert _err(y32, fx["logits_conv_fp32"]) < 1e-4


@pytest.mark.parametrize("fused", [False, True])
def test_step_logits_fp64_and_fp32(fx, fused):
    x, T = fx["x"], int(fx["T_step"])
    m64, m32 = _model(fx, dtype=torch.float64), _model(fx, dtype=torch.float32)
    assert _err(_steps(m64, x, T, fused), fx["logits_step_fp64"]) < 1e-8
    assert _err(_steps(m32, x, T, fused), fx["logits_step_fp32"]) < 1e-4
    if fused:  # conjugate pairs were merged: fewer modes than N = 64
        assert all(c.fused and c.M < 64 for c in m64._stepper.up_chains)


def test_from_init_state_dict(fx):
    """l_kernel = 0 (raw C): same logits up to the official float32 C~ conversion (1.8e-6)."""
    m = _model(fx, "state_dict_init.", torch.float64)
    x = fx["x"]
    with torch.no_grad():
        assert _err(m(x), fx["logits_conv_fp64"]) < 1e-5
    assert _err(_steps(_model(fx, "state_dict_init."), x, 64), fx["logits_step_fp64"]) < 1e-5


def test_causal_on_fixture_model(fx):
    m = _model(fx)
    x = fx["x"].clone()
    with torch.no_grad():
        base = m(x)
        x[:, 300] = (x[:, 300] + 1) % 256
        assert _err(m(x)[:, :300], base[:, :300]) < 1e-12


# ----------------------------------------------------------------------------- layouts


def _to_v2(sd: dict) -> dict:
    """Rewrite the v4 fixture state dict in the v2/v3 key layout (paper-era checkpoints)."""
    out = {}
    for k, v in sd.items():
        if k == "encoder.0.weight":
            out["encoder.weight"] = v
            continue
        if k.startswith("decoder.0."):
            out["decoder." + k[len("decoder.0.") :]] = v
            continue
        if ".layer.layer.kernel." in k:
            pre, name = k.split(".layer.layer.kernel.")
            pre += ".layer.kernel.kernel."
            if name == "inv_dt":
                out[pre + "log_dt"] = torch.log(F.softplus(v.double())).float()[:, 0]  # (H,)
            elif name == "A_real":
                out[pre + "inv_w_real"] = v
            elif name == "A_imag":
                out[pre + "w_imag"] = -v
            elif name == "l_kernel":
                out[pre + "L"] = v
            else:
                out[pre + name] = v
            continue
        if k.endswith(".layer.layer.D"):
            out[k.replace(".layer.layer.D", ".layer.D")] = v
            continue
        if k.startswith("model.") and k.endswith(".bias") and ".norm." not in k:
            v = v[:, None]  # v2 TransposedLinear keeps its bias as (d_out, 1)
        out[k] = v
    return out


def test_v2_layout_converts_to_the_same_model(fx):
    v4, kw4 = convert_state_dict(_sd(fx))
    v2, kw2 = convert_state_dict(_to_v2(_sd(fx)))
    assert kw2 == kw4 and v2.keys() == v4.keys()
    for k in v4:
        torch.testing.assert_close(v2[k].double(), v4[k].double(), atol=1e-6, rtol=1e-5)
    # agrees with the S4 layer's own v3 converter
    pre = "model.c_layers.0.layer.kernel.kernel."
    theirs = convert_v3_kernel_state(
        {k: v for k, v in _to_v2(_sd(fx)).items() if k.startswith(pre)}
    )
    for name, v in theirs.items():
        torch.testing.assert_close(v2[f"c_layers.0.layer.kernel.{name}"], v)
    x = fx["x"][:, :64]
    with torch.no_grad():
        a = load_into_model(v2, kw2).double()(x)
        b = load_into_model(v4, kw4).double()(x)
    assert _err(a, b) < 1e-6


def test_lightning_ckpt_and_log_w_real(fx):
    sd = _to_v2(_sd(fx))
    sd = {k.replace("inv_w_real", "log_w_real"): v for k, v in sd.items()}
    our, kw = convert_state_dict({"state_dict": sd, "epoch": 3} | {})
    assert kw["d_model"] == 16 and "c_layers.0.layer.kernel.A_real" in our


def test_unexpected_and_missing_keys_are_named(fx):
    sd = _sd(fx)
    with pytest.raises(UserError, match="model.c_layers.0.layer.bogus"):
        convert_state_dict(dict(sd, **{"model.c_layers.0.layer.bogus": torch.zeros(1)}))
    with pytest.raises(UserError, match="optimizer_thing"):
        convert_state_dict(dict(sd, optimizer_thing=torch.zeros(1)))
    sd2 = dict(sd)
    del sd2["model.u_layers.1.2.layer.ff.2.bias"]
    our, kw = convert_state_dict(sd2)
    with pytest.raises(UserError, match=r"missing keys: u_layers\.1\.2\.layer\.linear2\.bias"):
        load_into_model(our, kw)
    with pytest.raises(UserError, match="cannot infer"):
        convert_state_dict({k: v for k, v in sd.items() if not k.startswith("encoder")})


# ----------------------------------------------------------------------------- CLI


def test_cli_writes_trainer_checkpoint(fx, tmp_path, capsys):
    src = tmp_path / "official.ckpt"
    torch.save({"state_dict": _sd(fx), "global_step": 10}, src)
    out = tmp_path / "run" / "checkpoints" / "imported.pt"
    assert main(["import-checkpoint", "--src", str(src), "--out", str(out)]) == 0
    assert "111,128 parameters" in capsys.readouterr().out
    ck = torch.load(out, weights_only=True)
    assert {"model", "model_name", "model_kwargs", "kind", "step", "config"} <= ck.keys()
    assert (
        ck["model_name"] == "sashimi" and ck["kind"] == "ar" and ck["model_kwargs"]["glu"] is True
    )
    assert ck["best_val"] == math.inf
    from sashimi.models import build_model

    m = build_model(ck["model_name"], **ck["model_kwargs"])
    m.load_state_dict(ck["model"])
    with torch.no_grad():
        assert _err(m.double()(fx["x"]), fx["logits_conv_fp64"]) < 1e-8
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temp file


def test_cli_errors(fx, tmp_path, capsys):
    assert (
        main(
            [
                "import-checkpoint",
                "--src",
                str(tmp_path / "nope.pt"),
                "--out",
                str(tmp_path / "o.pt"),
            ]
        )
        == 2
    )
    assert "nope.pt: file not found" in capsys.readouterr().err
    src = tmp_path / "official.pt"
    torch.save(_sd(fx), src)
    assert main(["import-checkpoint", "--src", str(src)]) == 2
    assert "--out" in capsys.readouterr().err


def _params(tmp_path, **model) -> str:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    run = raw["runs"]["sashimi-sc09"]
    run["model"].update(model)
    run.pop("demo", None)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


def test_cli_config_from_run(fx, tmp_path, capsys, monkeypatch):
    src = tmp_path / "official.pt"
    torch.save(_sd(fx), src)
    monkeypatch.chdir(tmp_path)
    bad = _params(tmp_path, d_model=64, n_layers=2, glu=True)
    assert (
        main(
            [
                "--params",
                bad,
                "import-checkpoint",
                "--src",
                str(src),
                "--config-from-run",
                "sashimi-sc09",
            ]
        )
        == 2
    )
    assert "model.d_model: 64 does not match the checkpoint (16)" in capsys.readouterr().err
    good = _params(tmp_path, d_model=16, n_layers=2, glu=True)
    assert (
        main(
            [
                "--params",
                good,
                "import-checkpoint",
                "--src",
                str(src),
                "--config-from-run",
                "sashimi-sc09",
            ]
        )
        == 0
    )
    ck = torch.load(
        tmp_path / "results/runs/sashimi-sc09/checkpoints/imported.pt", weights_only=True
    )
    assert ck["config"]["key"] == "sashimi-sc09" and ck["model_kwargs"]["dropout"] == 0.0


# ----------------------------------------------------------------------------- released kinds
# Each fixture is saved in the format its release uses, imported through the CLI into a run of
# a temporary params.yaml, checked against the official outputs, then sampled and evaluated.

_RUNS = {  # run key -> (kind, model block, fixture file)
    "sashimi": ("ar", dict(name="sashimi", d_model=16, n_layers=2, pool=[4, 4], expand=2,
                           ff=2, glu=True), "sashimi_small.pt"),
    "wavenet": ("ar", dict(name="wavenet", layers=3, blocks=2, residual_channels=8,
                           dilation_channels=8, skip_channels=16, end_channels=16),
                "wavenet_small.pt"),
    "samplernn": ("ar", dict(name="samplernn", frame_sizes=[4, 2], n_rnn=1, d_hidden=32,
                             d_model=16), "samplernn_small.pt"),
    "dw-wavenet": ("diffusion", dict(name="diffwave", backbone="wavenet", res_channels=8,
                                     skip_channels=8, num_res_layers=4, dilation_cycle=2),
                   "diffwave_small.pt"),
    "dw-sashimi": ("diffusion", dict(name="diffwave", backbone="sashimi", d_model=8,
                                     n_layers=2, pool=[4, 4], expand=2, ff=2), "diffwave_small.pt"),
}  # fmt: skip


def _lightning_ckpt(path, sd: dict, model_cfg: dict) -> None:
    """A Lightning-style .ckpt as the s4 repo writes it: hyper_parameters is an omegaconf DictConfig."""
    omegaconf = pytest.importorskip("omegaconf")
    hp = omegaconf.OmegaConf.create({"model": model_cfg, "trainer": {"max_epochs": 1}})
    torch.save({"state_dict": sd, "hyper_parameters": hp, "hparams_type": type(hp),
                "epoch": 1, "global_step": 5, "pytorch-lightning_version": "1.5.10"}, path)  # fmt: skip


def _release_file(tmp_path, key: str, fx: dict):
    """(path of the fixture in its release format, official outputs to compare with)."""
    if key.startswith("dw-"):  # diffwave-sashimi train.py: {model_state_dict, optimizer_state_dict}
        b = key[3:]
        src = tmp_path / f"{b}_1000.pkl"
        opt = {"state": {}, "param_groups": [{"lr": 2e-4, "params": [0]}]}
        torch.save(
            {"model_state_dict": _sd(fx, f"{b}.state_dict."), "optimizer_state_dict": opt}, src
        )
        return src, (
            fx[f"{b}.x_t"],
            fx[f"{b}.diffusion_steps"].flatten(),
            fx[f"{b}.eps_theta_fp32"],
        )
    src = tmp_path / f"{key}.ckpt"
    model_cfg = {"_name_": key} | {k: v for k, v in _RUNS[key][1].items() if k != "name"}
    _lightning_ckpt(src, _sd(fx), model_cfg)
    if key == "wavenet":
        return src, (fx["wavenet_x"], fx["wavenet_logits_conv_fp32"])
    if key == "samplernn":
        return src, (fx["samplernn_x"], fx["samplernn_logits_conv_fp32"])
    return src, (fx["x"], fx["logits_conv_fp32"])


@pytest.mark.parametrize("key", list(_RUNS))
def test_released_kind_imports_samples_and_evaluates(key, fixtures_dir, tmp_path, monkeypatch):
    from sashimi.checkpoints import load_model
    from test_train import cli, setup_workdir, write_params

    kind, model, fname = _RUNS[key]
    fx = torch.load(fixtures_dir / fname, weights_only=True)
    src, (*inputs, expected) = _release_file(tmp_path, key, fx)
    (tmp_path / "work").mkdir()
    work = setup_workdir(tmp_path / "work", monkeypatch)
    sample = {"sampler": "fast", "fast_steps": 2, "n": 4, "seconds": 0.01, "batch_size": 4}
    write_params(work, {key: {"kind": kind, "dataset": "tiny", "model": model, "sample": sample}})
    # the released classifier, imported too: scores the diffusion samples below
    clf_src = tmp_path / "resnext.pth"
    clf_src.write_bytes(torch.load(fixtures_dir / "sc09_classifier_official.pt",
                                   weights_only=True)["pickled_wrapped_bytes"].numpy().tobytes())  # fmt: skip
    assert cli("import-checkpoint", "--src", str(clf_src), "--out", "clf.pt") == 0

    assert cli("import-checkpoint", "--src", str(src), "--config-from-run", key) == 0
    m, ck = load_model(work / "results/runs" / key)
    assert ck["path"].endswith("imported.pt") and ck["kind"] == kind
    with torch.no_grad():
        assert _err(m(*inputs), expected) < 1e-4  # the official outputs, through the import
    assert cli("sample", "--run", key) == 0
    assert len(list((work / "results/runs" / key / "samples").glob("*.wav"))) == 4
    metrics = "nll" if kind == "ar" else "sc09"
    assert cli("evaluate", "--run", key, "--metrics", metrics, "--classifier", "clf.pt") == 0
    res = json.loads((work / "results/runs" / key / "metrics.json").read_text())
    if kind == "ar":
        assert math.isfinite(res["nll_bits"]) and 0 < res["nll_bits"] < 12
    else:
        assert res["n_scored"] == 4 and math.isfinite(res["is"]) and res["is"] >= 1.0


def test_kind_detection_and_errors(fixtures_dir, tmp_path, capsys):
    from sashimi.import_checkpoint import detect_kind

    fx = torch.load(fixtures_dir / "wavenet_small.pt", weights_only=True)
    assert detect_kind(_sd(fx)) == "wavenet"
    with pytest.raises(UserError, match="give --model NAME"):
        detect_kind({"foo.weight": torch.zeros(1)}, "x.pt")
    # no hyper-parameters and 6 layers: the dilation cycle cannot be told from the weights
    src = tmp_path / "wavenet.pt"
    torch.save(_sd(fx), src)
    assert main(["import-checkpoint", "--src", str(src), "--out", str(tmp_path / "o.pt")]) == 2
    assert "layers per block" in capsys.readouterr().err
    # --model names the kind: a SaShiMi reading of WaveNet keys fails naming them
    argv = ["import-checkpoint", "--src", str(src), "--model", "sashimi", "--out", "o.pt"]
    assert main(argv) == 2
    assert (
        "unexpected keys for a SaShiMi checkpoint: model.filter_convs.0.weight"
        in capsys.readouterr().err
    )
