"""The S4 Cauchy sums as pykeops reductions (the optional ``keops`` kernel backend).

KeOps compiles each formula to C++ (with the system g++ on a CPU, nvcc/nvrtc on a GPU) once,
caches it under ~/.cache/keops*, and then evaluates the reduction over the modes without
materialising the (..., N, K) Cauchy tensor; autograd comes from KeOps' symbolic gradients.
Two forms:

* :func:`cauchy`: the naive oracle's sum, r_k = sum_n v_n/(z_k - w_n) + conj(v_n)/(z_k - conj(w_n)),
  for any complex nodes z (same arguments and result as ``kernels.cauchy_naive``);
* :func:`cauchy_dplr`: the c-scaled real-arithmetic sums the ``torch`` backend evaluates,
  rho_k = sum_n v_n/(2i s_k - w_n c_k) + conj(v_n)/(2i s_k - conj(w_n) c_k), which stay finite
  at the Nyquist node; ``dplr_kernel(..., backend="keops")`` calls it.

:func:`bench_cauchy` times the S4 kernel with this backend beside the pure-torch one.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
from torch import Tensor


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None when pykeops imports and compiles a reduction here; else why not (one line)."""
    try:
        from pykeops.torch import LazyTensor
    except Exception as err:  # ImportError, or a broken install raising at import
        return f"pykeops is not installed ({type(err).__name__}: {err}); pip install -e '.[keops]'"
    try:
        x = torch.arange(6, dtype=torch.float32).reshape(3, 2)
        got = (LazyTensor(x[:, None, :]) - LazyTensor(x[None, :, :])).sum(-1).sum(dim=1)  # (3, 1)
    except Exception as err:  # no C++ compiler, missing Python headers, ...
        msg = " ".join(str(err).split())[:300]
        return f"pykeops cannot compile a reduction here ({type(err).__name__}: {msg})"
    want = (x[:, None, :] - x[None, :, :]).sum(-1).sum(1, keepdim=True)
    if not torch.allclose(got, want):
        return "pykeops compiled a reduction that returns wrong values"
    return None


def _lazy(x: Tensor, shape: tuple[int, ...]):
    from pykeops.torch import LazyTensor

    return LazyTensor(x.reshape(shape).contiguous())


def cauchy(v: Tensor, z: Tensor, w: Tensor) -> Tensor:
    """r[..., k] = sum_n v_n/(z_k - w_n) + conj(v_n)/(z_k - conj(w_n)) through one KeOps reduction.

    v, w: (..., N/2) complex, broadcast together; z: (K,) complex. Returns (..., K) complex.
    """
    batch = torch.broadcast_shapes(v.shape[:-1], w.shape[:-1])
    N2, K = v.shape[-1], z.shape[0]
    v, w = v.expand(*batch, N2).reshape(-1, N2), w.expand(*batch, N2).reshape(-1, N2)  # (B, N2)
    B = v.shape[0]
    vr, vi = _lazy(v.real, (B, 1, N2, 1)), _lazy(v.imag, (B, 1, N2, 1))  # j = mode
    wr, wi = _lazy(w.real, (B, 1, N2, 1)), _lazy(w.imag, (B, 1, N2, 1))
    zr = _lazy(z.real.expand(B, K), (B, K, 1, 1))  # i = node
    zi = _lazy(z.imag.expand(B, K), (B, K, 1, 1))
    x = zr - wr  # real part of both denominators z - w and z - conj(w)
    y1, y2 = zi - wi, zi + wi  # their imaginary parts
    i1, i2 = 1 / (x * x + y1 * y1), 1 / (x * x + y2 * y2)
    # v/(x + i y1) + conj(v)/(x + i y2), real and imaginary parts
    re = (vr * x * (i1 + i2) + vi * (y1 * i1 - y2 * i2)).sum(dim=2)  # (B, K, 1)
    im = (vi * x * (i1 - i2) - vr * (y1 * i1 + y2 * i2)).sum(dim=2)  # (B, K, 1)
    return torch.complex(re, im).reshape(*batch, K)


