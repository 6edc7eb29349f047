"""S4 layer: official fixtures (kernel, C~, discretisation, block conv/step), step == conv, stability."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from sashimi.errors import UserError
from sashimi.optim import ssm_parameters
from sashimi.ssm import kernels
from sashimi.ssm.s4 import (
    S4Block,
    S4Kernel,
    convert_v3_s4_state,
    hippo_legs,
    hippo_legs_nplr,
    official_s4_key,
)

KERNEL_KEYS = ("inv_dt", "C", "B", "A_real", "A_imag", "P", "l_kernel")


@contextlib.contextmanager
def single_thread():
    """Recurrent steps are tiny ops: run them on one thread (on a busy 2-core box, 2 threads only contend)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(n)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the max abs reference value."""
    a, b = a.detach(), b.detach()
    if a.is_complex() or b.is_complex():
        a, b = a.to(torch.complex128), b.to(torch.complex128)
    else:
        a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def load(fixtures_dir, name):
    path = fixtures_dir / name
    if not path.exists():
        pytest.skip(f"{path} is missing")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def kfix(fixtures_dir):
    return load(fixtures_dir, "s4_dplr_kernel.pt")


@pytest.fixture(scope="module")
def bfix(fixtures_dir):
    return load(fixtures_dir, "s4_block_conv_vs_step.pt")


def kernel_from_fixture(d, backend="auto", dtype=torch.float64) -> S4Kernel:
    k = S4Kernel(4, backend=backend)
    k.load_state_dict({name: d["init." + name] for name in KERNEL_KEYS})
    return k.to(dtype)


def perturbed_kernel(
    H=3, N=16, channels=1, n_ssm=1, scale=0.3, seed=0, dtype=torch.float64
) -> S4Kernel:
    """A kernel with generic (non-init) parameters: every SSM parameter moved by N(0, scale^2)."""
    torch.manual_seed(seed)
    k = S4Kernel(H, N=N, channels=channels, n_ssm=n_ssm).to(dtype)
    with torch.no_grad():
        for p in k.parameters():
            p.add_(scale * torch.randn_like(p))
    return k


def krylov_kernel(k: S4Kernel, L: int) -> torch.Tensor:
    """Dense reference K[c, h, l] = Re(C_ext A-bar^l B-bar) with the RAW C (l_kernel must be 0)."""
    assert int(k.l_kernel) == 0
    dA, dB = k.discrete_dense()  # (H, N, N), (H, N)
    C = torch.cat(
        [torch.view_as_complex(k.C.double()), torch.view_as_complex(k.C.double()).conj()], -1
    )
    x, out = dB, []
    for _ in range(L):
        out.append(torch.einsum("chn,hn->ch", C, x).real)
        x = torch.einsum("hmn,hn->hm", dA, x)
    return torch.stack(out, -1)  # (c, H, L)


# ------------------------------------------------------------------------------------------------
# 1. s4_dplr_kernel.pt: initialisation, kernels, C~, doubling, discretisation
# ------------------------------------------------------------------------------------------------


def test_init_reproduces_official_seed(kfix):
    """Same RNG draws in the same order as the official SSMKernelDPLR: seed 0 gives its init."""
    torch.manual_seed(0)
    k = S4Kernel(4)
    assert torch.equal(k.inv_dt, kfix["init.inv_dt"]) and torch.equal(k.C, kfix["init.C"])
    # From an eigendecomposition: equal up to LAPACK and float32 rounding.
    for name in ("B", "P", "A_real", "A_imag"):
        assert rel(getattr(k, name), kfix["init." + name]) < 1e-5, name
    assert int(k.l_kernel) == 0
    Lambda, P, B, V = hippo_legs_nplr(64)
    assert rel(Lambda, kfix["Lambda"][0]) < 1e-7 and rel(B, kfix["B_complex"][0, 0]) < 1e-5
    # NPLR identity: with the conjugate half restored, V (diag(Lambda) - P P^*) V^* = HiPPO-LegS.
    A, B_legs = hippo_legs(64)
    ext = lambda x: torch.cat([x, x.conj()], -1)  # noqa: E731
    V = ext(V)  # (N, N), unitary
    assert rel(V.conj().T @ V, torch.eye(64, dtype=V.dtype)) < 1e-12
    A_dplr = torch.diag(ext(Lambda)) - ext(P)[:, None] * ext(P).conj()[None, :]
    assert rel(V @ A_dplr @ V.conj().T, A.to(V)) < 1e-12
    B_rot = V.conj().T @ B_legs.to(V)  # before the clip of Im B to [-2, 2]
    assert rel(B_rot.real[:32], B.real) < 1e-12 and (B.imag.abs() <= 2).all()


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_kernel_fixture_fp64(kfix, backend):
    k = kernel_from_fixture(kfix, backend)
    assert rel(k(256), kfix["K_L256_fp64"]) < 1e-10
    assert (
        rel(k.C, kfix["C_tilde_L256_fp64"]) < 1e-10
        and int(k.l_kernel) == kfix["l_kernel_after_L256"]
    )
    assert rel(k(512), kfix["K_L512_doubled_fp64"]) < 1e-10  # l_kernel doubles 256 -> 512
    assert (
        rel(k.C, kfix["C_tilde_L512_doubled_fp64"]) < 1e-10
        and int(k.l_kernel) == kfix["l_kernel_after_L512"]
    )
    assert rel(k(100), kfix["K_L512_doubled_fp64"][..., :100]) < 1e-10  # shorter requests truncate
    assert int(k.l_kernel) == 512
    direct = kernel_from_fixture(kfix, backend)
    assert rel(direct(512), kfix["K_L512_direct_fp64"]) < 1e-10  # 0 -> 512 directly
    assert rel(direct.C, kfix["C_tilde_L512_direct_fp64"]) < 1e-10
    assert rel(kfix["K_L256_krylov_fp64"], kfix["K_L256_fp64"]) < 1e-12


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_kernel_fixture_fp32(kfix, backend):
    """Native float32: within float32 noise of the fp64 truth (the fast path beats the official fp32)."""
    k = kernel_from_fixture(kfix, backend, torch.float32)
    noise = rel(kfix["K_L256_fp32"], kfix["K_L256_fp64"])  # official fp32 error
    assert k(256).dtype == torch.float32
    assert rel(k(256), kfix["K_L256_fp64"]) < max(3 * noise, 1e-5)
    assert rel(k.C, kfix["C_tilde_L256_fp64"]) < 1e-6
    assert rel(k(512), kfix["K_L512_doubled_fp64"]) < (1e-4 if backend == "naive" else 1e-5)
    if backend == "torch":
        assert rel(k(512), kfix["K_L512_doubled_fp64"]) < rel(
            kfix["K_L512_doubled_fp32"], kfix["K_L512_doubled_fp64"]
        )


def test_discretisation_and_C_recovery_fixture(kfix):
    k = kernel_from_fixture(kfix)
    dA, dB = k.discrete_dense()
    assert rel(dA, kfix["dA_fp64"]) < 1e-12 and rel(dB, kfix["dB_fp64"]) < 1e-12
    k(256)
    _, _, C = k.step_system()  # C recovered from C~ (official _setup_step)
    assert rel(C, kfix["dC_fp64"][0]) < 1e-10
    assert rel(C[..., :32], kfix["C_init_complex"][0]) < 1e-10


# ------------------------------------------------------------------------------------------------
# Fast backends against the naive oracle and a dense Krylov reference (generic parameters)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [64, 77])
@pytest.mark.parametrize("n_ssm", [1, 3])
def test_kernel_matches_krylov(L, n_ssm):
    k = perturbed_kernel(H=3, N=16, channels=2, n_ssm=n_ssm)
    ref = krylov_kernel(k, L)
    assert rel(k(L), ref) < 1e-10


def test_cauchy_backends_agree(monkeypatch):
    """Fused (run eagerly here) and chunked-matmul forms equal the materialised official sum, values and grads."""
    torch.manual_seed(0)
    M, H, N2, L = 4, 3, 8, 50
    v = torch.randn(M, H, N2, dtype=torch.complex128, requires_grad=True)
    w = torch.complex(
        -torch.rand(H, N2, dtype=torch.float64) - 0.01, 30 * torch.randn(H, N2, dtype=torch.float64)
    )
    w.requires_grad_(True)
    c, s = kernels.frequency_nodes(L, torch.float64)
    z = 2j * s[:-1] / c[:-1]  # finite nodes only (the oracle cannot take z = infinity)
    ref = kernels.cauchy_naive(v, z, w)  # (M, H, K-1)
    fused = torch.complex(*kernels._cauchy_fused(v.real, v.imag, w.real, w.imag, c, s))
    # Tiny chunks: several of them, in the forward and in the written-out backward.
    monkeypatch.setattr(kernels, "_EAGER_CHUNK_ELEMENTS", 40)
    monkeypatch.setattr(kernels, "_EAGER_BACKWARD_CHUNK_ELEMENTS", 60)
    chunked = torch.complex(*kernels._cauchy_eager(v.real, v.imag, w.real, w.imag, c, s))
    for out in (fused, chunked):
        assert rel(out[..., :-1] * c[:-1], ref) < 1e-12  # r = c * rho
    g = torch.randn_like(ref)
    grads = [
        torch.autograd.grad((out[..., :-1] * c[:-1] * g.conj()).real.sum(), (v, w))
        for out in (fused, chunked)
    ]
    gref = torch.autograd.grad((ref * g.conj()).real.sum(), (v, w))
    for gv, gw in grads:
        assert rel(gv, gref[0]) < 1e-10 and rel(gw, gref[1]) < 1e-10


def test_fast_and_naive_kernel_gradients_agree():
    """End-to-end kernel gradients w.r.t. every SSM parameter: fast backend vs the official algorithm."""
    grads = {}
    for backend in ("naive", "torch"):
        k = perturbed_kernel(H=2, N=8)
        k.backend = backend
        k(40)  # convert C -> C~ first (in place, no grad)
        w = torch.randn(1, 2, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        (k(40) * w).sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in k.named_parameters()}
    for n, g in grads["naive"].items():
        assert rel(grads["torch"][n], g) < 1e-9, n


@pytest.mark.slow
def test_compiled_path(monkeypatch):
    """torch.compile of the fused sums (cold compile takes tens of seconds on a CPU)."""
    monkeypatch.setattr(kernels, "_CPU_SUM_BLOCK", 8)  # the backward in 5 blocks of frequencies
    k = perturbed_kernel(H=3, N=16)
    k.compile_mode = "always"
    ref = krylov_kernel(k, 64)
    K = k(64)
    assert not kernels._compile_broken
    assert rel(K, ref) < 1e-10
    w = torch.randn_like(K)
    (K * w).sum().backward()  # the compiled, written-out backward
    assert not kernels._compile_broken
    naive = perturbed_kernel(H=3, N=16)
    naive.backend = "naive"
    naive(64)
    (naive(64) * w).sum().backward()
    for (name, p), q in zip(k.named_parameters(), naive.parameters(), strict=True):
        assert rel(p.grad, q.grad) < 1e-9, name


def test_benchmark_kernel_smoke():
    from sashimi.bench import benchmark_kernel

    out = benchmark_kernel(H=4, L=64, backend="naive", N=8, repeats=1)
    assert out["forward_s"] > 0 and out["forward_backward_s"] > 0 and out["backend"] == "naive"


def test_bad_backend():
    with pytest.raises(UserError, match="backend"):
        S4Block(4, backend="cuda-ext")


# ------------------------------------------------------------------------------------------------
# 2. s4_block_conv_vs_step.pt: the whole block, conv and step, fp64 and fp32
# ------------------------------------------------------------------------------------------------


def block_state(bfix, prefix="state_dict."):
    return {k[len(prefix) :]: v for k, v in bfix.items() if k.startswith(prefix)}


def test_block_init_reproduces_official_seed(bfix):
    torch.manual_seed(0)
    blk = S4Block(4, glu=True)
    ours = blk.state_dict()
    for key, v in block_state(bfix, "state_dict_init.").items():
        assert (
            rel(ours[official_s4_key(key)], v) < 1e-5
            if v.is_floating_point()
            else torch.equal(ours[official_s4_key(key)], v)
        )
    for key in (
        "layer.D",
        "layer.kernel.C",
        "layer.kernel.inv_dt",
        "output_linear.0.weight",
        "output_linear.0.bias",
    ):
        assert torch.equal(ours[official_s4_key(key)], bfix["state_dict_init." + key]), key


def run_steps(blk, x, mode="auto"):
    """x: (B, L, H) -> stepped outputs (B, L, H)."""
    blk.setup_step(mode)
    state, ys = blk.default_state(x.shape[0]), []
    with single_thread():
        for t in range(x.shape[1]):
            y, state = blk.step(x[:, t], state)
            ys.append(y)
    return torch.stack(ys, 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block_fixture(bfix, dtype):
    blk = S4Block(4, glu=True)
    blk.load_official_state_dict(block_state(bfix))
    blk = blk.to(dtype).eval()
    x = bfix["x"].to(dtype).transpose(1, 2)  # official layout (B, H, L) -> ours (B, L, H)
    y_ref = bfix["y_conv_fp64"].transpose(1, 2)
    tol = 1e-12 if dtype == torch.float64 else 5e-6
    assert rel(blk(x), y_ref) < tol
    assert rel(run_steps(blk, x, "dense"), bfix["y_step_fp64"].transpose(1, 2)) < tol
    # Float64 modal step: error ~ cond(V) * eps64 ~ 1e-9 (cond(V) = 1.7e8 at the HiPPO init).
    assert rel(run_steps(blk, x, "modal"), bfix["y_step_fp64"].transpose(1, 2)) < (
        1e-8 if dtype == torch.float64 else tol
    )
    # The pre-forward (raw C) state dict gives the same conv output (C -> C~ happens in place).
    fresh = S4Block(4, glu=True)
    fresh.load_official_state_dict(block_state(bfix, "state_dict_init."))
    assert rel(fresh.to(dtype)(x), y_ref) < 5e-6
    assert int(fresh.kernel.l_kernel) == 256


# ------------------------------------------------------------------------------------------------
# 3. Step == conv, causality, stability, bidirectional
# ------------------------------------------------------------------------------------------------


def test_step_matches_conv_long():
    """1024 recurrent steps of a float32 block with generic parameters reproduce the convolution."""
    torch.manual_seed(0)
    blk = S4Block(8, glu=False).eval()
    with torch.no_grad():
        for name in ("inv_dt", "A_real", "A_imag", "B", "P"):
            p = getattr(blk.kernel, name)
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(2, 1024, 8)
    y_conv = blk(x)
    assert rel(run_steps(blk, x), y_conv) < 1e-4
    assert blk._step_mode == "modal"


def test_real_step_equals_complex_step():
    """The real-arithmetic step (used under torch.compile) and the eager complex step agree."""
    torch.manual_seed(0)
    blk = S4Block(8).double().eval()
    blk.setup_step()
    s0 = torch.randn(3, 8, 65, 2, dtype=torch.float64)
    u = torch.randn(3, 8, dtype=torch.float64)
    y1, s1 = blk._step_modal_complex(u, s0)
    y2, s2 = blk._step_modal_real(u, s0)
    assert s1.shape == s0.shape and rel(s2, s1) < 1e-14 and rel(y2, y1) < 1e-14


def test_modal_form_reproduces_the_convolution_kernel():
    """S4Block.modal_form (what the fused generation engine steps): its impulse response
    Re(sum_m c_m lambda_m^l) is the convolution kernel K[l], and it carries D and the output layer."""
    torch.manual_seed(0)
    blk = S4Block(4, d_state=8, glu=True).double().eval()
    K = blk.kernel(32)[0]  # (H, L); C -> C~ at length 32
    form = blk.modal_form()
    assert form.stable and form.glu and form.lam.shape == form.c.shape == (4, 8)
    powers = form.lam.unsqueeze(-1) ** torch.arange(32, dtype=torch.float64)  # (H, N, L)
    assert rel((form.c.unsqueeze(-1) * powers).sum(1).real, K) < 1e-9
    assert torch.equal(form.D, blk.D.double()[0]) and torch.equal(form.W, blk.output_linear.weight)
    with pytest.raises(UserError, match="bidirectional"):
        S4Block(4, d_state=8, bidirectional=True).modal_form()


def test_causality():
    torch.manual_seed(0)
    blk = S4Block(4, glu=True)
    x = torch.randn(1, 300, 4, dtype=torch.float64)
    blk = blk.double()
    y0 = blk(x)
    x2 = x.clone()
    x2[:, 200] += 1.0
    y1 = blk(x2)
    assert (y1[:, :200] - y0[:, :200]).abs().max() < 1e-12
    assert (y1[:, 200] - y0[:, 200]).abs().max() > 1e-3


def heavily_perturbed(seed: int = 0) -> S4Block:
    """Every parameter moved by N(0, 5^2): dt up to softplus(+15), Lambda/P/B/C anywhere."""
    torch.manual_seed(seed)
    blk = S4Block(4, d_state=16)
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(5 * torch.randn_like(p))
    return blk.eval()


def test_stability_any_parameters():
    """Re Lambda < 0 and Q = conj(P) make A dissipative, so A-bar is a 2-norm contraction for ANY parameters."""
    for seed in range(3):
        dA, _ = heavily_perturbed(seed).kernel.discrete_dense()
        assert torch.linalg.matrix_norm(dA, ord=2).max() <= 1 + 1e-9
        assert torch.linalg.eigvals(dA).abs().max() < 1
    blk = heavily_perturbed(0)
    u = torch.randn(4096, 2, 4, generator=torch.Generator().manual_seed(0))
    # 4096 exact (dense) steps: |x_t| <= |B-bar| sum_s |u_s| because A-bar is a contraction.
    dA, dB, _ = blk.kernel.step_system()  # (H, N, N), (H, N)
    x = torch.zeros(4, dA.shape[-1], 2, dtype=torch.complex128)  # (H, N, batch)
    bu = dB[:, :, None] * u.permute(0, 2, 1)[:, :, None, :]  # (T, H, N, batch)
    with single_thread():
        for t in range(4096):
            x = torch.baddbmm(bu[t], dA, x)
    bound = dB.norm(dim=-1, keepdim=True) * u.abs().sum(0).T  # (H, batch)
    assert torch.isfinite(x).all() and (x.norm(dim=1) <= bound + 1e-9).all()
    # 4096 steps of the block's default recurrent mode stay finite and bounded as well.
    blk.setup_step()
    state, ys = blk.default_state(2), []
    with single_thread():
        for t in range(4096):
            y, state = blk.step(u[t], state)
            ys.append(y)
    ys = torch.stack(ys)
    assert torch.isfinite(state).all() and torch.isfinite(ys).all() and ys.abs().max() < 1e6


def unconstrained_dense(blk: S4Block, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A-bar, B-bar of the SAME perturbed parameters read without the stability fix: Re Lambda = -A_real
    (any sign) and an untied Q = conj(P) + N(0, 5^2) noise."""
    g = torch.Generator().manual_seed(seed)
    k = blk.kernel
    Lambda = torch.complex(-k.A_real.double(), -k.A_imag.double())[0]  # (N2,)
    P = torch.view_as_complex(k.P.double())[0, 0]
    Q = P.conj() + 5 * torch.randn(P.shape, dtype=torch.complex128, generator=g)
    ext = lambda x: torch.cat([x, x.conj()])  # noqa: E731
    A = torch.diag(ext(Lambda)) - ext(P)[:, None] * ext(Q).conj()[None, :]
    B = ext(torch.view_as_complex(k.B.double())[0, 0])
    dt = F.softplus(k.inv_dt.double())[:, :, None]  # (H, 1, 1)
    I = torch.eye(A.shape[0], dtype=A.dtype)
    dA = torch.linalg.solve(I - dt / 2 * A, I + dt / 2 * A)  # (H, N, N)
    dB = torch.linalg.solve(I - dt / 2 * A, (dt[..., 0] * B).unsqueeze(-1)).squeeze(-1)  # (H, N)
    return dA, dB


