"""The pykeops Cauchy sums against the naive oracle (the official materialised Cauchy tensor).

KeOps compiles every formula with the system C++ compiler on first use (cached under
~/.cache/keops*), so a cold first run takes minutes. The tests skip only when pykeops is not
installed or cannot compile, with the reason.
"""

from __future__ import annotations

import pytest
import torch

from sashimi.ssm import keops
from sashimi.ssm.kernels import cauchy_naive, dplr_kernel, official_nodes

pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module", autouse=True)
def _keops_works():
    reason = keops.unavailable_reason()
    if reason:
        pytest.skip(reason)


def _poles(H: int, N2: int) -> torch.Tensor:
    """Random stable poles w (Re w < 0), float64."""
    return torch.complex(
        -torch.rand(H, N2, dtype=torch.float64) - 0.05, 3 * torch.randn(H, N2, dtype=torch.float64)
    )


def test_cauchy_forward_matches_naive():
    H, N2, L = 3, 8, 64
    v = torch.randn(2, 3, H, N2, dtype=torch.complex128)  # broadcast over w's (H, N2)
    w = _poles(H, N2)
    _, z = official_nodes(L, torch.float64)  # (L/2 + 1,) incl. z = 0
    got, want = keops.cauchy(v, z, w), cauchy_naive(v, z, w)
    assert got.shape == want.shape == (2, 3, H, L // 2 + 1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_cauchy_backward_matches_naive():
    H, N2, K = 2, 6, 9
    z = torch.complex(torch.randn(K, dtype=torch.float64), torch.randn(K, dtype=torch.float64))
    v0, w0 = torch.randn(H, N2, dtype=torch.complex128), _poles(H, N2)
    weight = torch.randn(H, K, dtype=torch.complex128)
    grads = []
    for fn in (keops.cauchy, cauchy_naive):
        v, w = v0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = (fn(v, z, w) * weight).real.sum()  # mixes real and imaginary parts
        grads.append(torch.autograd.grad(loss, (v, w)))
    for got, want in zip(*grads, strict=True):
        assert got.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def _dplr(H: int, N2: int, ch: int):
    dtA = torch.complex(
        -torch.rand(H, N2, dtype=torch.float64) * 0.1 - 1e-3,
        torch.rand(H, N2, dtype=torch.float64) * 3,
    )
    B, P = (
        torch.randn(H, N2, dtype=torch.complex128),
        0.3 * torch.randn(H, N2, dtype=torch.complex128),
    )
    C = torch.randn(ch, H, N2, dtype=torch.complex128)
    dt = torch.rand(H, dtype=torch.float64) * 0.1 + 0.01
    return dtA, B, P, C, dt


@pytest.mark.parametrize("L", [64, 63])  # even L has the exact Nyquist node
def test_s4_kernel_keops_backend_matches_naive(L):
    """The whole DPLR kernel (Cauchy sums, Woodbury, inverse FFT): values and every gradient."""
    inputs = _dplr(H=3, N2=4, ch=2)
    weight = torch.randn(2, 3, L, dtype=torch.float64)
    results = []
    for backend in ("keops", "naive"):
        leaves = [x.clone().requires_grad_() for x in inputs]
        k = dplr_kernel(*leaves, L=L, backend=backend)  # (ch, H, L)
        results.append((k.detach(), torch.autograd.grad((k * weight).sum(), leaves)))
    (k_keops, g_keops), (k_naive, g_naive) = results
    assert k_keops.shape == (2, 3, L)
    # the naive path builds its nodes from powers of omega: agreement to ~1e-9 in float64
    torch.testing.assert_close(k_keops, k_naive, rtol=1e-7, atol=1e-9)
    for name, got, want in zip(("dtA", "B", "P", "C", "dt"), g_keops, g_naive, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8, msg=f"d/d{name}")


def test_bench_cauchy_reports_both_backends():
    from sashimi.bench_cauchy import bench_cauchy

    out = bench_cauchy(H=4, L=256, N=8, repeats=1)
    for backend in ("torch", "keops"):
        assert out[backend]["forward_s"] > 0 and out[backend]["forward_backward_s"] > 0
    assert out["keops_over_torch"] > 0
