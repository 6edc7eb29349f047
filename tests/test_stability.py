"""The stability ablation: the unconstrained S4 (untied P, Q; free Re Lambda) and its measurement."""

from __future__ import annotations

import csv

import pytest
import torch

from conftest import ROOT  # tests/ is on sys.path
from sashimi.config import load_params
from sashimi.errors import UserError
from sashimi.io import write_json
from sashimi.models.sashimi import SaShiMi
from sashimi.optim import ssm_parameters
from sashimi.ssm.s4 import S4Block, S4Kernel
from sashimi.ssm.s4_unconstrained import UnconstrainedS4Kernel, spectral_radius, with_ssm
from sashimi.stability import bucket_edges, measure, rollout, write_stability_table

torch.set_num_threads(1)


def _untie(kernel: UnconstrainedS4Kernel, shift: float, seed: int = 0) -> None:
    """Move Q away from P and Re Lambda by `shift` (what training may do to the unconstrained model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        kernel.Q.add_(0.3 * torch.randn(kernel.Q.shape, generator=g))
        kernel.Lambda_real.add_(shift)


def _conj_ext(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.conj()], dim=-1)


def test_unconstrained_kernel_equals_recurrent_unrolling():
    torch.manual_seed(0)
    k = UnconstrainedS4Kernel(3, N=8, channels=2)
    _untie(k, shift=0.3)
    dA, dB = k.discrete_dense()  # (H, N, N), (H, N)
    C = _conj_ext(torch.view_as_complex(k.C.double()))  # (c, H, N)
    x, ref = dB, []
    for _ in range(41):  # impulse response of x_l = A-bar x_{l-1} + B-bar u_l, y_l = C x_l
        ref.append(torch.einsum("chn,hn->ch", C, x).real)
        x = torch.einsum("hnm,hm->hn", dA, x)
    ref = torch.stack(ref, dim=-1)  # (c, H, L)
    K = k(41).double()
    assert K.shape == (2, 3, 41)
    torch.testing.assert_close(K, ref, rtol=1e-5, atol=1e-6)


def test_unconstrained_block_convolution_equals_its_recurrence():
    torch.manual_seed(1)
    block = with_ssm(S4Block(4, d_state=8), "unconstrained")
    _untie(block.kernel, shift=0.2, seed=1)
    u = torch.randn(2, 70, 4)
    y = block(u)  # (B, L, H), convolution mode
    y.sum().backward()
    assert block.kernel.Q.grad is not None and block.kernel.Lambda_real.grad is not None
    block.setup_step(mode="dense")
    state, ys = block.default_state(2), []
    for t in range(u.shape[1]):
        yt, state = block.step(u[:, t], state)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, dim=1), y.detach(), rtol=1e-4, atol=1e-5)


def test_unconstrained_model_starts_as_ours_and_trains_its_own_parameters():
    torch.manual_seed(0)
    ours = SaShiMi(d_model=8, n_layers=1)
    torch.manual_seed(0)
    unc = SaShiMi(d_model=8, n_layers=1, ssm="unconstrained")
    x = torch.randint(0, 256, (1, 64))
    torch.testing.assert_close(unc(x), ours(x), rtol=1e-4, atol=1e-5)  # same init, same function
    kernels = [m for m in unc.modules() if isinstance(m, S4Kernel)]
    assert kernels and all(isinstance(k, UnconstrainedS4Kernel) for k in kernels)
    ssm = ssm_parameters(unc)  # Q and Lambda_real get the SSM learning rate, no weight decay
    assert all(id(k.Q) in ssm and id(k.Lambda_real) in ssm for k in kernels)
    assert not any(hasattr(k, "A_real") for k in kernels)
    with pytest.raises(UserError, match="model.ssm"):
        SaShiMi(d_model=8, n_layers=1, ssm="free")


def test_our_state_stays_bounded_for_any_parameters():
    """Re Lambda < 0 and Q = P make A-bar a strict contraction: |x_t| <= |B-bar| / (1 - |A-bar|)."""
    torch.manual_seed(2)
    k = S4Kernel(4, N=16)
    with torch.no_grad():  # far from the initialisation, as after long training
        k.A_real.normal_(0, 2.0)
        k.A_imag.normal_(0, 50.0)
        k.P.normal_(0, 3.0)
        k.B.normal_(0, 3.0)
        k.inv_dt.normal_(0, 3.0)
    dA, dB = k.discrete_dense()
    norm = torch.linalg.matrix_norm(dA, ord=2)  # (H,)
    assert float(norm.max()) < 1 and spectral_radius(k) < 1
    bound = torch.linalg.vector_norm(dB, dim=-1) / (1 - norm)  # (H,), for |u_t| <= 1
    x, peak = torch.zeros_like(dB), torch.zeros(4, dtype=torch.float64)
    for _ in range(20000):
        u = torch.rand(4, dtype=torch.float64) * 2 - 1
        x = torch.einsum("hnm,hm->hn", dA, x) + dB * u[:, None]
        peak = torch.maximum(peak, torch.linalg.vector_norm(x, dim=-1))
    assert torch.all(peak <= bound * (1 + 1e-9))


def _tiny(ssm: str, shift: float = 0.0) -> SaShiMi:
    torch.manual_seed(0)
    model = SaShiMi(d_model=8, n_layers=1, d_state=8, ssm=ssm).eval()
    for m in model.modules():
        if isinstance(m, UnconstrainedS4Kernel):
            _untie(m, shift)
    return model


def test_rollout_measures_bounded_and_diverging_models():
    ours = rollout(_tiny("stable"), steps=320, buckets=4)
    assert ours["edges"] == bucket_edges(320, 4) == [0, 80, 160, 240, 320]
    assert all(v is not None and v < 1e3 for v in ours["max_state"])
    assert ours["nonfinite"] == [0.0] * 4 and ours["first_nonfinite_step"] is None
    unstable = _tiny("unconstrained", shift=1.0)  # Re Lambda > 0: eigenvalues leave the unit disc
    assert spectral_radius(unstable) > 1 > spectral_radius(_tiny("stable"))
    grown = rollout(unstable, steps=320, buckets=4)
    first, last = grown["max_state"][0], grown["max_state"][-1]
    assert last is None or last > 100 * first


def test_table_and_figure_are_written(tmp_path):
    models = []
    for role, model in (
        ("stable", _tiny("stable")),
        ("unconstrained", _tiny("unconstrained", 1.0)),
    ):
        entry = {"role": role, "run": f"run-{role}", "label": "SaShiMi", "ssm": role,
                 "train_step": 0, "spectral_radius": spectral_radius(model)}  # fmt: skip
        entry.update(rollout(model, steps=160, buckets=4))
        models.append(entry)
    result = {"run": "run-unconstrained", "steps": 160, "buckets": 4, "models": models}
    write_json(tmp_path / "runs" / "run-unconstrained" / "stability.json", result)
    paths = write_stability_table(tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["stability.csv", "stability.md", "stability.png", "stability.tex"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    rows = list(csv.DictReader((tmp_path / "tables" / "stability.csv").open()))
    assert len(rows) == 8 and {r["steps"] for r in rows} == {"0-39", "40-79", "80-119", "120-159"}
    assert rows[0]["max abs(state)"] != "inf/nan"  # ours: finite throughout
    md = (tmp_path / "tables" / "stability.md").read_text()
    assert "(unconstrained)" in md and "can diverge in recurrent mode" in md
    assert "\\begin{tabular}" in (tmp_path / "tables" / "stability.tex").read_text()
    assert write_stability_table(tmp_path / "empty") == []


def test_measure_needs_a_stability_block():
    P = load_params(ROOT / "params.yaml", check_models=False)
    with pytest.raises(UserError, match=r"runs\.sashimi-sc09\.stability"):
        measure(P, "sashimi-sc09", torch.device("cpu"))
