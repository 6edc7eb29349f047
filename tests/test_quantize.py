"""Quantisation: agreement with the paper code's formulas, round trips, token 128, dtypes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchaudio.functional as AF
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sashimi.data import quantize as Q


# The official data loader's steps, transcribed literally as the oracle (in-place float32 ops).
def paper_minmax(x, lo, hi):
    x_min = torch.amin(x, dim=-1, keepdim=True)
    x_max = torch.amax(x, dim=-1, keepdim=True)
    return lo + (hi - lo) * (x - x_min) / (x_max - x_min + 1e-6)


def paper_quantize(y):
    y = y.clone()
    y *= 256 - 0.01
    y += 0.01 / 2
    return y.long()


def paper_mu_law_encode(x):
    mu = torch.tensor(255)
    s = paper_minmax(x, -1, 1)
    c = torch.sign(s) * (torch.log1p(mu * torch.abs(s + 1e-8)) / torch.log1p(mu))
    return paper_quantize((c + 1) / 2)


def paper_linear_encode(x):
    return paper_quantize(paper_minmax(x.clone(), 0, 1))


def paper_decode(q, mu_law):
    v = q.float() / 128 - 1
    return torch.sign(v) * ((1 + 255) ** torch.abs(v) - 1) / 255 if mu_law else v


audio = arrays(
    np.float32,
    st.integers(2, 300),
    elements=st.floats(-1, 1, width=32, allow_nan=False),
)


@settings(max_examples=150, deadline=None)
@given(audio)
def test_matches_paper_formulas(x):
    x = torch.from_numpy(x)
    assert torch.equal(Q.mu_law_encode(x), paper_mu_law_encode(x))
    assert torch.equal(Q.linear_encode(x), paper_linear_encode(x))
    q = torch.randint(0, 256, (64,))
    assert torch.equal(Q.mu_law_decode(q), paper_decode(q, True))
    assert torch.equal(Q.linear_decode(q), paper_decode(q, False))


def test_matches_paper_on_real_scale_audio():
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.randn(4, 16000, generator=g)  # (B, L) speech-like scale
    assert torch.equal(Q.encode(x, "mu-law"), paper_mu_law_encode(x))
    assert torch.equal(Q.encode(x, "linear"), paper_linear_encode(x))


@settings(max_examples=100, deadline=None)
@given(audio)
def test_dtype_range_and_extremes(x):
    x = torch.from_numpy(x)
    for kind in Q.KINDS:
        q = Q.encode(x, kind)
        assert q.dtype == torch.int64 and q.shape == x.shape
        assert int(q.min()) >= 0 and int(q.max()) <= 255
        if float(x.max() - x.min()) > 1e-3:  # a non-degenerate chunk uses both ends of the range
            assert int(q[x.argmin()]) == 0 and int(q[x.argmax()]) == 255


@settings(max_examples=100, deadline=None)
@given(audio.filter(lambda a: float(a.max() - a.min()) > 1e-2))
def test_round_trip_error_bounds(x):
    x = torch.from_numpy(x).double()
    # linear: the reconstruction of the min-max scaled chunk is off by at most one level (1/128).
    s = Q.minmax_scale(x, -1.0, 1.0)
    err = (Q.linear_decode(Q.linear_encode(x)).double() - s).abs()
    assert float(err.max()) <= 1 / 128 + 1e-4
    # mu-law: one level in the companded domain, i.e. a relative error in the signal domain.
    c = Q.mu_law_compand(s)
    v = Q.dequantize_unit(Q.mu_law_encode(x)).double()
    assert float((v - c).abs().max()) <= 1 / 128 + 1e-4
    err = (Q.mu_law_decode(Q.mu_law_encode(x)).double() - s).abs()
    slope = math.log(256) / 255 * (1 + 255 * s.abs())  # |d expand / dv| at the sample
    assert torch.all(err <= slope * (1 / 128 + 1e-4) * 1.05 + 1e-6)


def test_zero_token_decodes_to_zero():
    q = torch.tensor([Q.ZERO_TOKEN])
    assert Q.ZERO_TOKEN == 128 and Q.N_CLASSES == 256
    assert float(Q.mu_law_decode(q)) == 0.0
    assert float(Q.linear_decode(q)) == 0.0
    assert float(Q.decode(q, "mu-law")) == 0.0 and float(Q.decode(q, "linear")) == 0.0


def test_batch_is_per_chunk():
    g = torch.Generator().manual_seed(1)
    x = (
        torch.randn(3, 5, 100, generator=g) * torch.tensor([0.01, 1.0, 5.0])[:, None, None]
    )  # (3, 5, L)
    for kind in Q.KINDS:
        q = Q.encode(x, kind)
        for i in range(3):
            for j in range(5):
                assert torch.equal(q[i, j], Q.encode(x[i, j], kind))
    # an affine change of a chunk barely changes its tokens (min-max per chunk; the 1e-6
    # guard in the denominator and float rounding can move a sample by one level)
    d = Q.encode(x[1, 0] * 7 + 3, "linear") - Q.encode(x[1, 0], "linear")
    assert int(d.abs().max()) <= 1 and int((d != 0).sum()) <= 2


def test_constant_chunk_is_finite():
    for kind in Q.KINDS:
        q = Q.encode(torch.zeros(50), kind)
        assert q.dtype == torch.int64 and int(q.min()) >= 0 and int(q.max()) <= 255


def test_numpy_and_aliases():
    x = np.linspace(-0.5, 0.5, 33, dtype=np.float32)
    assert torch.equal(Q.encode(x, "mulaw"), Q.encode(torch.from_numpy(x), "mu-law"))
    assert torch.equal(Q.encode(x, "mu_law"), Q.mu_law_encode(x))
    with pytest.raises(ValueError, match="unknown quantization"):
        Q.encode(x, "a-law")


def test_companding_curve_agrees_with_torchaudio():
    """torchaudio shares the mu-law curve but quantises as round(y * 255): check where they agree."""
    s = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    c = Q.mu_law_compand(s)  # ours, in [-1, 1]
    ta = AF.mu_law_encoding(s, 256)  # torchaudio: floor((c + 1) / 2 * 255 + 0.5)
    ours_rounded = torch.floor((c + 1) / 2 * 255 + 0.5).long()
    assert (ta != ours_rounded).sum() <= 2  # only the 1e-8 offset near 0 can flip a level
    # the expansion: torchaudio decodes q as expand(q / 255 * 2 - 1)
    q = torch.arange(256)
    assert torch.allclose(
        AF.mu_law_decoding(q, 256).double(), Q.mu_law_expand(q.double() / 255 * 2 - 1), atol=1e-6
    )
    # ...and the two quantisers genuinely differ, which is why the formula is written out
    x = torch.linspace(-1, 1, 1001)
    assert not torch.equal(AF.mu_law_encoding(Q.minmax_scale(x, -1, 1), 256), Q.mu_law_encode(x))
