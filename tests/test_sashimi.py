"""SaShiMi backbone: pooling layouts, parameter counts, causality, step == conv."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from sashimi.errors import UserError
from sashimi.models import MODELS, build_model, count_parameters
from sashimi.models.blocks import (
    ChannelNorm,
    DownPool,
    FFBlock,
    ResidualBlock,
    UpPool,
    WNLinear,
    channel_norm_reference,
)
from sashimi.models.sashimi import SaShiMi, param_count
from sashimi.ssm.s4 import S4Block


def _tiny(**kw) -> SaShiMi:
    args = dict(d_model=8, n_layers=1, pool=(4, 4), expand=2, ff=2, glu=False)
    args.update(kw)
    return SaShiMi(**args).eval()


def _step_all(model: SaShiMi, x: torch.Tensor, **setup) -> torch.Tensor:
    model.setup_step(**setup)
    state = model.default_state(x.shape[0])
    out = []
    for t in range(x.shape[1]):
        y, state = model.step(x[:, t], state)
        out.append(y)
    return torch.stack(out, 1)  # (B, L, 256)


# ----------------------------------------------------------------------------- blocks


def test_registry_and_interface():
    assert MODELS["sashimi"] is SaShiMi
    assert SaShiMi.kind == "ar" and SaShiMi.context == 0
    m = build_model("sashimi", d_model=8, n_layers=1)
    x = torch.randint(0, 256, (2, 32))
    assert m(x).shape == (2, 32, 256)


def test_weight_norm_linear():
    lin = WNLinear(5, 3).double()
    v, g = lin.weight_v, lin.weight_g
    assert v.shape == (3, 5) and g.shape == (3, 1)
    torch.testing.assert_close(lin.weight, v)  # init: g = ||v||, so W = v
    with torch.no_grad():
        g.mul_(torch.tensor([[2.0], [3.0], [0.5]], dtype=torch.float64))
    torch.testing.assert_close(lin.weight.norm(dim=1), g[:, 0])


def test_channel_norm_scalar_no_eps():
    n = ChannelNorm().double()
    with torch.no_grad():
        n.m.fill_(0.3)
        n.s.fill_(1.7)
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    mean, std = x.mean(-1, keepdim=True), x.std(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(n(x), 1.7 / std * (x - mean + 0.3))
    assert n.m.shape == (1,) and n.s.shape == (1,)


def test_channel_norm_backward_matches_autograd_of_the_formula():
    from sashimi.models.blocks import _ChannelNormFn

    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    m = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([1.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_ChannelNormFn.apply, (x, m, s))
    g = torch.randn(3, 5, 7, dtype=torch.float64)
    ours = torch.autograd.grad((_ChannelNormFn.apply(x, m, s) * g).sum(), (x, m, s))
    ref = torch.autograd.grad((channel_norm_reference(x, m, s) * g).sum(), (x, m, s))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("glu", [True, False])
def test_compiled_pointwise_tails_match_eager(glu):
    """With the compile switch on, the S4 block's GELU -> linear (-> GLU) + residual tail runs
    torch.compile'd (kernels.maybe_compiled): same outputs and gradients as eager (so do the FF
    block and the channel norm around it)."""
    from sashimi.models import blocks as sm
    from sashimi.ssm import kernels
    from sashimi.ssm.s4 import s4_head

    torch.manual_seed(0)
    blocks = [ResidualBlock(8, S4Block(8, d_state=4, glu=glu)), ResidualBlock(8, FFBlock(8, 2))]
    x = torch.randn(2, 24, 8, dtype=torch.float64)
    g = torch.randn(2, 24, 8, dtype=torch.float64)
    for blk in blocks:
        blk.double()
        outs = {}
        for mode in ("never", "always"):
            kernels.set_compile_mode(blk, mode)
            xi = x.clone().requires_grad_(True)
            y = blk(xi)
            grads = torch.autograd.grad((y * g).sum(), [xi, *blk.parameters()])
            outs[mode] = (y.detach(), grads)
        assert not kernels._compile_broken
        torch.testing.assert_close(outs["always"][0], outs["never"][0])
        for a, b in zip(outs["always"][1], outs["never"][1], strict=True):
            torch.testing.assert_close(a, b)
    assert {s4_head, sm._channel_norm_fwd, sm._channel_norm_bwd} <= set(kernels._pointwise)


def test_channel_norm_compiled_path_matches_the_formula():
    """With the compile switch on, forward and backward run torch.compile'd (one pass each)."""
    from sashimi.models import blocks as sm
    from sashimi.ssm import kernels

    x = torch.randn(2, 33, 16, dtype=torch.float64, requires_grad=True)
    m = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([1.7], dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 33, 16, dtype=torch.float64)
    y = sm._ChannelNormFn.apply(x, m, s, "always")
    ours = torch.autograd.grad((y * g).sum(), (x, m, s))
    assert not kernels._compile_broken
    assert {sm._channel_norm_fwd, sm._channel_norm_bwd} <= set(kernels._pointwise)
    ref_y = channel_norm_reference(x, m, s)
    ref = torch.autograd.grad((ref_y * g).sum(), (x, m, s))
    torch.testing.assert_close(y, ref_y)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_downpool_matches_official_layout():
    """Input feature h*s + j of the linear is channel h at time l*s + j."""
    H, s, L = 3, 4, 12
    dp = DownPool(H, 5, stride=s).double()
    x = torch.randn(2, L, H, dtype=torch.float64)
    feats = torch.stack(
        [
            torch.stack([x[:, l * s + j, h] for h in range(H) for j in range(s)], -1)
            for l in range(L // s)
        ],
        1,
    )  # (B, L/s, H*s), feature h*s + j
    ref = feats @ dp.linear.weight.T + dp.linear.bias
    torch.testing.assert_close(dp(x), ref)
    dp.setup_step()
    torch.testing.assert_close(dp.fire([x[:, j] for j in range(s)]), ref[:, 0])


def test_uppool_matches_official_layout_and_is_shifted():
    """Output feature h*s + j goes to time l*s + j, one pooled step later; zeros first."""
    Hi, Ho, s, Lp = 6, 3, 4, 5
    up = UpPool(Hi, Ho, stride=s).double()
    x = torch.randn(2, Lp, Hi, dtype=torch.float64)
    y = x @ up.linear.weight.T + up.linear.bias  # (B, Lp, Ho*s)
    ref = torch.zeros(2, Lp * s, Ho, dtype=torch.float64)
    for l in range(1, Lp):
        for h in range(Ho):
            for j in range(s):
                ref[:, l * s + j, h] = y[:, l - 1, h * s + j]
    torch.testing.assert_close(up(x), ref)
    up.setup_step()
    outs = up.refill(x[:, 0])
    torch.testing.assert_close(torch.stack(outs, 1), ref[:, s : 2 * s])
    up_nc = UpPool(Hi, Ho, stride=s, causal=False).double()
    up_nc.load_state_dict(up.state_dict())
    torch.testing.assert_close(up_nc(x)[:, : (Lp - 1) * s], ref[:, s:])


def test_ff_and_residual_block():
    ff = FFBlock(4, expand=2)
    assert ff.linear1.weight.shape == (8, 4) and ff.linear2.weight.shape == (4, 8)
    blk = ResidualBlock(4, ff)
    x = torch.randn(3, 5, 4)
    torch.testing.assert_close(blk(x), x + ff(blk.norm(x)))
    y, st = blk.step(x[:, 0], blk.default_state(3))
    torch.testing.assert_close(y, blk(x)[:, 0])
    assert st is None
    assert (
        sum(p.numel() for p in FFBlock(4, weight_norm=True).parameters())
        == 8 * 4 + 8 + 8 + 4 * 8 + 4 + 4
    )


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "n_layers, glu, expected",
    [(2, False, 1_287_192), (4, False, 2_211_248), (6, False, 3_135_304), (8, False, 4_059_360),
     (8, True, 4_751_072)],
)  # fmt: skip
def test_paper_parameter_counts(n_layers, glu, expected):
    kw = dict(d_model=64, n_layers=n_layers, pool=(4, 4), expand=2, ff=2, glu=glu)
    assert param_count(**kw) == expected
    assert count_parameters(SaShiMi(**kw)) == expected


