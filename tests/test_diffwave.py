"""DiffWave: official fixture (schedule, embedding, eps, loss, sampling trajectory), samplers, training."""

from __future__ import annotations

import math

import pytest
import torch

from sashimi.errors import UserError
from sashimi.models import MODELS, build_model, count_parameters
from sashimi.models.diffwave import (
    DiffWave,
    convert_official_state_dict,
    diffusion_schedule,
    respaced_steps,
    sample_ancestral,
    sample_fast,
    step_embedding,
)

# the fixture's configurations (diffwave_small.pt meta_cfg)
WAVENET_FX = dict(
    backbone="wavenet", res_channels=8, skip_channels=8, num_res_layers=4, dilation_cycle=2
)
SASHIMI_FX = dict(backbone="sashimi", d_model=8, n_layers=2, pool=[4, 4], expand=2, ff=2)
# tiny models for the behavioural tests
WAVENET_TINY = dict(
    backbone="wavenet", res_channels=16, skip_channels=16, num_res_layers=4, dilation_cycle=2,
    diffusion_step_embed_dim_in=16, diffusion_step_embed_dim_mid=32, diffusion_step_embed_dim_out=32,
)  # fmt: skip
SASHIMI_TINY = dict(
    backbone="sashimi", d_model=8, n_layers=1, pool=[2, 2], d_state=8,
    diffusion_step_embed_dim_in=16, diffusion_step_embed_dim_mid=32, diffusion_step_embed_dim_out=32,
)  # fmt: skip
SCHED_NAMES = {"Beta": "beta", "Alpha": "alpha", "Alpha_bar": "alpha_bar", "Sigma": "sigma"}


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    return torch.load(fixtures_dir / "diffwave_small.pt", weights_only=True)


def _official(fx, name: str, dtype=torch.float32) -> DiffWave:
    prefix = f"{name}.state_dict."
    # cast before converting: the S4 v3 log_dt becomes our inv_dt = softplus^-1(exp(log_dt)) in `dtype`
    sd = {
        k[len(prefix) :]: v.to(dtype) if v.is_floating_point() else v
        for k, v in fx.items()
        if k.startswith(prefix)
    }
    model = DiffWave(**(WAVENET_FX if name == "wavenet" else SASHIMI_FX)).to(dtype)
    model.load_state_dict(convert_official_state_dict(sd, name))
    return model.eval()


# ---------------------------------------------------------------------------------------
# interface, registry, sizes
# ---------------------------------------------------------------------------------------


def test_registry_interface_and_errors():
    assert MODELS["diffwave"] is DiffWave and DiffWave.kind == "diffusion"
    model = build_model("diffwave", **WAVENET_TINY)
    x = torch.randn(3, 64)
    eps = model(x, torch.tensor([0, 5, 199]))
    assert eps.shape == (3, 64)
    assert torch.equal(
        model(x[:, None], torch.tensor([0, 5, 199])), eps[:, None]
    )  # (B, 1, L) in and out
    assert torch.equal(model(x, 7), model(x, torch.full((3,), 7)))  # scalar t broadcasts
    with pytest.raises(UserError, match="d_model"):
        DiffWave(backbone="wavenet", d_model=8)  # a SaShiMi keyword on the WaveNet backbone
    with pytest.raises(UserError, match="res_channels"):
        DiffWave(backbone="sashimi", res_channels=8)
    with pytest.raises(UserError, match="backbone"):
        DiffWave(backbone="unet")
    with pytest.raises(UserError, match="prod\\(pool\\)"):
        DiffWave(**SASHIMI_TINY)(torch.randn(1, 30), 3)


def test_param_counts():
    """Paper configurations (fixture `params_total.paper.*`, HEAD S4 layer for SaShiMi)."""
    assert count_parameters(DiffWave(backbone="wavenet")) == 24_071_681
    small = dict(res_channels=128, skip_channels=256, num_res_layers=30, dilation_cycle=10)
    assert count_parameters(DiffWave(backbone="wavenet", **small)) == 6_827_393
    assert count_parameters(DiffWave(backbone="sashimi")) == 23_470_971
    assert count_parameters(DiffWave(backbone="sashimi", d_model=64)) == 7_734_267
    # small-unidirectional, same S4 layout (the paper's "7.1M" used the January-2022 layer)
    assert (
        count_parameters(DiffWave(backbone="sashimi", d_model=64, bidirectional=False)) == 7_488_507
    )
    assert count_parameters(DiffWave(**WAVENET_FX)) == 347_537
    assert count_parameters(DiffWave(**SASHIMI_FX)) == 489_115