def cauchy_dplr(
    vr: Tensor, vi: Tensor, wr: Tensor, wi: Tensor, c: Tensor, s: Tensor
) -> tuple[Tensor, Tensor]:
    """Re, Im of rho[m, h, k] = sum_n v/(2i s_k - w c_k) + conj(v)/(2i s_k - conj(w) c_k).

    vr, vi: (M, H, N2); wr, wi: (H, N2); c, s: (K,) from ``kernels.frequency_nodes``.
    Returns (M, H, K) each. One reduction per channel h (a KeOps batch dimension); the M
    numerators form one vector variable so they share the denominators.
    """
    M, H, N2 = vr.shape
    K = c.shape[0]
    vr_j = _lazy(vr.permute(1, 2, 0), (H, 1, N2, M))  # (H, 1, N2, M)
    vi_j = _lazy(vi.permute(1, 2, 0), (H, 1, N2, M))
    wr_j, wi_j = _lazy(wr, (H, 1, N2, 1)), _lazy(wi, (H, 1, N2, 1))
    c_i, s_i = _lazy(c.expand(H, K), (H, K, 1, 1)), _lazy(s.expand(H, K), (H, K, 1, 1))
    x = -wr_j * c_i  # real part of both denominators: > 0 since Re w < 0 (0 only at Nyquist)
    y1, y2 = 2 * s_i - wi_j * c_i, 2 * s_i + wi_j * c_i  # imaginary parts
    i1, i2 = 1 / (x * x + y1 * y1), 1 / (x * x + y2 * y2)
    re = (vr_j * (x * (i1 + i2)) + vi_j * (y1 * i1 - y2 * i2)).sum(dim=2)  # (H, K, M)
    im = (vi_j * (x * (i1 - i2)) - vr_j * (y1 * i1 + y2 * i2)).sum(dim=2)  # (H, K, M)
    return re.permute(2, 0, 1), im.permute(2, 0, 1)


def _random_dplr(H: int, N: int, L: int, dtype: torch.dtype, device: torch.device):
    """Inputs of ``dplr_kernel`` with Re(dt Lambda) < 0, as an S4D-Lin-like initialisation."""
    N2 = N // 2
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    dt = torch.full((H,), 1e-2, dtype=dtype, device=device)
    lam = torch.complex(
        -0.5 * torch.ones(H, N2), torch.pi * torch.arange(N2, dtype=torch.float32).expand(H, N2)
    )
    dtA = (lam * 1e-2).to(device=device, dtype=cdtype)  # (H, N2)
    B, P, C = (
        torch.randn(*shape, dtype=cdtype, device=device) for shape in ((H, N2),) * 2 + ((1, H, N2),)
    )
    return dtA, B, P, C, dt


def bench_cauchy(
    H: int = 64,
    L: int = 16000,
    N: int = 64,
    backends: tuple[str, ...] = ("torch", "keops"),
    repeats: int = 3,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Median seconds of one S4 kernel (``dplr_kernel``) forward and forward+backward per backend.

    Every backend gets the same inputs in the same process, after one untimed warm-up call (which
    includes KeOps' compilation, or torch.compile where enabled); the timed calls alternate
    between the backends. Returns
    {"H", "L", "N", "device", "threads", <backend>: {"forward_s", "forward_backward_s"}, ...,
    "keops_over_torch": forward_backward ratio when both ran}.
    """
    from sashimi.ssm.kernels import dplr_kernel

    dev = torch.device(device)
    leaves = [x.requires_grad_() for x in _random_dplr(H, N, L, dtype, dev)]
    weight = torch.randn(1, H, L, dtype=dtype, device=dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def once(fn) -> float:
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    fns = {}
    for backend in backends:

        def fwd(backend=backend) -> None:
            with torch.no_grad():
                dplr_kernel(*leaves, L=L, backend=backend)

        def fwd_bwd(backend=backend) -> None:
            loss = (dplr_kernel(*leaves, L=L, backend=backend) * weight).sum()
            torch.autograd.grad(loss, leaves)

        fns[backend] = {"forward_s": fwd, "forward_backward_s": fwd_bwd}
        for fn in fns[backend].values():
            fn()  # warm-up (compilation)
    # the backends take turns, so a change in the machine's load hits them alike
    times = {b: {k: [] for k in fns[b]} for b in backends}
    for _ in range(repeats):
        for backend in backends:
            for what, fn in fns[backend].items():
                times[backend][what].append(once(fn))
    out: dict = {"H": H, "L": L, "N": N, "device": str(dev), "threads": torch.get_num_threads()}
    for backend in backends:
        out[backend] = {what: statistics.median(t) for what, t in times[backend].items()}
    if "torch" in out and "keops" in out:
        out["keops_over_torch"] = (
            out["keops"]["forward_backward_s"] / out["torch"]["forward_backward_s"]
        )
    return out


def bench_backends(H: int, L: int, N: int, repeats: int, device: str) -> dict:
    """:func:`bench_cauchy` for `sashimi bench cauchy`: torch always, keops where it compiles
    (else the reason, under "keops")."""
    reason = unavailable_reason()
    out = bench_cauchy(H, L, N, ("torch",) if reason else ("torch", "keops"), repeats, device)
    if reason:
        out["keops"] = {"unavailable": reason}
    return out
