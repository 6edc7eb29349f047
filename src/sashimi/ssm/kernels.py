"""Cauchy backends for the S4 (DPLR) convolution kernel.

The S4 kernel K[l] = C~ A-bar^l B-bar (l < L) of the bilinear-discretised DPLR
system A = diag(Lambda) - P P^* is evaluated through its truncated generating
function at the L-th roots of unity omega_k = exp(-2 pi i k / L):

    K^(omega) = 2/(1 + omega) * C~ (z - dt A)^{-1} dt B,   z = 2 (1 - omega)/(1 + omega)

The resolvent of the diagonal part is a Cauchy sum over the N/2 stored modes and
their conjugates, and the rank-1 term is removed with Woodbury:

    r_ij(z) = sum_n v_ij,n/(z - w_n) + conj(v_ij,n)/(z - conj(w_n)),  w = dt*Lambda,
    K^ = 2/(1 + omega) * [r_00 - r_01 r_10 / (1 + r_11)],   v_ij = (B, P)_i (C~, Q)_j dt

followed by an inverse real FFT of length L.

Three ways to evaluate it live here:

* ``naive`` (:func:`cauchy_naive`): the official algorithm, literally. The
  (..., N, L/2+1) complex Cauchy tensor is materialised, the nodes z are built
  from complex powers of omega. Slow and memory hungry (5.3 GB forward+backward
  for H=64, L=16000) but obviously correct: the TEST ORACLE.
* ``torch`` (:func:`cauchy_dplr`): the same sums in real arithmetic without
  ever materialising the Cauchy tensor. The nodes are purely imaginary,
  z_k = 2i tan(pi k / L), and multiplying through by cos(pi k / L) makes every
  term finite, including the Nyquist node where z is infinite:

      r_ij = c_k rho_ij,   rho_ij = sum_n v/(2i s_k - w c_k) + conj(v)/(2i s_k - conj(w) c_k)
      K^   = (c_k + i s_k) [rho_00 - c_k rho_01 rho_10 / (1 + c_k rho_11)]

  with (c_k, s_k) = (cos, sin)(pi k / L) computed in float64. The denominators
  never vanish because Re w < 0. The broadcast multiply-and-sum over N is
  compiled with torch.compile (Inductor fuses the Cauchy coefficients into the
  reduction, and generates a fused backward too); without a working compiler it
  runs eagerly in chunks over the frequencies, forward and written-out backward
  alike. Either way memory is O(H L), not O(H N L).
* ``keops``: the real-arithmetic sums as a pykeops reduction (optional import;
  mostly useful on GPUs, slower than plain torch on CPU). pykeops was not
  installable where this was written, so this path has not been run.

``auto`` resolves to ``torch``. Compiling costs 30-90 s once per process on a 2-core CPU, which
short jobs (the demo DAG, tests) never win back. So by default (SASHIMI_COMPILE unset or "auto")
only large problems (H * (L/2+1) * N/2 >= 2^22, e.g. H=64, L >= 4096) ON A GPU use the compiled
path; SASHIMI_COMPILE=1 compiles always (long CPU training runs, `sashimi bench train`), 0 never.
Under "auto", a kernel of >= 2^23 terms that runs eagerly warns once, naming the switch.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from sashimi.errors import UserError

BACKENDS = ("auto", "naive", "torch", "keops")

# Elements of one (H, K_chunk, N/2) coefficient tensor in the eager fallback.
_EAGER_CHUNK_ELEMENTS = 1 << 20
# ... and of one (H, N2, K_chunk) temporary of its written-out backward.
_EAGER_BACKWARD_CHUNK_ELEMENTS = 1 << 18
# With SASHIMI_COMPILE=auto, compile only Cauchy problems with at least this many (H, K, N/2) terms.
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
    """Cauchy sum over both poles of each conjugate pair, materialising the full tensor.

    v, w: (..., N/2) complex; z: (K,) complex. Returns (..., K):
    r[..., k] = sum_n v_n / (z_k - w_n) + conj(v_n) / (z_k - conj(w_n)).
    """
    v = torch.cat([v, v.conj()], dim=-1)  # (..., N)
    w = torch.cat([w, w.conj()], dim=-1)  # (..., N)
    return (v.unsqueeze(-1) / (z - w.unsqueeze(-1))).sum(dim=-2)  # (..., N, K) -> (..., K)


def official_nodes(
    L: int, dtype: torch.dtype, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """Official FFT nodes: omega_k = exp(-2 pi i / L)^k and z_k = 2 (1 - omega_k) / (1 + omega_k), k <= L//2.

    The base is rounded to ``dtype`` before powering, exactly as the official code does
    (which is where the complex64 kernel loses accuracy near the Nyquist frequency).
    """
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
    """(cos, sin)(pi k / L) for k = 0..L//2, computed in float64 and then cast to ``dtype`` (cached).

    z_k = 2i tan(pi k / L) = 2i s_k / c_k and 2 / (1 + omega_k) = (c_k + i s_k) / c_k.
    """
    theta = torch.arange(L // 2 + 1, dtype=torch.float64, device=device) * (math.pi / L)  # (K,)
    c, s = torch.cos(theta), torch.sin(theta)
    if L % 2 == 0:  # exact Nyquist node: z = infinity, handled exactly by the c-scaling
        c[-1], s[-1] = 0.0, 1.0
    return c.to(dtype), s.to(dtype)


def _cauchy_coefficients(
    wr: Tensor, wi: Tensor, c: Tensor, s: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Real coefficients of the conjugate-pair Cauchy terms (all arguments broadcast together).

    For v = vr + i vi:  v/(2is - wc) + conj(v)/(2is - conj(w)c) = (vr a + vi b) + i (vi g - vr d).
    With w = (wr, wi) per (channel, mode) and (c, s) per frequency, a, b, g, d have the broadcast
    shape, e.g. (H, K, N2) or (N2, H, K).
    """
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
    """Broadcast multiply-sum form, meant for torch.compile (Inductor fuses it into one reduction).

    vr, vi: (M, H, N2); wr, wi: (H, N2); c, s: (K,). Returns Re, Im of rho: (M, H, K) each.
    The modes are the OUTER dim of the (N2, H, K) domain so the fused loop vectorises along K
    and accumulates over N2 in registers (on a CPU that also needs the inputs stored mode-major,
    see :func:`_mode_major`).
    """
    a, b, g, d = _cauchy_coefficients(wr.T[:, :, None], wi.T[:, :, None], c, s)  # (N2, H, K)
    vr, vi = vr.transpose(1, 2)[..., None], vi.transpose(1, 2)[..., None]  # (M, N2, H, 1)
    # Unrolled over the few numerators so all 2M reductions share one loop nest.
    re = torch.stack([(vr[m] * a + vi[m] * b).sum(0) for m in range(vr.shape[0])])  # (M, H, K)
    im = torch.stack([(vi[m] * g - vr[m] * d).sum(0) for m in range(vr.shape[0])])  # (M, H, K)
    return re, im


