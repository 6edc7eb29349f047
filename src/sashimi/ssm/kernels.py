"""Cauchy backends for the S4 (DPLR) convolution kernel (SPEC "S4 layer").

K[l] = C~ A-bar^l B-bar (l < L) comes from its generating function at the L-th roots of unity:
a Cauchy sum over the N/2 modes and their conjugates, the rank-1 term removed with Woodbury,
then an inverse real FFT. Backends: ``naive`` (:func:`cauchy_naive`), the official algorithm
and the test oracle; ``torch`` (:func:`cauchy_dplr`), the same sums in real arithmetic at the
exact nodes z_k = 2i tan(pi k / L), scaled by cos(pi k / L) so the Nyquist node stays finite,
compiled or eager in chunks (:func:`compile_enabled`); ``keops`` (:mod:`sashimi.ssm.keops`).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from sashimi.errors import UserError

BACKENDS = ("auto", "naive", "torch", "keops")

# Elements of one (H, K_chunk, N/2) coefficient tensor in the eager fallback.
_EAGER_CHUNK_ELEMENTS = 1 << 20
# ... and of one (H, N2, K_chunk) temporary of its written-out backward.
_EAGER_BACKWARD_CHUNK_ELEMENTS = 1 << 18
# In compile mode "auto", compile only CUDA Cauchy problems with at least this many (H, K, N/2) terms.
_COMPILE_MIN_ELEMENTS = 1 << 22
# Longest sum over frequencies in one compiled CPU backward call (see _cauchy_backward_compiled).
_CPU_SUM_BLOCK = 4096


def resolve_backend(backend: str) -> str:
    """Map a user-facing backend name onto an implemented one ('naive' | 'torch' | 'keops')."""
    if backend not in BACKENDS:
        raise UserError(
            f"unknown S4 kernel backend {backend!r}; expected one of {', '.join(BACKENDS)}"
        )
    if backend == "auto":
        return "torch"
    if backend == "keops" and not has_pykeops():
        raise UserError("S4 kernel backend 'keops' requested but pykeops is not installed")
    return backend


def has_pykeops() -> bool:
    try:
        import pykeops  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Naive oracle: the official algorithm
# ----------------------------------------------------------------------------------------------


def cauchy_naive(v: Tensor, z: Tensor, w: Tensor) -> Tensor:
    """r[..., k] = sum_n v_n / (z_k - w_n) + conj(v_n) / (z_k - conj(w_n)), materialising the
    (..., N, K) terms. v, w: (..., N/2) complex; z: (K,) complex -> (..., K)."""
    v = torch.cat([v, v.conj()], dim=-1)  # (..., N)
    w = torch.cat([w, w.conj()], dim=-1)  # (..., N)
    return (v.unsqueeze(-1) / (z - w.unsqueeze(-1))).sum(dim=-2)  # (..., N, K) -> (..., K)


def official_nodes(
    L: int, dtype: torch.dtype, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """Official FFT nodes omega_k = exp(-2 pi i / L)^k, z_k = 2 (1 - omega_k) / (1 + omega_k), k <= L//2.

    The base is rounded to ``dtype`` before powering, as the official code does (hence its
    complex64 error near Nyquist)."""
    cdtype = torch.complex128 if dtype in (torch.float64, torch.complex128) else torch.complex64
    base = torch.tensor(
        complex(math.cos(2 * math.pi / L), -math.sin(2 * math.pi / L)), dtype=cdtype, device=device
    )
    omega = base ** torch.arange(L // 2 + 1, device=device)  # (K,)
    z = 2 * (1 - omega) / (1 + omega)  # (K,)
    return omega, z


def _kernel_naive(dtA: Tensor, Bs: Tensor, Cs: Tensor, L: int) -> Tensor:
    """Official frequency-domain kernel. dtA: (H, N2); Bs: (2, 1, H, N2) = (B, P) dt; Cs: (1, c+1, H, N2) = (C~, Q)."""
    omega, z = official_nodes(L, dtA.real.dtype, dtA.device)
    r = cauchy_naive(Bs * Cs, z, dtA)  # (2, c+1, H, K)
    k_f = r[:-1, :-1] - r[:-1, -1:] * r[-1:, :-1] / (1 + r[-1:, -1:])  # Woodbury, (1, c, H, K)
    k_f = k_f[0] * 2 / (1 + omega)  # bilinear correction, (c, H, K)
    return torch.fft.irfft(k_f, n=L)  # (c, H, L)


# ----------------------------------------------------------------------------------------------
# Fast path: real arithmetic, exact nodes, nothing of size (H, N, K) materialised
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def frequency_nodes(
    L: int, dtype: torch.dtype, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """(c_k, s_k) = (cos, sin)(pi k / L), k = 0..L//2, in float64 cast to ``dtype`` (cached):
    z_k = 2i s_k / c_k and 2 / (1 + omega_k) = (c_k + i s_k) / c_k."""
    theta = torch.arange(L // 2 + 1, dtype=torch.float64, device=device) * (math.pi / L)  # (K,)
    c, s = torch.cos(theta), torch.sin(theta)
    if L % 2 == 0:  # exact Nyquist node: z = infinity, handled exactly by the c-scaling
        c[-1], s[-1] = 0.0, 1.0
    return c.to(dtype), s.to(dtype)


def _cauchy_coefficients(
    wr: Tensor, wi: Tensor, c: Tensor, s: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Real coefficients (a, b, g, d), in the arguments' broadcast shape, of one conjugate pair:
    v/(2is - wc) + conj(v)/(2is - conj(w)c) = (vr a + vi b) + i (vi g - vr d)."""
    x = -wr * c  # real part of both denominators: > 0 since Re w < 0 (0 only at Nyquist, c = 0)
    y1 = 2 * s - wi * c  # imaginary part of 2is - w c
    y2 = 2 * s + wi * c  # imaginary part of 2is - conj(w) c
    x2 = x * x
    i1 = 1 / (x2 + y1 * y1)
    i2 = 1 / (x2 + y2 * y2)
    return x * (i1 + i2), y1 * i1 - y2 * i2, x * (i1 - i2), y1 * i1 + y2 * i2