def test_unconstrained_parametrisation_blows_up():
    """Control for the stability test: without the constraints the same perturbation diverges."""
    blow_ups = 0
    for seed in range(3):
        dA, dB = unconstrained_dense(heavily_perturbed(seed), seed)
        x = torch.zeros(dB.shape, dtype=dB.dtype)
        u = torch.randn(
            4096, dB.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
        )
        with single_thread():
            for t in range(4096):
                x = torch.einsum("hmn,hn->hm", dA, x) + dB * u[t, :, None]
        blow_ups += int(not torch.isfinite(x).all() or x.abs().max() > 1e30)
        assert torch.linalg.eigvals(dA).abs().max() > 1
    assert blow_ups == 3


def test_bidirectional_two_sided_convolution():
    """y[t] = sum_s k0[s] u[t-s] + sum_s k1[s] u[t+1+s] + D u[t]: the official two-sided layout."""
    torch.manual_seed(0)
    blk = S4Block(3, d_state=16, bidirectional=True, n_ssm=3).double()
    assert blk.kernel.C.shape == (2, 3, 8, 2) and blk.D.shape == (1, 3)
    L = 40
    x = torch.randn(2, L, 3, dtype=torch.float64)
    k = perturbed_kernel(H=3, N=16, channels=2, n_ssm=3)
    blk.kernel.load_state_dict(k.state_dict())
    K = krylov_kernel(k, L)  # (2, H, L) dense reference with raw C
    t = torch.arange(L)
    lag = t[:, None] - t[None, :]  # (L, L): t - t'
    fwd, bwd = K[0][:, lag.clamp(min=0)], K[1][:, (-lag - 1).clamp(min=0)]  # (H, L, L) each
    T = torch.where(lag >= 0, fwd, bwd)  # (H, L, L) two-sided Toeplitz operator
    y_ref = torch.einsum("htu,buh->bth", T, x) + x * blk.D[0]
    assert rel(blk.fft_conv(x), y_ref) < 1e-10
    with pytest.raises(UserError, match="bidirectional"):
        blk.setup_step()