@pytest.mark.parametrize(
    "kw", [dict(unet=True), dict(bidirectional=True, unet=True), dict(ff=0, pool=(2, 2, 2))]
)
def test_param_count_formula_other_variants(kw):
    args = dict(d_model=8, n_layers=2, glu=True, **kw)
    assert count_parameters(SaShiMi(**args)) == param_count(**args)


# ----------------------------------------------------------------------------- behaviour


def test_causal():
    torch.manual_seed(1)
    m = _tiny().double()
    x = torch.randint(0, 256, (2, 64))
    base = m(x)
    for t in (0, 5, 15, 16, 17, 40, 63):
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 77) % 256
        out = m(x2)
        if t > 0:
            assert (out[:, :t] - base[:, :t]).abs().max().item() < 1e-12, t
        assert (out[:, t] - base[:, t]).abs().max().item() > 1e-6, t  # x[t] does reach y[t]


def test_length_not_divisible_is_padded_for_causal_and_rejected_for_bidirectional():
    m = _tiny().double()
    x = torch.randint(0, 256, (2, 50))
    full = m(torch.nn.functional.pad(x, (0, 14), value=3))  # anything after 50 is irrelevant
    torch.testing.assert_close(m(x), full[:, :50])
    bi = _tiny(bidirectional=True, unet=True)
    with pytest.raises(UserError, match="divisible"):
        bi(x)
    with pytest.raises(UserError, match="bidirectional"):
        bi.setup_step()


