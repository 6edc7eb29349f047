"""Official SaShiMi checkpoints -> ours: the fixture's logits (conv and step), key layouts, errors, CLI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from sashimi.cli import main
from sashimi.config import ROOT
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