def test_parameter_count_and_names():
    """Paper SaShiMi S4 layer (n_ssm = 1, N = 64, no GLU) at H = 64, and the official parameter shapes."""
    blk = S4Block(64)
    shapes = {n: tuple(p.shape) for n, p in blk.named_parameters()}
    assert shapes == {
        "D": (1, 64),
        "kernel.inv_dt": (64, 1),
        "kernel.C": (1, 64, 32, 2),
        "kernel.B": (1, 1, 32, 2),
        "kernel.A_real": (1, 32),
        "kernel.A_imag": (1, 32),
        "kernel.P": (1, 1, 32, 2),
        "output_linear.weight": (64, 64),
        "output_linear.bias": (64,),
    }
    assert sum(p.numel() for p in blk.parameters()) == 8576
    assert sum(p.numel() for p in S4Block(64, glu=True).parameters()) == 8576 + 64 * 64 + 64
    assert blk.kernel.l_kernel.dtype == torch.int64 and "kernel.l_kernel" in blk.state_dict()
    ssm = {id(getattr(blk.kernel, n)) for n in ("inv_dt", "A_real", "A_imag", "B", "P")}
    assert ssm_parameters(blk) == ssm  # own lr, no weight decay (sashimi.optim)


# ------------------------------------------------------------------------------------------------
# 4. DiffWave-SaShiMi "S4 v3" conventions (n_ssm = H, bidirectional, log_dt / inv_w_real / w_imag)
# ------------------------------------------------------------------------------------------------