def test_bidirectional_is_not_causal():
    m = _tiny(bidirectional=True, unet=True).double()
    x = torch.randint(0, 256, (1, 32))
    x2 = x.clone()
    x2[:, 20] = (x2[:, 20] + 1) % 256
    assert (m(x2)[:, :20] - m(x)[:, :20]).abs().max() > 1e-6


@pytest.mark.parametrize("fused", [True, False])
def test_step_matches_conv_long_float32(fused):
    """>= 1024 recurrent steps agree with the convolution (random init, float32)."""
    torch.manual_seed(2)
    m = _tiny(d_model=16, glu=True)
    x = torch.randint(0, 256, (2, 1024))
    with torch.no_grad():
        conv = m(x)
    step = _step_all(m, x, fused=fused)
    err = (step - conv).abs().max().item()
    assert err < 1e-3, err


@pytest.mark.parametrize(
    "kw", [dict(unet=True), dict(pool=(2, 4, 2), expand=1, ff=0), dict(glu=True, n_layers=2)]
)
@pytest.mark.parametrize("fused", [True, False])
def test_step_matches_conv_variants_float64(kw, fused):
    torch.manual_seed(3)
    m = _tiny(**kw).double()
    x = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        conv = m(x)
    torch.testing.assert_close(
        _step_all(m, x, fused=fused), conv, atol=1e-6, rtol=1e-6
    )  # modal step: ~1e-7


def test_fused_step_matches_block_by_block_step_and_dense_oracle():
    """The fused fast path == each block's own S4Block.step (modal) == the exact dense step."""
    torch.manual_seed(5)
    m = _tiny(d_model=16, n_layers=2, glu=True)
    x = torch.randint(0, 256, (3, 96))
    fast = _step_all(m, x, fused=True)
    assert any(c.fused for c in m._stepper.up_chains)
    generic = _step_all(m, x)
    assert not any(c.fused for c in m._stepper.up_chains)
    dense = _step_all(m, x, s4_mode="dense")
    assert (fast - generic).abs().max() < 1e-5
    assert (fast - dense).abs().max() < 1e-4


def test_cuda_graph_needs_a_cuda_model():
    m = _tiny()
    with pytest.raises(UserError, match="cuda_graph"):
        m.setup_step(cuda_graph=True)
    m.setup_step(compile=False)  # default: no graphs on a CPU
    assert not m._stepper.cuda_graph and "graphed" not in m.default_state(1)


def test_step_requires_setup_and_state_is_fresh_after_dtype_change():
    m = _tiny()
    with pytest.raises(RuntimeError, match="setup_step"):
        m.default_state(1)
    m.setup_step()
    m.double()  # caches are stale now
    with pytest.raises(RuntimeError, match="setup_step"):
        m.step(torch.zeros(1, dtype=torch.long), {})


