"""The S4 Cauchy sums as pykeops reductions (the optional ``keops`` kernel backend).

KeOps compiles each formula to C++ once (g++ on a CPU, nvcc/nvrtc on a GPU; cached under
~/.cache/keops*) and reduces over the modes without materialising the (..., N, K) Cauchy
tensor; autograd comes from its symbolic gradients. :func:`cauchy` is ``kernels.cauchy_naive``'s
sum for any nodes; :func:`cauchy_dplr` the ``torch`` backend's c-scaled real sums, which
``dplr_kernel(..., backend="keops")`` calls. `sashimi bench cauchy` times both backends.
"""

from __future__ import annotations

import functools

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
    """r[..., k] = sum_n v_n/(z_k - w_n) + conj(v_n)/(z_k - conj(w_n)) as one KeOps reduction;
    v, w: (..., N/2) complex, broadcast together; z: (K,) -> (..., K) complex."""
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
    """Re, Im (M, H, K) of rho[m, h, k] = sum_n v/(2i s_k - w c_k) + conj(v)/(2i s_k - conj(w) c_k)
    from vr, vi (M, H, N2), wr, wi (H, N2), c, s (K,); the M numerators share the denominators."""
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
