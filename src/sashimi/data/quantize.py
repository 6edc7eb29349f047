"""8-bit quantisation exactly as the SaShiMi code does it (256 classes, token 128 = "zero").

Every encoder min-max scales each chunk on its own over the LAST dimension, then follows the
official data loader step by step, including its two small constants:

    scale:    s = lo + (hi - lo) * (x - min) / (max - min + 1e-6)
    mu-law:   c = sign(s) * log1p(mu * |s + 1e-8|) / log1p(mu),  s in [-1, 1], mu = 255
              y = (c + 1) / 2
    linear:   y = s,  s in [0, 1]
    quantise: q = floor(y * (256 - 0.01) + 0.005)        (int64 in [0, 255])
    decode:   v = q / 128 - 1;  mu-law then expands sign(v) * ((1 + mu)^|v| - 1) / mu

Not torchaudio's mu_law_encoding: same curve (tests compare them), but it quantises with
round(y * 255) and decodes with q / 255 * 2 - 1, so about half the tokens would differ by one.
"""

from __future__ import annotations

import numpy as np
import torch

N_CLASSES = 256  # 8 bits
ZERO_TOKEN = 128  # decodes to 0.0; the start (BOS) token and the input padding value
MU = N_CLASSES - 1  # mu-law mu = 255
EPSILON = 0.01  # q = floor(y * (256 - EPSILON) + EPSILON / 2)
SCALE_EPS = 1e-6  # min-max denominator guard, as in the official minmax_scale
MU_EPS = 1e-8  # inside |.| of the mu-law numerator, as in the official mu_law_encode

KINDS = ("mu-law", "linear")
_ALIASES = {"mu-law": "mu-law", "mulaw": "mu-law", "mu_law": "mu-law", "linear": "linear"}


def _as_float(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x if x.is_floating_point() else x.float()


def minmax_scale(x: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Scale each chunk (last dim) to [lo, hi) exactly as the official code (+1e-6 guard)."""
    x_min = torch.amin(x, dim=-1, keepdim=True)  # (..., 1)
    x_max = torch.amax(x, dim=-1, keepdim=True)  # (..., 1)
    return lo + (hi - lo) * (x - x_min) / (x_max - x_min + SCALE_EPS)  # (..., L)


def quantize_unit(y: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> int64 tokens: floor(y * (256 - 0.01) + 0.005) (truncation = floor for y >= 0)."""
    return (y * (N_CLASSES - EPSILON) + EPSILON / 2).long()  # (..., L)


def dequantize_unit(q: torch.Tensor) -> torch.Tensor:
    """Tokens -> [-1, 1): q / 128 - 1 (token 128 -> 0)."""
    return q.float() / (N_CLASSES / 2) - 1  # (..., L)


def mu_law_compand(s: torch.Tensor) -> torch.Tensor:
    """The mu-law curve on [-1, 1] (with the official 1e-8 inside the absolute value)."""
    mu = torch.tensor(float(MU), dtype=s.dtype)
    return torch.sign(s) * torch.log1p(mu * torch.abs(s + MU_EPS)) / torch.log1p(mu)


def mu_law_expand(v: torch.Tensor) -> torch.Tensor:
    """Inverse of the mu-law curve: sign(v) * ((1 + mu)^|v| - 1) / mu."""
    return torch.sign(v) * ((1 + MU) ** torch.abs(v) - 1) / MU


def mu_law_encode(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Float audio (..., L) -> int64 tokens (..., L): per-chunk min-max to [-1, 1], mu-law, quantise."""
    s = minmax_scale(_as_float(x), -1.0, 1.0)  # (..., L) in [-1, 1)
    y = (mu_law_compand(s) + 1) / 2  # (..., L) in [0, 1)
    return quantize_unit(y)


def mu_law_decode(q: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Tokens (..., L) -> float32 audio in [-1, 1)."""
    return mu_law_expand(dequantize_unit(torch.as_tensor(q)))


def linear_encode(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Float audio (..., L) -> int64 tokens (..., L): per-chunk min-max to [0, 1], quantise."""
    return quantize_unit(minmax_scale(_as_float(x), 0.0, 1.0))


def linear_decode(q: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Tokens (..., L) -> float32 audio in [-1, 1)."""
    return dequantize_unit(torch.as_tensor(q))


def canonical_kind(kind: str) -> str:
    """'mu-law' (also 'mulaw', 'mu_law') or 'linear'; anything else is a ValueError."""
    try:
        return _ALIASES[kind.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown quantization {kind!r}; expected one of {KINDS}") from None


def encode(x: torch.Tensor | np.ndarray, kind: str) -> torch.Tensor:
    """Quantise with `kind` in {'mu-law', 'linear'}; each chunk (last dim) is min-max scaled."""
    return mu_law_encode(x) if canonical_kind(kind) == "mu-law" else linear_encode(x)


def decode(q: torch.Tensor | np.ndarray, kind: str) -> torch.Tensor:
    """Tokens -> float audio in [-1, 1) for `kind` in {'mu-law', 'linear'}."""
    return mu_law_decode(q) if canonical_kind(kind) == "mu-law" else linear_decode(q)