def test_v3_conversion_reproduces_official_C_tilde(fixtures_dir):
    """Loading the v3 init state and running one forward at the stage length must give the official C~."""
    d = load(fixtures_dir, "diffwave_small.pt")
    prefixes = sorted(
        k[: -len("kernel.kernel.L")]
        for k in d
        if k.startswith("sashimi.state_dict.") and k.endswith("kernel.kernel.L")
    )
    assert len(prefixes) == 10
    # One layer per stage: L = 256, 64, 16 with H = 8, 16, 32.
    one_per_stage = {int(d[p + "kernel.kernel.L"]): p for p in prefixes}
    strip = lambda prefix: {k[len(prefix) :]: v for k, v in d.items() if k.startswith(prefix)}  # noqa: E731
    for prefix in one_per_stage.values():
        init = strip(prefix.replace("state_dict.", "state_dict_init."))
        after = strip(prefix)
        H = init["D"].shape[1]
        L = int(after["kernel.kernel.L"])
        blk = S4Block(H, glu=True, bidirectional=True, n_ssm=H)
        blk.load_state_dict(convert_v3_s4_state(init))
        blk(torch.zeros(1, L, H))
        ours = convert_v3_s4_state(after)
        assert int(blk.kernel.l_kernel) == L
        # The official C~ was computed in float32 (dense powers of A-bar): float32-level agreement.
        assert rel(blk.kernel.C, ours["kernel.C"]) < 1e-4, prefix
        dt_v3 = torch.exp(after["kernel.kernel.log_dt"].double())
        assert rel(F.softplus(ours["kernel.inv_dt"].double())[:, 0], dt_v3) < 1e-6
        assert torch.equal(ours["kernel.A_imag"], -after["kernel.kernel.w_imag"])