def test_output_layer_zero_init():
    for kw in (WAVENET_TINY, SASHIMI_TINY):
        model = DiffWave(**kw)
        assert torch.count_nonzero(model(torch.randn(2, 32), torch.tensor([3, 150]))) == 0


@pytest.mark.parametrize(
    "extra",
    [{}, {"unet": False}, {"bidirectional": False}, {"ff": 0}],
    ids=["unet", "plain", "uni", "noff"],
)
def test_sashimi_variants_are_non_causal(extra):
    """Every variant runs; the backbone sees the whole clip (no UpPool shift, two-sided S4)."""
    model = DiffWave(**{**SASHIMI_TINY, **extra})
    with torch.no_grad():
        model.backbone.output_proj.weight.normal_()
        x = torch.randn(2, 32)
        y = model(x, torch.tensor([10, 100]))
        x2 = x.clone()
        x2[:, 3] += 1.0  # a later sample in the first pooled block
        if extra.get("bidirectional", True):
            x2[:, -1] += 1.0  # and the last sample
        y2 = model(x2, torch.tensor([10, 100]))
    assert y.shape == (2, 32) and torch.isfinite(y).all()
    assert (y2[:, 0] - y[:, 0]).abs().min() > 0


# ---------------------------------------------------------------------------------------
# official fixture: schedule, step embedding, eps_theta, loss
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prec,dtype", [("fp32", torch.float32), ("fp64", torch.float64)])
def test_fixture_schedule(fx, prec, dtype):
    s = diffusion_schedule(200, 1e-4, 0.02, dtype=dtype)
    for off, ours in SCHED_NAMES.items():
        ref = fx[f"sched_{off}_{prec}"]
        assert ref.dtype == dtype
        torch.testing.assert_close(getattr(s, ours), ref, rtol=0, atol=0)  # bit-exact
    assert s.sigma[0] == s.beta[0].sqrt()


def test_fixture_step_embedding(fx):
    t = fx["wavenet.steps2"].flatten().double()  # [0, 199]
    # the official code makes the frequencies in float32 (the default dtype), hence ~4e-6 at t = 199
    torch.testing.assert_close(
        step_embedding(t, 128), fx["wavenet.step_embedding_steps2_fp64"], rtol=0, atol=1e-5
    )
    f32 = torch.exp(torch.arange(64) * -(math.log(10000) / 63))  # the official frequencies
    arg = t[:, None] * f32.double()
    assert torch.equal(
        torch.cat([arg.sin(), arg.cos()], 1), fx["wavenet.step_embedding_steps2_fp64"]
    )


@pytest.mark.parametrize("name", ["wavenet", "sashimi"])
@pytest.mark.parametrize("prec,dtype", [("fp32", torch.float32), ("fp64", torch.float64)])
def test_fixture_eps(fx, name, prec, dtype):
    model = _official(fx, name, dtype)
    x_t = fx[f"{name}.x_t"].to(dtype)  # (2, 1, 256)
    # fp32: twice the official run's own float32 noise (its fp32 - fp64 gap: WaveNet 6.8e-9, SaShiMi
    # 2.6e-6); fp64: the official step embedding has float32 frequencies (see above), ~2e-8 here
    gap = (fx[f"{name}.eps_theta_fp32"].double() - fx[f"{name}.eps_theta_fp64"]).abs().max().item()
    atol = 2 * gap + 1e-8 if prec == "fp32" else 1e-7
    with torch.no_grad():
        eps = model(x_t, fx[f"{name}.diffusion_steps"].flatten())  # (2, 1, 256)
        torch.testing.assert_close(eps, fx[f"{name}.eps_theta_{prec}"], rtol=0, atol=atol)
        eps2 = model(x_t, fx[f"{name}.steps2"].flatten().to(dtype))  # t = 0 and 199
        torch.testing.assert_close(eps2, fx[f"{name}.eps_theta_steps2_{prec}"], rtol=0, atol=atol)