def test_pair_conjugate_modes_keeps_the_impulse_response():
    from sashimi.generation.fused import pair_conjugate_modes as _pair_conjugate_modes
    from sashimi.ssm.s4 import S4Kernel

    torch.manual_seed(0)
    lam, c, _ = S4Kernel(8).modal_system()  # (H, N), (1, H, N)
    lam2, c2 = _pair_conjugate_modes(lam, c[0])
    assert lam2.shape[1] < lam.shape[1]  # most HiPPO-derived poles are conjugate pairs
    ls = torch.arange(3000.0, dtype=torch.float64)

    def response(lam, c):
        return (c.unsqueeze(-1) * lam.unsqueeze(-1) ** ls).sum(-2).real  # (H, L)

    ref = response(lam, c[0])
    assert ((response(lam2, c2) - ref).abs().amax(-1) / ref.abs().amax(-1)).max() < 1e-6
    # two distinct real poles are never merged
    lam_r = torch.tensor(
        [[0.5 + 1e-12j, 0.5001 - 1e-12j, 0.3 + 0.2j, 0.3 - 0.2j]], dtype=torch.complex128
    )
    c_r = torch.tensor([[1.0 + 0j, -1.0 + 0j, 0.5 + 0.1j, 0.5 - 0.1j]], dtype=torch.complex128)
    lam3, c3 = _pair_conjugate_modes(lam_r, c_r)
    assert lam3.shape[1] == 3
    torch.testing.assert_close(response(lam3, c3), response(lam_r, c_r))


def test_deepcopy_after_setup_step_drops_step_caches():
    import copy

    m = _tiny()
    m.setup_step()
    m2 = copy.deepcopy(m)
    assert m2._stepper is None and m._stepper is not None
    x = torch.randint(0, 256, (1, 16))
    torch.testing.assert_close(m2(x), m(x))


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_step_matches_eager(batch):
    """The compiled fused step (in-place float64 states; at batch 1 the linears are fused
    reductions, above it GEMMs) equals the eager per-block step. ~25 s of compiling each."""
    torch.manual_seed(4)
    m = _tiny(glu=True)
    x = torch.randint(0, 256, (batch, 48))
    eager = _step_all(m, x, fused=False)
    m.setup_step(compile=True)
    state = m.default_state(batch)
    out = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(x.shape[1]):
            y, state = m.step(x[:, t], state)
            out.append(y)
    assert not [w for w in caught if "using eager" in str(w.message)]  # the compiled code ran
    assert m._stepper.up_chains[0].fused
    torch.testing.assert_close(torch.stack(out, 1), eager, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_whole_model_compile_gives_the_eager_gradients():
    """torch.compile of the whole model (library use). The S4 layers' own compiled kernels
    step aside inside it, and FFTConv's output stays linked to its backward (it once came
    back cut off: every S4 parameter got a zero gradient). ~1 min of compiling."""
    # the S4 switch on: outside a whole-model compile the compiled Cauchy / norm paths run
    from sashimi.ssm.kernels import set_compile_mode

    torch.manual_seed(8)
    m = _tiny(d_model=8, pool=(4,), glu=True).train()
    set_compile_mode(m, "always")
    x = torch.randint(0, 256, (2, 64))
    m(x).square().mean().backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    torch.compile(m)(x).square().mean().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, n
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-3, atol=1e-4 * ref[n].abs().max())


def _rotation_step(x: torch.Tensor, state: tuple, ordered: bool = True) -> tuple:
    """A two-part state updated in place one step late (from the previous input), like the
    fused S4 step; `ordered=False` writes s_r before reading it for s_i: the miscompile that
    the first-call check exists for."""
    sr, si, u_prev = state
    a, b = 0.9, 0.3
    if ordered:
        nr, ni = a * sr - b * si + u_prev, a * si + b * sr + u_prev
        sr.copy_(nr)
        si.copy_(ni)
    else:
        sr.copy_(a * sr - b * si + u_prev)
        si.copy_(a * si + b * sr + u_prev)
    u_prev.copy_(x.double())
    return (sr + si).float() + x, state


def test_first_call_check_rejects_a_stage_that_misorders_its_state_update():
    from sashimi.generation.stepper import compiled_matches_eager as _compiled_matches_eager

    x = torch.randn(3, 4)
    state = tuple(torch.zeros(3, 4, dtype=torch.float64) for _ in range(3))
    wrong = functools.partial(_rotation_step, ordered=False)
    assert _compiled_matches_eager(_rotation_step, _rotation_step, (x, state))
    with pytest.warns(UserWarning, match="differs from eager"):
        assert not _compiled_matches_eager(_rotation_step, wrong, (x, state))
    # one call cannot tell them apart (state and previous input still zero): the check must
    # carry the state over several calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _compiled_matches_eager(_rotation_step, wrong, (x, state), calls=1)
    assert state[0].abs().sum() == 0  # the caller's state is left alone