@pytest.mark.parametrize("n_k", ["causal", "two-sided"])
def test_fftconv_matches_autograd_through_torch_fft(n_k):
    """The hand-written FFTConv backward (real transforms, conjugate spectra) equals autograd
    through torch.fft, for a causal (L lags) and a two-sided (2L lags) kernel, in float64."""
    from sashimi.ssm.s4 import FFTConv

    g = torch.Generator().manual_seed(3)
    B, L, H = 2, 37, 5
    n_k = L if n_k == "causal" else 2 * L
    x = torch.randn(B, L, H, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(H, n_k, generator=g, dtype=torch.float64, requires_grad=True)
    D = torch.randn(H, generator=g, dtype=torch.float64, requires_grad=True)

    def reference(x, k, D):  # direct circular convolution of size 2L, then crop
        xp = torch.nn.functional.pad(x.transpose(1, 2), (0, L))  # (B, H, 2L)
        kp = torch.nn.functional.pad(k, (0, 2 * L - n_k))  # (H, 2L)
        idx = (torch.arange(L)[:, None] - torch.arange(2 * L)[None, :]) % (2 * L)  # (L, 2L)
        y = (xp[:, :, idx] * kp[None, :, None, :]).sum(-1)  # (B, H, L)
        return y.transpose(1, 2) + x * D

    y = FFTConv.apply(x, k, D)
    y_ref = reference(x, k, D)
    assert (y - y_ref).abs().max() < 1e-12
    w = torch.randn(B, L, H, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((y * w).sum(), (x, k, D))
    grads_ref = torch.autograd.grad((y_ref * w).sum(), (x, k, D))
    for a, b in zip(grads, grads_ref, strict=True):
        assert (a - b).abs().max() < 1e-11
    assert torch.autograd.gradcheck(FFTConv.apply, (x, k, D))


def test_cauchy_written_out_backward_matches_autograd():
    """_cauchy_fused_backward (the compiled path's backward) equals autograd through _cauchy_fused,
    Nyquist node included, in float64."""
    g = torch.Generator().manual_seed(5)
    M, H, N2, L = 4, 3, 6, 40
    vr, vi = (
        torch.randn(M, H, N2, generator=g, dtype=torch.float64, requires_grad=True)
        for _ in range(2)
    )
    wr = (-torch.rand(H, N2, generator=g, dtype=torch.float64) - 0.01).requires_grad_(True)
    wi = (30 * torch.randn(H, N2, generator=g, dtype=torch.float64)).requires_grad_(True)
    c, s = kernels.frequency_nodes(L, torch.float64)
    re, im = kernels._cauchy_fused(vr, vi, wr, wi, c, s)
    gr, gi = torch.randn_like(re), torch.randn_like(im)
    ref = torch.autograd.grad((re * gr + im * gi).sum(), (vr, vi, wr, wi))
    out = kernels._cauchy_fused_backward(vr, vi, wr, wi, c, s, gr, gi)
    for a, b in zip(out, ref, strict=True):
        assert rel(a, b) < 1e-12
    # the chunked eager fallback of the compiled Function's backward sums chunks over K
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "_EAGER_BACKWARD_CHUNK_ELEMENTS", 2 * H * N2)  # chunks of 2 frequencies
        mp.setattr(kernels, "_compile_broken", True)
        mp.setitem(kernels._compiled, "cauchy", kernels._cauchy_fused)
        re2, im2 = kernels._CauchyCompiled.apply(vr, vi, wr, wi, c, s)
        out2 = torch.autograd.grad((re2 * gr + im2 * gi).sum(), (vr, vi, wr, wi))
    assert rel(re2, re) < 1e-14
    for a, b in zip(out2, ref, strict=True):
        assert rel(a, b) < 1e-12


def test_large_eager_kernel_hints_once_at_compiling(monkeypatch):
    """A large S4 kernel run eagerly (compile mode auto on a CPU) warns once, naming the switch;
    not when compiling was turned off on purpose."""
    monkeypatch.setattr(kernels, "_EAGER_HINT_ELEMENTS", 3 * 17 * 8)  # H * K * N2 of the call below
    monkeypatch.setattr(kernels, "_hinted", False)
    k = perturbed_kernel(H=3, N=16)
    assert k.compile_mode == "auto"
    with pytest.warns(UserWarning, match="compile: always") as rec:
        k(L=32)
        k(L=32)
        k(L=16)  # below the size: no hint either
    assert sum("runs eagerly" in str(r.message) for r in rec) == 1
    monkeypatch.setattr(kernels, "_hinted", False)
    k.compile_mode = "never"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k(L=32)