@pytest.mark.parametrize("name", ["wavenet", "sashimi"])
def test_fixture_training_loss(fx, name):
    model = _official(fx, name)
    x0 = fx["x0"]  # (2, 1, 256)
    t, z = fx[f"{name}.diffusion_steps"].flatten(), fx[f"{name}.noise_z"][:, 0]
    ref = fx[f"{name}.mse_loss_fp32"]
    with torch.no_grad():
        assert model.training_loss(x0[:, 0], t=t, noise=z).item() == pytest.approx(ref, rel=1e-5)
        torch.manual_seed(
            3
        )  # the official run drew t = randint(T) then eps = N(0, 1) after this seed
        assert model.training_loss(x0).item() == pytest.approx(ref, rel=1e-5)
    # x_t as the official code formed it
    ab = diffusion_schedule().alpha_bar.float()[t][:, None, None]
    torch.testing.assert_close(ab.sqrt() * x0 + (1 - ab).sqrt() * z[:, None], fx[f"{name}.x_t"])


# ---------------------------------------------------------------------------------------
# official fixture: the WaveNet sampling trajectory
# ---------------------------------------------------------------------------------------


def test_fixture_sampling_trajectory(fx):
    x_in, eps_ref = (
        fx["wavenet.sampling_x_in"][:, :, 0],
        fx["wavenet.sampling_eps"][:, :, 0],
    )  # (200, 2, 256)
    steps = fx["wavenet.sampling_steps"][:, :, 0]  # (200, 2): 199 .. 0
    s = diffusion_schedule(dtype=torch.float32)
    model = _official(fx, "wavenet")
    with torch.no_grad():  # the network reproduces eps at every row
        for r in range(0, 200, 7):
            eps = model(x_in[r], steps[r])
            torch.testing.assert_close(
                eps, eps_ref[r], rtol=0, atol=2e-6 * eps_ref[r].abs().max().item() + 1e-7
            )
    # the update rule: the noise recovered from consecutive rows is the official run's N(0, 1) stream
    torch.manual_seed(4)
    z_drawn = [torch.randn(2, 256) for _ in range(200)]  # x_T, then z_t for t = 199 .. 1
    assert torch.equal(x_in[0], z_drawn[0])
    for r in range(199):
        t = int(steps[r, 0])
        mean = (
            x_in[r] - (1 - s.alpha[t]) / torch.sqrt(1 - s.alpha_bar[t]) * eps_ref[r]
        ) / torch.sqrt(s.alpha[t])
        z = (x_in[r + 1] - mean) / s.sigma[t]
        tol = 1e-5 * (1 + mean.abs().max().item()) / s.sigma[t].item()
        torch.testing.assert_close(z, z_drawn[r + 1], rtol=0, atol=tol)
    # our sampler with the same global-RNG seed reproduces the official final sample (pre-clamp)
    torch.manual_seed(4)
    x0 = sample_ancestral(model, 2, 256, clip=False)
    ref = fx["wavenet.sampling_x0"][:, 0]
    torch.testing.assert_close(x0, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    torch.manual_seed(4)
    assert torch.equal(sample_ancestral(model, 2, 256), x0.clamp(-1, 1))


# ---------------------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------------------


def test_respaced_steps():
    assert respaced_steps(200, 200) == list(range(200))
    taus = respaced_steps(200, 50)
    assert len(taus) == 50 and taus[0] == 0 and taus[-1] == 199 and taus == sorted(set(taus))
    assert respaced_steps(200, 1) == [199]
    with pytest.raises(UserError):
        respaced_steps(200, 0)


@pytest.mark.parametrize("kw", [WAVENET_TINY, SASHIMI_TINY], ids=["wavenet", "sashimi"])
def test_samplers_shape_range(kw):
    model = DiffWave(**kw, T=20)
    with torch.no_grad():  # make the zero-initialised output layer non-trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    for x in (
        sample_ancestral(model, 3, 32, generator=g),
        sample_fast(model, 3, 32, steps=5, generator=g),
    ):
        assert x.shape == (3, 32) and torch.isfinite(x).all() and x.abs().max() <= 1
    x1 = sample_fast(model, 2, 32, steps=5, eta=0.0, generator=torch.Generator().manual_seed(1))
    x2 = sample_fast(model, 2, 32, steps=5, eta=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x1, x2)
    assert model.training  # samplers restore the mode


def test_fast_sampler_with_all_steps_is_the_ancestral_sampler():
    model = DiffWave(**WAVENET_TINY, T=50).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a = sample_ancestral(model, 2, 64, generator=torch.Generator().manual_seed(5), clip=False)
    b = sample_fast(
        model, 2, 64, steps=50, eta=1.0, generator=torch.Generator().manual_seed(5), clip=False
    )
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