def _cauchy_fused_backward(
    vr: Tensor, vi: Tensor, wr: Tensor, wi: Tensor, c: Tensor, s: Tensor, gr: Tensor, gi: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`_cauchy_fused`, written out (one fused reduction over K under torch.compile).

    With phi1 = 1/(2is - w c), phi2 = 1/(2is - conj(w) c) (so rho = sum_n v phi1 + conj(v) phi2,
    d phi1/dw = c phi1^2, d phi2/d conj(w) = c phi2^2) and G = gr + i gi = dL/d Re rho + i dL/d Im rho:

        dL/dvr = sum_k Re(conj(G) (phi1 + phi2)) = sum_k gr a - gi d
        dL/dvi = -sum_k Im(conj(G) (phi1 - phi2)) = sum_k gr b + gi g
        A = sum_k c phi1^2 sum_m conj(G_m) v_m,   B = sum_k c phi2^2 conj(sum_m G_m v_m)
        dL/dwr = Re(A + B),   dL/dwi = Im(B - A)

    vr, vi: (M, H, N2); wr, wi: (H, N2); c, s: (K,); gr, gi: (M, H, K). Returns dvr, dvi
    (M, H, N2) and dwr, dwi (H, N2). About half the work of autograd through the forward.
    """
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
    """The fused Cauchy sums with the written-out backward, both compiled (see _generating_function_compiled).

    If compiling the backward fails it is evaluated eagerly in chunks over K (the sums are additive).
    """

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
                disable_compile(f"S4 Cauchy kernel backward: torch.compile failed ({type(err).__name__}: {err})")
        return (*_cauchy_backward_chunked(vr, vi, wr, wi, c, s, gr, gi), None, None)


def _cauchy_backward_compiled(
    vr: Tensor, vi: Tensor, wr: Tensor, wi: Tensor, c: Tensor, s: Tensor, gr: Tensor, gi: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The compiled :func:`_cauchy_fused_backward`; on a CPU in blocks of at most _CPU_SUM_BLOCK
    frequencies. Shapes as there.

    Inductor's C++ code sums a float reduction longer than 4096 through a "cascade" helper, for
    accuracy over very long sums; here each of the 16 lanes sums only K/16 terms, and the helper
    (10 accumulators kept in memory) slowed the whole backward by about a third: 12.4-14.7 against
    16.6-20.9 ms at H=64, L=16,000 (2 cores, same process). Blocks of <= 4096 get plain registers.
    """

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
    """:func:`_cauchy_fused_backward` evaluated eagerly, in chunks over K.

    Its (H, N2, K_chunk) temporaries stay at _EAGER_BACKWARD_CHUNK_ELEMENTS each (1 MB in float32,
    so they mostly stay in cache: 0.35 s against 0.85 s with 4 MB chunks at H=64, L=16,000 on a
    2-core CPU). Shapes as there.
    """
    H, N2 = wr.shape
    step = max(1, _EAGER_BACKWARD_CHUNK_ELEMENTS // max(1, H * N2))
    return _sum_over_frequency_blocks(_cauchy_fused_backward, step, vr, vi, wr, wi, c, s, gr, gi)


def _sum_over_frequency_blocks(
    fn: Callable, step: int, vr: Tensor, vi: Tensor, wr: Tensor, wi: Tensor,
    c: Tensor, s: Tensor, gr: Tensor, gi: Tensor, copy: bool = False,
) -> tuple[Tensor, ...]:
    """sum over blocks of `step` frequencies of fn(vr, vi, wr, wi, c, s, gr, gi) restricted to the
    block (the Cauchy gradients are sums over K). With `copy`, a block that is a proper slice is
    passed as fresh contiguous tensors; a single block is passed as it is."""
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
    """k^ = (c + i s) [rho_00 - c rho_01 rho_10 / (1 + c rho_11)] in real arithmetic.

    re, im: (M, H, K) with M = 2 (ch + 1), rows ordered (B C~_0 .. B C~_{ch-1}, B Q, P C~_0 .., P Q);
    c, s: (K,). Returns Re, Im of k^: (ch, H, K) each.
    """
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
    """The Cauchy sums without a compiler: forward chunked over K through batched matmuls, backward
    the written-out gradient (:func:`_cauchy_backward_chunked`), also chunked. Nothing of size
    (H, N2, K) is kept for the backward; only the inputs are. Autograd through the chunks instead
    (even checkpointed, as this path was before) held an 18 GB peak RSS at paper size
    (2 x 16,000 tokens, 8-layer SaShiMi) on a CPU, against ~3.5 GB compiled: glibc kept the
    many freed per-chunk tensors of the graph.
    """

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
    """pykeops reduction of the same real-arithmetic terms (batch over H, i = frequency, j = mode)."""
    from pykeops.torch import LazyTensor

    M, H, N2 = vr.shape
    K = c.shape[0]
    vr_j = LazyTensor(vr.permute(1, 2, 0).reshape(H, 1, N2, M).contiguous())  # (H, 1, N2, M)
    vi_j = LazyTensor(vi.permute(1, 2, 0).reshape(H, 1, N2, M).contiguous())  # (H, 1, N2, M)
    wr_j = LazyTensor(wr.reshape(H, 1, N2, 1).contiguous())
    wi_j = LazyTensor(wi.reshape(H, 1, N2, 1).contiguous())
    c_i = LazyTensor(c.reshape(1, K, 1, 1).expand(H, K, 1, 1).contiguous())
    s_i = LazyTensor(s.reshape(1, K, 1, 1).expand(H, K, 1, 1).contiguous())
    a, b, g, d = _cauchy_coefficients(wr_j, wi_j, c_i, s_i)
    re = (vr_j * a + vi_j * b).sum(dim=2)  # (H, K, M)
    im = (vi_j * g - vr_j * d).sum(dim=2)  # (H, K, M)
    return re.permute(2, 0, 1), im.permute(2, 0, 1)


_compiled: dict[str, Callable] = {}
_compile_broken = False
_compile_mode: str | None = None  # set_compile_mode(); None: read SASHIMI_COMPILE
_MODES = ("auto", "1", "always", "true", "0", "never", "false")


def set_compile_mode(mode: str | None) -> None:
    """Process-wide choice for the compiled Cauchy path: "auto" | "always" | "never" (also "1" / "0"),
    or None to follow $SASHIMI_COMPILE again. The trainer sets it from `train.s4_compile`."""
    global _compile_mode
    if mode is not None and mode.lower() not in _MODES:
        raise UserError(f"S4 compile mode {mode!r}: expected auto, always or never")
    _compile_mode = None if mode is None else mode.lower()


def _mode() -> str:
    """The compile mode in force: set_compile_mode's, else $SASHIMI_COMPILE's, else "auto"."""
    return _compile_mode or os.environ.get("SASHIMI_COMPILE", "auto").lower()


def disable_compile(reason: str) -> None:
    """Turn the compiled paths off for the rest of the process (after a failed compilation), with one warning."""
    global _compile_broken
    _compile_broken = True
    warnings.warn(f"{reason}; using eager", stacklevel=3)


def compile_enabled(elements: int | None = None, device: torch.device | str | None = None) -> bool:
    """Whether the compiled fused path is used for a problem of ``elements`` = H * K * N/2 Cauchy terms.

    SASHIMI_COMPILE (or :func:`set_compile_mode`): "0" never, "1" always, "auto" (default) on CUDA from _COMPILE_MIN_ELEMENTS
    terms up (on a CPU only when asked: the compile time outweighs short jobs).
    A failed compilation disables it for the rest of the process.
    """
    if torch.compiler.is_compiling():  # inside a whole-model torch.compile (train.compile):
        return False  # it compiles the eager code itself; nested compiled calls are untraceable
    mode = _mode()
    if mode in ("0", "never", "false") or _compile_broken or not hasattr(torch, "compile"):
        return False
    if mode in ("1", "always", "true"):
        return True
    if device is not None and torch.device(device).type != "cuda":
        return False
    return elements is None or elements >= _COMPILE_MIN_ELEMENTS


_pointwise: dict[Callable, Callable] = {}  # eager function -> its compiled-with-fallback form


def maybe_compiled(fn: Callable, x: Tensor) -> Callable:
    """``fn`` itself, or its torch.compile'd form when the compile switch is on for a tensor like ``x``
    (:func:`compile_enabled` with x's element count in place of the Cauchy terms).

    For the pointwise glue around the matrix products and FFTs (the channel norm, GELU -> linear ->
    GLU -> residual, ...): compiled, Inductor fuses each chain into one pass over memory instead of
    one per op, in the forward and the backward. The compiled form is cached per function, with
    dynamic shapes. If compiling fails it warns once, turns compiling off for the process
    (:func:`disable_compile`) and runs ``fn`` eagerly, so results never depend on it.
    """
    if not compile_enabled(x.numel(), x.device):
        return fn
    call = _pointwise.get(fn)
    if call is None:
        compiled = torch.compile(fn, dynamic=True)

        def call(*args, **kwargs):
            try:
                return compiled(*args, **kwargs)
            except Exception as err:  # no working compiler: stay correct, go eager for good
                disable_compile(f"{fn.__name__}: torch.compile failed ({type(err).__name__}: {err})")
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
    """Fused Cauchy sums, then the Woodbury epilogue, each under torch.compile (forward and backward).

    The two are compiled separately: the Cauchy reduction needs the raised realisation thresholds,
    and in one graph those thresholds make Inductor inline (and compile) far too much.
    Returns None (after a one-time warning) if compilation fails.
    """
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

    v: (M, H, N2) complex numerators; dtA: (H, N2) complex poles w (Re w < 0); c, s: (K,) nodes
    from :func:`frequency_nodes`. Returns (M, H, K) complex; (M, H, K, N2) is never materialised.
    """
    args = [x.contiguous() for x in (v.real, v.imag, dtA.real, dtA.imag)] + [c, s]
    return torch.complex(*(_cauchy_keops if backend == "keops" else _cauchy_eager)(*args))


def generating_function(v: Tensor, dtA: Tensor, c: Tensor, s: Tensor, backend: str) -> Tensor:
    """K^ at the nodes (c, s): Cauchy sums (compiled and fused when enabled) then rank-1 Woodbury.

    v: (M, H, N2) complex with M = 2 (ch + 1) as in :func:`_woodbury_real`; dtA: (H, N2).
    Returns (ch, H, K) complex.
    """
    out = None
    terms = dtA.numel() * c.numel()  # H * K * N2
    if backend == "torch" and compile_enabled(terms, dtA.device):
        args = [_mode_major(x) for x in (v.real, v.imag, dtA.real, dtA.imag)]
        out = _generating_function_compiled(*args, c, s)
    elif backend == "torch" and terms >= _EAGER_HINT_ELEMENTS and not _hinted:
        _hint_eager(terms)
    if out is None:
        rho = cauchy_dplr(v, dtA, c, s, backend)  # (M, H, K)
        out = _woodbury_real(rho.real, rho.imag, c, s)
    return torch.complex(*out)


_hinted = False
# Eager problems from this size up get a one-time hint (paper-size SC09 on a CPU: 1.6e7 terms).
_EAGER_HINT_ELEMENTS = 1 << 23


def _hint_eager(terms: int) -> None:
    """Warn once per process that a large kernel runs eagerly: on a 2-core CPU the paper SC09
    SaShiMi trains at ~8 s per step (2 x 16,000 tokens) eagerly, ~2.4 s compiled."""
    global _hinted
    _hinted = True
    if _mode() in ("0", "never", "false") or _compile_broken or torch.compiler.is_compiling():
        return  # asked for (or no compiler): nothing to suggest
    warnings.warn(
        f"S4 kernel with {terms:.2e} Cauchy terms runs eagerly; for long runs set train.s4_compile: "
        "always (or SASHIMI_COMPILE=1): it compiles once (about a minute) and trains ~3x faster",
        stacklevel=3,
    )


def _mode_major(x: Tensor) -> Tensor:
    """x (..., H, N2), on a CPU laid out with the modes as the slow dim (strides (..., 1, H)).

    The compiled Cauchy forward then vectorises along the frequencies and accumulates over the
    modes in registers; from the usual layout Inductor vectorised along the 32 modes and paid
    8 horizontal vector sums per (channel, frequency): 7.0 against 10.8 ms at H=64, L=16,000
    on 2 cores. On a GPU the layout is left as it was measured (contiguous)."""
    if x.device.type != "cpu":
        return x.contiguous()
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def _kernel_fast(dtA: Tensor, Bs: Tensor, Cs: Tensor, L: int, backend: str) -> Tensor:
    """Kernel through the c-scaled Cauchy sums (exact at the Nyquist node). Shapes as in :func:`_kernel_naive`."""
    c, s = frequency_nodes(L, dtA.real.dtype, dtA.device)  # (K,)
    k_f = generating_function((Bs * Cs).flatten(0, 1), dtA, c, s, backend)  # (c, H, K)
    return torch.fft.irfft(k_f, n=L)  # (c, H, L)


def dplr_kernel(
    dtA: Tensor, B: Tensor, P: Tensor, C: Tensor, dt: Tensor, L: int, backend: str = "auto"
) -> Tensor:
    """Length-L convolution kernel of the bilinear-discretised DPLR SSM A = diag(Lambda) - P P^*.

    dtA: (H, N2) complex, dt * Lambda; B, P: (H, N2) complex; C: (c, H, N2) complex, the stored
    C~ = C (I - A-bar^L) for length L; dt: (H,) real. Returns K: (c, H, L) real with
    K[c, h, l] = C_ext A-bar^l B-bar_ext for l < L (conjugate-extended state of size N = 2 N2).
    """
    backend = resolve_backend(backend)
    Bs = torch.stack([B, P]).unsqueeze(1) * dt.unsqueeze(-1)  # (2, 1, H, N2): (B, P) dt
    Cs = torch.cat([C, P.conj().unsqueeze(0)]).unsqueeze(0)  # (1, c+1, H, N2): (C~, Q), Q = conj(P)
    if backend == "naive":
        return _kernel_naive(dtA, Bs, Cs, L)
    return _kernel_fast(dtA, Bs, Cs, L, backend)


# ----------------------------------------------------------------------------------------------
# Micro-benchmark (called by `sashimi bench`)
# ----------------------------------------------------------------------------------------------


class _PeakRSS:
    """Peak resident memory above the level at entry, sampled from /proc/self/statm in a thread."""

    def __init__(self, interval: float = 1e-3):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(self.interval)

    def __enter__(self) -> _PeakRSS:
        self.base = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self.base)


def benchmark_kernel(
    H: int = 64,
    L: int = 16000,
    backend: str = "auto",
    N: int = 64,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    repeats: int = 3,
) -> dict:
    """Time one S4 kernel computation (forward, and forward+backward) and its peak extra memory.

    Builds a fresh n_ssm=1 kernel with H channels and state size N, converts C to C~ at length L
    (not timed), warms up once (this includes torch.compile for the fused backend), then reports
    the median over ``repeats`` runs. Memory is the peak above the level before the measured
    run: CUDA allocator peak on GPUs, sampled process RSS on CPU (so approximate there).
    """
    from sashimi.ssm.s4 import S4Kernel

    device = torch.device(device)
    kernel = S4Kernel(H, N=N, backend=backend).to(device=device, dtype=dtype)
    with torch.no_grad():
        kernel(L)  # C -> C~ at length L
    weight = torch.randn(1, H, L, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def fwd() -> None:
        with torch.no_grad():
            kernel(L)
        sync()

    def fwd_bwd() -> None:
        kernel.zero_grad(set_to_none=True)
        (kernel(L) * weight).sum().backward()
        sync()

    def measure(fn: Callable[[], None]) -> tuple[float, float]:
        fn()  # warm-up (and compilation)
        times, peak = [], 0
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
                peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
            else:
                with _PeakRSS() as mem:
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                peak = max(peak, mem.peak)
        return sorted(times)[len(times) // 2], peak / 2**20

    fwd_s, fwd_mb = measure(fwd)
    fwd_bwd_s, fwd_bwd_mb = measure(fwd_bwd)
    fused = resolve_backend(backend) == "torch" and compile_enabled(H * (L // 2 + 1) * (N // 2), device)
    return {
        "H": H,
        "L": L,
        "N": N,
        "backend": resolve_backend(backend)
        + ("-compiled" if fused else ("" if backend == "naive" else "-eager")),
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "forward_s": fwd_s,
        "forward_backward_s": fwd_bwd_s,
        "forward_peak_mb": fwd_mb,
        "forward_backward_peak_mb": fwd_bwd_mb,
    }