def _cauchy_fused(
    vr: Tensor, vi: Tensor, wr: Tensor, wi: Tensor, c: Tensor, s: Tensor
) -> tuple[Tensor, Tensor]:
    """Re, Im of rho (M, H, K) from vr, vi (M, H, N2), wr, wi (H, N2), c, s (K,), as one
    reduction for torch.compile. The modes are the outer dim of the (N2, H, K) domain so the
    loop vectorises along K and accumulates over N2 in registers (:func:`_mode_major`)."""
    a, b, g, d = _cauchy_coefficients(wr.T[:, :, None], wi.T[:, :, None], c, s)  # (N2, H, K)
    vr, vi = vr.transpose(1, 2)[..., None], vi.transpose(1, 2)[..., None]  # (M, N2, H, 1)
    # Unrolled over the few numerators so all 2M reductions share one loop nest.
    re = torch.stack([(vr[m] * a + vi[m] * b).sum(0) for m in range(vr.shape[0])])  # (M, H, K)
    im = torch.stack([(vi[m] * g - vr[m] * d).sum(0) for m in range(vr.shape[0])])  # (M, H, K)
    return re, im


def _cauchy_fused_backward(
    vr: Tensor, vi: Tensor, wr: Tensor, wi: Tensor, c: Tensor, s: Tensor, gr: Tensor, gi: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`_cauchy_fused` as one reduction over K. With phi1 = 1/(2is - w c),
    phi2 = 1/(2is - conj(w) c) and G = gr + i gi = dL/d Re rho + i dL/d Im rho:

        dL/dvr = sum_k Re(conj(G) (phi1 + phi2)) = sum_k gr a - gi d
        dL/dvi = -sum_k Im(conj(G) (phi1 - phi2)) = sum_k gr b + gi g
        A = sum_k c phi1^2 sum_m conj(G_m) v_m,   B = sum_k c phi2^2 conj(sum_m G_m v_m)
        dL/dwr = Re(A + B),   dL/dwi = Im(B - A)

    gr, gi: (M, H, K) -> dvr, dvi (M, H, N2), dwr, dwi (H, N2)."""
    x = -wr[:, :, None] * c  # (H, N2, K), as in _cauchy_coefficients
    y1 = 2 * s - wi[:, :, None] * c
    y2 = 2 * s + wi[:, :, None] * c
    x2 = x * x
    i1 = 1 / (x2 + y1 * y1)
    i2 = 1 / (x2 + y2 * y2)
    a, b, g, d = x * (i1 + i2), y1 * i1 - y2 * i2, x * (i1 - i2), y1 * i1 + y2 * i2
    Gr, Gi = gr[:, :, None, :], gi[:, :, None, :]  # (M, H, 1, K)
    Vr, Vi = vr[..., None], vi[..., None]  # (M, H, N2, 1)
    M = vr.shape[0]
    dvr = torch.stack([(Gr[m] * a - Gi[m] * d).sum(-1) for m in range(M)])  # (M, H, N2)
    dvi = torch.stack([(Gr[m] * b + Gi[m] * g).sum(-1) for m in range(M)])  # (M, H, N2)
    s1 = sum(Gr[m] * Vr[m] for m in range(M))  # (H, N2, K)
    s2 = sum(Gi[m] * Vi[m] for m in range(M))
    s3 = sum(Gr[m] * Vi[m] for m in range(M))
    s4 = sum(Gi[m] * Vr[m] for m in range(M))
    pr, pi, qr, qi = s1 + s2, s3 - s4, s1 - s2, s3 + s4  # P = sum conj(G) v, Q = sum G v
    j1, j2 = c * i1 * i1, c * i2 * i2
    p1r, p1i = (x2 - y1 * y1) * j1, -2 * x * y1 * j1  # c phi1^2
    p2r, p2i = (x2 - y2 * y2) * j2, -2 * x * y2 * j2  # c phi2^2
    dwr = (p1r * pr - p1i * pi + p2r * qr + p2i * qi).sum(-1)  # (H, N2)
    dwi = (p2i * qr - p2r * qi - p1r * pi - p1i * pr).sum(-1)  # (H, N2)
    return dvr, dvi, dwr, dwi


class _CauchyCompiled(torch.autograd.Function):
    """The fused Cauchy sums and their written-out backward, compiled; eager chunks if that fails."""

    @staticmethod
    def forward(ctx, vr: Tensor, vi: Tensor, wr: Tensor, wi: Tensor, c: Tensor, s: Tensor):
        # the backward's reduction runs over K: there the usual (.., H, N2) layout is the fast one
        ctx.save_for_backward(*(x.contiguous() for x in (vr, vi, wr, wi)), c, s)
        return _compiled["cauchy"](vr, vi, wr, wi, c, s)

    @staticmethod
    def backward(ctx, gr: Tensor, gi: Tensor):
        vr, vi, wr, wi, c, s = ctx.saved_tensors
        gr, gi = gr.contiguous(), gi.contiguous()
        if not _compile_broken:
            try:
                return (*_cauchy_backward_compiled(vr, vi, wr, wi, c, s, gr, gi), None, None)
            except Exception as err:
                disable_compile(
                    f"S4 Cauchy kernel backward: torch.compile failed ({type(err).__name__}: {err})"
                )
        return (*_cauchy_backward_chunked(vr, vi, wr, wi, c, s, gr, gi), None, None)


def _cauchy_backward_compiled(
    vr: Tensor, vi: Tensor, wr: Tensor, wi: Tensor, c: Tensor, s: Tensor, gr: Tensor, gi: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The compiled :func:`_cauchy_fused_backward`; on a CPU in blocks of <= _CPU_SUM_BLOCK
    frequencies, which keep Inductor's plain register accumulators (docs/performance.md)."""

    def call(*args: Tensor) -> tuple[Tensor, ...]:
        for x, dim in zip(args, (1, 1, 0, 0, 0, 0, 1, 1), strict=True):
            torch._dynamo.maybe_mark_dynamic(x, dim)
        return _compiled["cauchy_bwd"](*args)

    K = c.shape[0]
    step = K if c.device.type != "cpu" else -(-K // -(-K // _CPU_SUM_BLOCK))  # near-equal blocks
    # blocks copied: as slices (strides, offsets) they would compile more graphs
    return _sum_over_frequency_blocks(call, step, vr, vi, wr, wi, c, s, gr, gi, copy=True)


def _cauchy_backward_chunked(
    vr: Tensor, vi: Tensor, wr: Tensor, wi: Tensor, c: Tensor, s: Tensor, gr: Tensor, gi: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_cauchy_fused_backward` eagerly, in chunks over K whose temporaries stay in cache."""
    H, N2 = wr.shape
    step = max(1, _EAGER_BACKWARD_CHUNK_ELEMENTS // max(1, H * N2))
    return _sum_over_frequency_blocks(_cauchy_fused_backward, step, vr, vi, wr, wi, c, s, gr, gi)


def _sum_over_frequency_blocks(
    fn: Callable,
    step: int,
    vr: Tensor,
    vi: Tensor,
    wr: Tensor,
    wi: Tensor,
    c: Tensor,
    s: Tensor,
    gr: Tensor,
    gi: Tensor,
    copy: bool = False,
) -> tuple[Tensor, ...]:
    """Sum of fn(vr, vi, wr, wi, c, s, gr, gi) over blocks of `step` frequencies (the gradients
    are sums over K); `copy` passes proper slices as fresh contiguous tensors."""
    K = c.shape[0]
    out = None
    for k0 in range(0, K, step):
        sl = slice(k0, k0 + step)
        blk = (c[sl], s[sl], gr[..., sl], gi[..., sl])
        if copy and step < K:
            blk = tuple(x.clone(memory_format=torch.contiguous_format) for x in blk)
        part = fn(vr, vi, wr, wi, *blk)
        out = part if out is None else tuple(o.add_(p) for o, p in zip(out, part, strict=True))
    return out


def _woodbury_real(re: Tensor, im: Tensor, c: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """k^ = (c + i s) [rho_00 - c rho_01 rho_10 / (1 + c rho_11)] in real arithmetic. re, im:
    (M, H, K), M = 2 (ch + 1), rows (B C~_0 .., B Q, P C~_0 .., P Q) -> Re, Im (ch, H, K)."""
    ch = re.shape[0] // 2 - 1
    r00r, r00i = re[:ch], im[:ch]  # (ch, H, K)
    r01r, r01i = re[ch], im[ch]  # (H, K)
    r10r, r10i = re[ch + 1 : 2 * ch + 1], im[ch + 1 : 2 * ch + 1]  # (ch, H, K)
    dr, di = 1 + c * re[-1], c * im[-1]  # 1 + c rho_11, (H, K)
    nr = r01r * r10r - r01i * r10i  # rho_01 rho_10
    ni = r01r * r10i + r01i * r10r
    scale = c / (dr * dr + di * di)
    tr = r00r - scale * (nr * dr + ni * di)  # rho_00 - c rho_01 rho_10 / (1 + c rho_11)
    ti = r00i - scale * (ni * dr - nr * di)
    return c * tr - s * ti, c * ti + s * tr  # times (c + i s)


class _CauchyEager(torch.autograd.Function):
    """The Cauchy sums without a compiler: forward in chunks over K through batched matmuls,
    backward written out (:func:`_cauchy_backward_chunked`). Only the inputs are saved, which
    keeps peak memory near the compiled path's (docs/performance.md)."""

    @staticmethod
    def forward(ctx, vr: Tensor, vi: Tensor, wr: Tensor, wi: Tensor, c: Tensor, s: Tensor):
        ctx.save_for_backward(vr, vi, wr, wi, c, s)
        M, H, N2 = vr.shape
        K = c.shape[0]
        vr_t, vi_t = vr.permute(1, 2, 0), vi.permute(1, 2, 0)  # (H, N2, M)
        wr_, wi_ = wr.unsqueeze(1), wi.unsqueeze(1)  # (H, 1, N2)
        re, im = vr.new_empty(H, K, M), vr.new_empty(H, K, M)
        step = max(1, _EAGER_CHUNK_ELEMENTS // max(1, H * N2))
        for k0 in range(0, K, step):
            sl = slice(k0, k0 + step)
            a, b, g, d = _cauchy_coefficients(wr_, wi_, c[sl, None], s[sl, None])  # (H, Kc, N2)
            torch.baddbmm(torch.bmm(b, vi_t), a, vr_t, out=re[:, sl])  # (H, Kc, M)
            torch.baddbmm(torch.bmm(g, vi_t), d, vr_t, alpha=-1, out=im[:, sl])
        return re.permute(2, 0, 1), im.permute(2, 0, 1)  # (M, H, K)

    @staticmethod
    def backward(ctx, gr: Tensor, gi: Tensor):
        vr, vi, wr, wi, c, s = ctx.saved_tensors
        grads = _cauchy_backward_chunked(vr, vi, wr, wi, c, s, gr.contiguous(), gi.contiguous())
        return (*grads, None, None)


def _cauchy_eager(
    vr: Tensor, vi: Tensor, wr: Tensor, wi: Tensor, c: Tensor, s: Tensor
) -> tuple[Tensor, Tensor]:
    """Re, Im of the Cauchy sums (M, H, K) from vr, vi (M, H, N2), wr, wi (H, N2), c, s (K,), eagerly."""
    return _CauchyEager.apply(vr, vi, wr, wi, c, s)


def _cauchy_keops(
    vr: Tensor, vi: Tensor, wr: Tensor, wi: Tensor, c: Tensor, s: Tensor
) -> tuple[Tensor, Tensor]:
    """The same sums as a pykeops reduction: :func:`sashimi.ssm.keops.cauchy_dplr`."""
    from sashimi.ssm.keops import cauchy_dplr

    return cauchy_dplr(vr, vi, wr, wi, c, s)


_compiled: dict[str, Callable] = {}  # the compiled Cauchy functions, built on first use
_compile_broken = False  # a compilation failed in this process: eager from then on
COMPILE_MODES = ("auto", "always", "never")


def check_compile_mode(mode: str) -> str:
    """`mode` if it is one of COMPILE_MODES, else a UserError."""
    if mode not in COMPILE_MODES:
        raise UserError(f"S4 compile mode {mode!r}: expected auto, always or never")
    return mode


def set_compile_mode(model: nn.Module, mode: str) -> None:
    """Set `compile_mode` (the run's `compile`, sashimi.compiling) on every layer that has one."""
    check_compile_mode(mode)
    for m in model.modules():
        if hasattr(m, "compile_mode"):
            m.compile_mode = mode


def disable_compile(reason: str) -> None:
    """Turn the compiled paths off for the rest of the process (after a failed compilation), with one warning."""
    global _compile_broken
    _compile_broken = True
    warnings.warn(f"{reason}; using eager", stacklevel=3)


def compile_enabled(
    mode: str, elements: int | None = None, device: torch.device | str | None = None
) -> bool:
    """Whether the compiled path runs for ``elements`` = H * K * N/2 Cauchy terms: "always",
    or "auto" on CUDA from _COMPILE_MIN_ELEMENTS up (on a CPU compile time outweighs short jobs);
    never after a failed compilation or inside a whole-model torch.compile."""
    if torch.compiler.is_compiling() or _compile_broken or not hasattr(torch, "compile"):
        return False
    if check_compile_mode(mode) != "auto":
        return mode == "always"
    if device is not None and torch.device(device).type != "cuda":
        return False
    return elements is None or elements >= _COMPILE_MIN_ELEMENTS


_pointwise: dict[Callable, Callable] = {}  # eager function -> its compiled-with-fallback form


def maybe_compiled(fn: Callable, x: Tensor, mode: str) -> Callable:
    """``fn``, or its cached torch.compile'd form when :func:`compile_enabled` for x.numel().

    For the pointwise glue around matrix products and FFTs (channel norm, GELU -> linear -> GLU
    -> residual), which Inductor fuses into one pass; a failed compile falls back to eager."""
    if not compile_enabled(mode, x.numel(), x.device):
        return fn
    call = _pointwise.get(fn)
    if call is None:
        compiled = torch.compile(fn, dynamic=True)

        def call(*args, **kwargs):
            try:
                return compiled(*args, **kwargs)
            except Exception as err:  # no working compiler: stay correct, go eager for good
                disable_compile(
                    f"{fn.__name__}: torch.compile failed ({type(err).__name__}: {err})"
                )
                return fn(*args, **kwargs)

        _pointwise[fn] = call
    return call


# Inductor's store-vs-recompute heuristics would materialise the (N2, H, K) Cauchy coefficients
# (their expression is "large"); raising the thresholds keeps everything inside one fused loop.
_INDUCTOR_OPTIONS = {
    "realize_opcount_threshold": 10_000,
    "realize_reads_threshold": 10_000,
    "realize_acc_reads_threshold": 10_000,
}


def _generating_function_compiled(*args: Tensor) -> tuple[Tensor, Tensor] | None:
    """Fused Cauchy sums, then Woodbury, compiled separately (the sums' raised realisation
    thresholds would make Inductor inline far too much of one graph); None if compiling fails."""
    if not _compiled:
        _compiled["cauchy"] = torch.compile(
            _cauchy_fused, fullgraph=True, options=_INDUCTOR_OPTIONS
        )
        _compiled["cauchy_bwd"] = torch.compile(
            _cauchy_fused_backward, fullgraph=True, options=_INDUCTOR_OPTIONS
        )
        _compiled["woodbury"] = torch.compile(_woodbury_real, fullgraph=True)
    # H and K vary between calls (one compiled graph for all of them); M and N2 stay static.
    for x, dim in zip(args, (1, 1, 0, 0, 0, 0), strict=True):
        torch._dynamo.maybe_mark_dynamic(x, dim)
    try:
        re, im = _CauchyCompiled.apply(*args)
        for x in (re, im):
            torch._dynamo.maybe_mark_dynamic(x, 1)
            torch._dynamo.maybe_mark_dynamic(x, 2)
        return _compiled["woodbury"](re, im, args[4], args[5])
    except Exception as err:  # compiler missing or broken: fall back to the eager path for good
        disable_compile(f"S4 Cauchy kernel: torch.compile failed ({type(err).__name__}: {err})")
        return None


def cauchy_dplr(v: Tensor, dtA: Tensor, c: Tensor, s: Tensor, backend: str = "torch") -> Tensor:
    """rho[m, h, k] = sum_n v/(2i s_k - w c_k) + conj(v)/(2i s_k - conj(w) c_k), eagerly in chunks.
    v: (M, H, N2); dtA: (H, N2) poles w, Re w < 0; c, s: (K,) -> (M, H, K) complex."""
    args = [x.contiguous() for x in (v.real, v.imag, dtA.real, dtA.imag)] + [c, s]
    return torch.complex(*(_cauchy_keops if backend == "keops" else _cauchy_eager)(*args))


def generating_function(
    v: Tensor, dtA: Tensor, c: Tensor, s: Tensor, backend: str, compile: str = "auto"
) -> Tensor:
    """K^ at the nodes (c, s): Cauchy sums (compiled if `compile` allows) then Woodbury.
    v: (M, H, N2), M = 2 (ch + 1) as in :func:`_woodbury_real`; dtA: (H, N2) -> (ch, H, K)."""
    out = None
    terms = dtA.numel() * c.numel()  # H * K * N2
    if backend == "torch" and compile_enabled(compile, terms, dtA.device):
        args = [_mode_major(x) for x in (v.real, v.imag, dtA.real, dtA.imag)]
        out = _generating_function_compiled(*args, c, s)
    elif backend == "torch" and terms >= _EAGER_HINT_ELEMENTS and not _hinted:
        _hint_eager(terms, compile)
    if out is None:
        rho = cauchy_dplr(v, dtA, c, s, backend)  # (M, H, K)
        out = _woodbury_real(rho.real, rho.imag, c, s)
    return torch.complex(*out)


_hinted = False
# Eager problems from this size up get a one-time hint (paper-size SC09 has 1.6e7 terms).
_EAGER_HINT_ELEMENTS = 1 << 23


def _hint_eager(terms: int, mode: str) -> None:
    """Warn once per process that a large kernel runs eagerly, unless eager was asked for."""
    global _hinted
    _hinted = True
    if mode == "never" or _compile_broken or torch.compiler.is_compiling():
        return  # asked for (or no compiler): nothing to suggest
    warnings.warn(
        f"S4 kernel with {terms:.2e} Cauchy terms runs eagerly; for long runs set the run's "
        "`compile: always`: it compiles once (about a minute) and trains ~3x faster",
        stacklevel=3,
    )


def _mode_major(x: Tensor) -> Tensor:
    """x (..., H, N2), on a CPU with the modes as the slow dim (strides (..., 1, H)), so the
    compiled forward vectorises along K (docs/performance.md); contiguous on a GPU."""
    if x.device.type != "cpu":
        return x.contiguous()
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def _kernel_fast(
    dtA: Tensor, Bs: Tensor, Cs: Tensor, L: int, backend: str, compile: str = "auto"
) -> Tensor:
    """Kernel through the c-scaled Cauchy sums (exact at the Nyquist node). Shapes as in :func:`_kernel_naive`."""
    c, s = frequency_nodes(L, dtA.real.dtype, dtA.device)  # (K,)
    v = (Bs * Cs).flatten(0, 1)  # (M, H, N2)
    k_f = generating_function(v, dtA, c, s, backend, compile)  # (c, H, K)
    return torch.fft.irfft(k_f, n=L)  # (c, H, L)


def dplr_kernel(
    dtA: Tensor, B: Tensor, P: Tensor, C: Tensor, dt: Tensor, L: int, backend: str = "auto",
    compile: str = "auto",
) -> Tensor:  # fmt: skip
    """Length-L kernel K (c, H, L) of the bilinear-discretised DPLR SSM A = diag(Lambda) - P P^*.

    dtA = dt Lambda, B, P: (H, N2); C: (c, H, N2), the stored C~ = C (I - A-bar^L); dt: (H,).
    K[c, h, l] = C_ext A-bar^l B-bar_ext (conjugate-extended, N = 2 N2); `compile` as in
    :func:`compile_enabled`."""
    backend = resolve_backend(backend)
    Bs = torch.stack([B, P]).unsqueeze(1) * dt.unsqueeze(-1)  # (2, 1, H, N2): (B, P) dt
    Cs = torch.cat([C, P.conj().unsqueeze(0)]).unsqueeze(0)  # (1, c+1, H, N2): (C~, Q), Q = conj(P)
    if backend == "naive":
        return _kernel_naive(dtA, Bs, Cs, L)
    return _kernel_fast(dtA, Bs, Cs, L, backend, compile)