class _GaussianOracle(DiffWave):
    """The exact eps-predictor for data x0 ~ N(0, s2 I): eps* = sqrt(1 - abar) x_t / (abar s2 + 1 - abar)."""

    def __init__(self, s2: float):
        super().__init__(**WAVENET_TINY)
        self.s2 = s2

    def forward(self, x_t, t):
        ab = self.schedule(x_t.dtype, x_t.device).alpha_bar[t][:, None]  # (B, 1)
        return torch.sqrt(1 - ab) * x_t / (ab * self.s2 + 1 - ab)


def _final_variance(s2: float, taus: list[int], eta: float | None) -> float:
    """Var of the sampler's output under the Gaussian oracle: every step is x <- k x + sigma z."""
    s = diffusion_schedule()
    v = 1.0
    for i in range(len(taus) - 1, -1, -1):
        t = taus[i]
        ab = s.alpha_bar[t].item()
        c = math.sqrt(1 - ab) / (ab * s2 + 1 - ab)  # eps = c x
        if eta is None:  # ancestral
            a = s.alpha[t].item()
            k = (1 - (1 - a) / math.sqrt(1 - ab) * c) / math.sqrt(a)
            var = s.sigma[t].item() ** 2 if t > 0 else 0.0
        else:
            ab_s = s.alpha_bar[taus[i - 1]].item() if i > 0 else 1.0
            var = eta**2 * (1 - ab_s) / (1 - ab) * (1 - ab / ab_s)
            k = (
                math.sqrt(ab_s) * (1 - math.sqrt(1 - ab) * c) / math.sqrt(ab)
                + math.sqrt(1 - ab_s - var) * c
            )
        v = k * k * v + var
    return v


def test_samplers_with_the_exact_denoiser_for_gaussian_data():
    """Data N(0, s2) and the exact eps: every sampler is linear-Gaussian, so its output variance
    follows a recursion. The full sampler lands near s2 (below it: abar_T = 0.13, so x_T ~ N(0, I)
    is not the true marginal). The eta = 1 chain tends to the full sampler as steps -> T; DDIM
    (the default) at 20-50 steps stays within 10% of it. The real samplers match the recursion."""
    s2 = 0.04  # std 0.2, speech-like
    full = _final_variance(s2, list(range(200)), None)
    assert 0.9 * s2 < full < s2
    assert _final_variance(s2, list(range(200)), 1.0) == pytest.approx(full, rel=1e-9)
    gaps = [
        abs(_final_variance(s2, respaced_steps(200, S), 1.0) / full - 1)
        for S in (5, 10, 25, 50, 100, 200)
    ]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-9
    for S in (20, 50):
        assert _final_variance(s2, respaced_steps(200, S), 0.0) == pytest.approx(full, rel=0.11)
    oracle = _GaussianOracle(s2)
    g = torch.Generator().manual_seed(0)
    x = sample_ancestral(oracle, 256, 256, generator=g, clip=False)  # 65,536 values: var to ~0.6%
    assert x.var().item() == pytest.approx(full, rel=0.03) and abs(x.mean().item()) < 0.01
    for eta in (0.0, 1.0):
        x = sample_fast(oracle, 256, 256, steps=50, eta=eta, generator=g, clip=False)
        assert x.var().item() == pytest.approx(
            _final_variance(s2, respaced_steps(200, 50), eta), rel=0.03
        )


# ---------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------


def _toy_batch(B: int, L: int, g: torch.Generator) -> torch.Tensor:
    """Random-phase sinusoids of a few frequencies, amplitude 0.5."""
    f = torch.tensor([2.0, 4.0, 8.0])[torch.randint(3, (B, 1), generator=g)]
    phase = 2 * math.pi * torch.rand(B, 1, generator=g)
    n = torch.arange(L)[None, :]
    return 0.5 * torch.sin(2 * math.pi * f * n / L + phase)  # (B, L)


@pytest.mark.parametrize("kw", [WAVENET_TINY, SASHIMI_TINY], ids=["wavenet", "sashimi"])
def test_short_training_lowers_the_loss(kw):
    torch.manual_seed(0)
    model = DiffWave(**kw)
    g = torch.Generator().manual_seed(1)
    x_eval = _toy_batch(32, 64, g)
    t_eval, z_eval = torch.randint(200, (32,), generator=g), torch.randn(32, 64, generator=g)
    with torch.no_grad():
        before = model.training_loss(x_eval, t=t_eval, noise=z_eval).item()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model.training_loss(_toy_batch(16, 64, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model.training_loss(x_eval, t=t_eval, noise=z_eval).item()
    assert after < 0.7 * before, (before, after)
