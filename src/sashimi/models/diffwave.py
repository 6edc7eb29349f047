"""DiffWave (Kong et al. 2021), unconditional, with a WaveNet or a SaShiMi backbone.

A reimplementation of albertfgu/diffwave-sashimi, the code behind the paper's SC09 diffusion
results. Diffusion: T = 200 steps, beta linear 1e-4 -> 0.02, abar_t = prod_{s<=t} (1 - beta_s);
training draws t ~ U{0..T-1}, eps ~ N(0, I) and regresses eps_theta(sqrt(abar_t) x0 +
sqrt(1 - abar_t) eps, t) on eps. A sinusoidal step embedding -> (Linear 512, SiLU) x 2 is shared
by all residual blocks, each adding its own Linear(512, H) projection e_t (WaveNet: to the layer
input; SaShiMi: to the normalised input of the S4 branch). Backbones: `WaveNetBackbone` and
`SaShiMiBackbone` (a non-causal U-Net SaShiMi). Samplers: `sample_ancestral` (the official
200-step sampler; with the same global seed it reproduces the official trajectory) and
`sample_fast` (DDIM on a respaced schedule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sashimi.errors import UserError
from sashimi.models.blocks import ChannelNorm, DownPool, FFBlock, UpPool, WNLinear
from sashimi.models.diffwave_official import convert_official_state_dict  # noqa: F401 (API)
from sashimi.models.unet import unet_backbone
from sashimi.ssm.s4 import S4Block

# ----------------------------------------------------------------------------------
# Diffusion schedule and step embedding
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """Linear-beta DDPM schedule, each (T,)."""

    beta: Tensor
    alpha: Tensor
    alpha_bar: Tensor
    sigma: Tensor

    @property
    def T(self) -> int:
        return self.beta.shape[0]


def diffusion_schedule(
    T: int = 200,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Schedule:
    """beta_t linear, alpha_t = 1 - beta_t, abar_t = cumprod, sigma_t^2 = beta~_t (sigma_0^2 = beta_0)."""
    beta = torch.linspace(beta_start, beta_end, T, dtype=dtype, device=device)  # (T,)
    alpha = 1 - beta  # (T,)
    alpha_bar = alpha.clone()  # (T,) sequential product, bit-equal to the official loop
    for t in range(1, T):
        alpha_bar[t] = alpha_bar[t] * alpha_bar[t - 1]
    beta_tilde = beta.clone()  # (T,)
    beta_tilde[1:] = beta[1:] * ((1 - alpha_bar[:-1]) / (1 - alpha_bar[1:]))
    return Schedule(beta=beta, alpha=alpha, alpha_bar=alpha_bar, sigma=beta_tilde.sqrt())


def step_embedding(t: Tensor, dim: int = 128) -> Tensor:
    """Sinusoidal embedding of diffusion steps t (B,) -> (B, dim): [sin(t f_k), cos(t f_k)],
    f_k = 10000^(-k / (dim/2 - 1)), k = 0..dim/2-1. Computed in t's dtype if floating, else float32."""
    dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
    half = dim // 2
    scale = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=dtype) * -scale)  # (dim/2,)
    arg = t.to(dtype)[:, None] * freqs[None, :]  # (B, dim/2)
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)  # (B, dim)


class StepEmbedding(nn.Module):
    """t (B,) -> sinusoid (d_in) -> Linear d_mid -> SiLU -> Linear d_out -> SiLU."""

    def __init__(self, d_in: int = 128, d_mid: int = 512, d_out: int = 512):
        super().__init__()
        self.d_in = d_in
        self.fc1 = nn.Linear(d_in, d_mid)
        self.fc2 = nn.Linear(d_mid, d_out)

    def forward(self, t: Tensor) -> Tensor:
        e = step_embedding(t, self.d_in).to(self.fc1.weight.dtype)  # (B, d_in)
        return F.silu(self.fc2(F.silu(self.fc1(e))))  # (B, d_out)


# ----------------------------------------------------------------------------------
# Weight-normalised layers (w = g v / ||v||, norm per output unit)
# ----------------------------------------------------------------------------------


def _weight_norm(v: Tensor, g: Tensor) -> Tensor:
    norm = v.flatten(1).norm(dim=1).view(g.shape)  # (out, 1, ...)
    return v * (g / norm)


class WNConv1d(nn.Module):
    """Weight-normalised Conv1d (g v / ||v||) on (B, C, L), 'same' padding (odd kernel); g = ||v||
    at init, what the official init amounts to (its kaiming_normal_ is overwritten)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 1, dilation: int = 1):
        super().__init__()
        conv = nn.Conv1d(c_in, c_out, kernel_size)  # default init for v and bias
        self.weight_v = nn.Parameter(conv.weight.detach().clone())  # (out, in, k)
        self.weight_g = nn.Parameter(conv.weight.detach().flatten(1).norm(dim=1).view(c_out, 1, 1))
        self.bias = nn.Parameter(conv.bias.detach().clone())  # (out,)
        self.dilation = dilation
        self.padding = dilation * (kernel_size - 1) // 2

    def forward(self, x: Tensor) -> Tensor:
        w = _weight_norm(self.weight_v, self.weight_g)  # (out, in, k)
        return F.conv1d(x, w, self.bias, padding=self.padding, dilation=self.dilation)


# ----------------------------------------------------------------------------------
# WaveNet backbone
# ----------------------------------------------------------------------------------


class WaveNetLayer(nn.Module):
    """x + e_t -> dilated conv (k=3) -> tanh*sigmoid -> (residual, skip) 1x1 convs."""

    def __init__(self, C: int, S: int, dilation: int, d_embed: int):
        super().__init__()
        self.C = C
        self.step_proj = nn.Linear(d_embed, C)
        self.dilated_conv = WNConv1d(C, 2 * C, kernel_size=3, dilation=dilation)
        self.res_conv = WNConv1d(C, C)
        self.skip_conv = WNConv1d(C, S)

    def forward(self, x: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        h = x + self.step_proj(e)[:, :, None]  # (B, C, L)
        h = self.dilated_conv(h)  # (B, 2C, L)
        h = torch.tanh(h[:, : self.C]) * torch.sigmoid(h[:, self.C :])  # (B, C, L)
        return (x + self.res_conv(h)) * math.sqrt(0.5), self.skip_conv(h)  # (B, C, L), (B, S, L)


class WaveNetBackbone(nn.Module):
    """DiffWave's WaveNet: (B, L) noisy audio, (B,) steps -> (B, L) eps.

    1x1 conv 1 -> C + ReLU; residual layers (dilation 2^(i mod cycle), residual (x + res)/sqrt(2));
    skips summed, scaled by 1/sqrt(n); 1x1 conv + ReLU; zero-initialised 1x1 conv -> 1. All convs
    but the last are weight-normalised."""

    def __init__(
        self,
        res_channels: int,
        skip_channels: int,
        num_res_layers: int,
        dilation_cycle: int,
        d_embed: tuple[int, int, int],
    ):
        super().__init__()
        C, S = res_channels, skip_channels
        self.input_conv = WNConv1d(1, C)
        self.embed = StepEmbedding(*d_embed)
        self.layers = nn.ModuleList(
            WaveNetLayer(C, S, 2 ** (i % dilation_cycle), d_embed[2]) for i in range(num_res_layers)
        )
        self.skip_proj = WNConv1d(S, S)
        self.output_conv = nn.Conv1d(S, 1, 1)
        nn.init.zeros_(self.output_conv.weight)
        nn.init.zeros_(self.output_conv.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        e = self.embed(t)  # (B, 512)
        h = F.relu(self.input_conv(x[:, None, :]))  # (B, C, L)
        skip = 0
        for layer in self.layers:
            h, s = layer(h, e)  # (B, C, L), (B, S, L)
            skip = skip + s
        h = skip * math.sqrt(1.0 / len(self.layers))  # (B, S, L)
        h = F.relu(self.skip_proj(h))  # (B, S, L)
        return self.output_conv(h)[:, 0]  # (B, L)


# ----------------------------------------------------------------------------------
# SaShiMi backbone (non-causal U-Net; tensors (B, L, H))
# ----------------------------------------------------------------------------------


class DiffusionResidualBlock(nn.Module):
    """x <- x + S4(norm1(x) + e_t);  x <- x + FF(norm2(x))   (e_t = Linear(512, H) of the step embedding).

    The step embedding enters after the norm, inside the S4 branch (as in diffwave-sashimi)."""

    def __init__(self, H: int, d_embed: int, ff: int, s4_kwargs: dict):
        super().__init__()
        self.step_proj = nn.Linear(d_embed, H)
        self.norm1 = ChannelNorm()
        self.layer = S4Block(d_model=H, n_ssm=H, **s4_kwargs)
        self.ff = FFBlock(H, ff, s4_kwargs["dropout"], weight_norm=True) if ff > 0 else None
        self.norm2 = ChannelNorm() if ff > 0 else None

    def forward(self, x: Tensor, e: Tensor) -> Tensor:  # (B, L, H), (B, d_embed) -> (B, L, H)
        x = x + self.layer(self.norm1(x) + self.step_proj(e)[:, None, :])  # (B, L, H)
        if self.ff is not None:
            x = x + self.ff(self.norm2(x))  # (B, L, H)
        return x


class SaShiMiBackbone(nn.Module):
    """DiffWave's SaShiMi: (B, L) noisy audio, (B,) steps -> (B, L) eps; L divisible by prod(pool).

    Linear(1, H) + ReLU; per level [n_layers blocks (unet)] + DownPool; n_layers centre blocks;
    per level UpPool (no causal shift) + n_layers blocks; ChannelNorm, Linear(H, H) + ReLU,
    zero-initialised Linear(H, 1). Skips: unet, each up layer adds the mirrored down output;
    else SaShiMi's. Module lists are flat and ordered as in diffwave-sashimi, whose "S4 v3"
    layer (n_ssm = H) the S4 layers follow (parameter counts: docs/recipes.md).
    """

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        pool: tuple[int, ...] | list[int],
        expand: int,
        ff: int,
        bidirectional: bool,
        unet: bool,
        glu: bool,
        d_state: int,
        dropout: float,
        dt_min: float,
        dt_max: float,
        backend: str,
        d_embed: tuple[int, int, int],
    ):
        super().__init__()
        self.pool = tuple(int(p) for p in pool)
        if d_model < 1 or n_layers < 0 or expand < 1 or ff < 0 or any(p < 1 for p in self.pool):
            raise UserError(
                f"model: bad SaShiMi backbone size d_model={d_model}, n_layers={n_layers}, "
                f"pool={list(self.pool)}, expand={expand}, ff={ff}"
            )
        self.unet, self.n_layers = bool(unet), n_layers
        self.stride_total = math.prod(self.pool)
        s4_kwargs = dict(
            d_state=d_state, glu=glu, bidirectional=bidirectional, dropout=dropout,
            dt_min=dt_min, dt_max=dt_max, backend=backend,
        )  # fmt: skip

        def blocks(H: int) -> list[nn.Module]:
            return [DiffusionResidualBlock(H, d_embed[2], ff, s4_kwargs) for _ in range(n_layers)]

        H = d_model
        self.input_proj = WNLinear(1, H)
        self.embed = StepEmbedding(*d_embed)
        d_layers: list[nn.Module] = []
        for p in self.pool:
            if unet:
                d_layers += blocks(H)
            d_layers.append(DownPool(H, H * expand, stride=p))
            H *= expand
        self.d_layers = nn.ModuleList(d_layers)
        self.c_layers = nn.ModuleList(blocks(H))
        u_layers: list[nn.Module] = []
        for p in self.pool[::-1]:
            H //= expand
            u_layers += [UpPool(H * expand, H, stride=p, causal=False), *blocks(H)]
        self.u_layers = nn.ModuleList(u_layers)
        self.norm = ChannelNorm()
        self.output_hidden = WNLinear(H, H)
        self.output_proj = nn.Linear(H, 1)
        nn.init.zeros_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        L = x.shape[-1]
        if L % self.stride_total:
            raise UserError(
                f"DiffWave (sashimi): length {L} is not divisible by prod(pool) = {self.stride_total}"
            )
        e = self.embed(t)  # (B, 512)
        x = F.relu(self.input_proj(x[:, :, None]))  # (B, L, H)

        def call(layer: nn.Module, x: Tensor) -> Tensor:
            return layer(x, e) if isinstance(layer, DiffusionResidualBlock) else layer(x)

        n = self.n_layers + 1  # u_layers is flat: UpPool, then its blocks, per level
        up = [
            (self.u_layers[i], self.u_layers[i + 1 : i + n])
            for i in range(0, len(self.u_layers), n)
        ]
        x = unet_backbone(x, self.d_layers, self.c_layers, up, self.unet, call)  # (B, L, H)
        x = self.norm(x)  # (B, L, H)
        x = F.relu(self.output_hidden(x))  # (B, L, H)
        return self.output_proj(x)[..., 0]  # (B, L)


# ----------------------------------------------------------------------------------
# The diffusion model
# ----------------------------------------------------------------------------------

WAVENET_DEFAULTS = dict(res_channels=256, skip_channels=256, num_res_layers=36, dilation_cycle=12)
SASHIMI_DEFAULTS = dict(
    d_model=128, n_layers=6, pool=(4, 4), expand=2, ff=2, bidirectional=True, unet=True, glu=True,
    d_state=64, dropout=0.0, dt_min=1e-3, dt_max=1e-1, backend="auto",
)  # fmt: skip


class DiffWave(nn.Module):
    """Unconditional DiffWave: eps_theta(x_t, t) with a "wavenet" or "sashimi" backbone.

    Keywords are flat, as in params.yaml: WaveNet's keep diffwave-sashimi's names, SaShiMi's
    SaShiMi's; None takes the paper default (WAVENET_DEFAULTS / SASHIMI_DEFAULTS), and a
    keyword of the other backbone is an error.
    """

    kind = "diffusion"

    def __init__(
        self,
        backbone: str = "wavenet",
        T: int = 200,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        diffusion_step_embed_dim_in: int = 128,
        diffusion_step_embed_dim_mid: int = 512,
        diffusion_step_embed_dim_out: int = 512,
        # WaveNet backbone
        res_channels: int | None = None,
        skip_channels: int | None = None,
        num_res_layers: int | None = None,
        dilation_cycle: int | None = None,
        # SaShiMi backbone
        d_model: int | None = None,
        n_layers: int | None = None,
        pool: tuple[int, ...] | list[int] | None = None,
        expand: int | None = None,
        ff: int | None = None,
        bidirectional: bool | None = None,
        unet: bool | None = None,
        glu: bool | None = None,
        d_state: int | None = None,
        dropout: float | None = None,
        dt_min: float | None = None,
        dt_max: float | None = None,
        backend: str | None = None,
    ):
        args = dict(locals())
        super().__init__()
        given = {k: args[k] for k in (*WAVENET_DEFAULTS, *SASHIMI_DEFAULTS)}
        if backbone not in ("wavenet", "sashimi"):
            raise UserError(f"model.backbone: {backbone!r} is not one of 'wavenet', 'sashimi'")
        own, other = (
            (WAVENET_DEFAULTS, SASHIMI_DEFAULTS)
            if backbone == "wavenet"
            else (SASHIMI_DEFAULTS, WAVENET_DEFAULTS)
        )
        for k in other:
            if given[k] is not None:
                raise UserError(f"model.{k}: not a keyword of the {backbone!r} backbone")
        if int(T) < 1 or not (0 < beta_start <= beta_end < 1):
            raise UserError(
                f"model: bad diffusion schedule T={T}, beta_start={beta_start}, beta_end={beta_end}"
            )
        kw = {k: (own[k] if given[k] is None else given[k]) for k in own}
        d_embed = (
            diffusion_step_embed_dim_in,
            diffusion_step_embed_dim_mid,
            diffusion_step_embed_dim_out,
        )
        if diffusion_step_embed_dim_in % 2 or diffusion_step_embed_dim_in < 4:
            raise UserError(
                f"model.diffusion_step_embed_dim_in: {diffusion_step_embed_dim_in} must be even and >= 4"
            )
        self.backbone_name = backbone
        self.T, self.beta_start, self.beta_end = int(T), float(beta_start), float(beta_end)
        self._schedules: dict[tuple[torch.dtype, torch.device], Schedule] = {}
        if backbone == "wavenet":
            self.backbone = WaveNetBackbone(d_embed=d_embed, **kw)
        else:
            self.backbone = SaShiMiBackbone(d_embed=d_embed, **kw)

    # -- schedule ------------------------------------------------------------------
    def schedule(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Schedule:
        """The diffusion schedule in `dtype` (default: the parameters' dtype) on `device`."""
        p = next(self.parameters())
        key = (dtype or p.dtype, torch.device(device) if device is not None else p.device)
        if key not in self._schedules:
            self._schedules[key] = diffusion_schedule(self.T, self.beta_start, self.beta_end, *key)
        return self._schedules[key]

    # -- network -------------------------------------------------------------------
    def forward(self, x_t: Tensor, t: Tensor | int) -> Tensor:
        """eps_theta(x_t, t): x_t (B, L) or (B, 1, L), t (B,) (or a scalar) -> (B, L) (or (B, 1, L))."""
        squeeze = x_t.dim() == 3
        if squeeze:
            if x_t.shape[1] != 1:
                raise ValueError(f"x_t must be (B, L) or (B, 1, L), got {tuple(x_t.shape)}")
            x_t = x_t[:, 0]  # (B, L)
        t = torch.as_tensor(t, device=x_t.device)
        t = (
            t.reshape(-1).expand(x_t.shape[0]) if t.numel() == 1 else t.reshape(x_t.shape[0])
        )  # (B,)
        eps = self.backbone(x_t, t)  # (B, L)
        return eps[:, None] if squeeze else eps

    def training_loss(
        self,
        x0: Tensor,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """MSE(eps_theta(x_t, t), eps) with t ~ U{0..T-1}, eps ~ N(0, I) (drawn in that order)."""
        if x0.dim() == 3:
            x0 = x0[:, 0]  # (B, L)
        B = x0.shape[0]
        if t is None:
            t = _randint(self.T, (B,), generator, x0.device)  # (B,)
        if noise is None:
            noise = _randn(x0.shape, generator, x0.device, x0.dtype)  # (B, L)
        abar = self.schedule(x0.dtype, x0.device).alpha_bar[t][:, None]  # (B, 1)
        x_t = torch.sqrt(abar) * x0 + torch.sqrt(1 - abar) * noise  # (B, L)
        return F.mse_loss(self(x_t, t), noise)


def _randn(shape, generator: torch.Generator | None, device, dtype) -> Tensor:
    """N(0, 1) draws from `generator` (or the global RNG), moved to `device`."""
    gdev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gdev, dtype=dtype).to(device)


def _randint(high: int, shape, generator: torch.Generator | None, device) -> Tensor:
    gdev = generator.device if generator is not None else device
    return torch.randint(high, shape, generator=generator, device=gdev).to(device)


# ----------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(model.parameters())
    return p.dtype, p.device


def _steps_iter(steps: list[int], progress: bool, desc: str):
    if not progress:
        return steps
    from tqdm import tqdm

    return tqdm(steps, desc=desc, leave=False)


@torch.no_grad()
def sample_ancestral(
    model: DiffWave,
    n: int,
    length: int,
    generator: torch.Generator | None = None,
    progress: bool = False,
    clip: bool = True,
) -> Tensor:
    """The official DiffWave sampler: x_T ~ N(0, I), then for t = T-1..0
    x_{t-1} = (x_t - (1 - alpha_t) / sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(alpha_t) + sigma_t z_t
    (noise only for t > 0). Returns (n, length), clamped to [-1, 1] unless clip=False."""
    dtype, device = _model_dtype_device(model)
    s = model.schedule(dtype, device)
    was_training = model.training
    model.eval()
    try:
        x = _randn((n, length), generator, device, dtype)  # (n, L)
        for t in _steps_iter(list(range(s.T - 1, -1, -1)), progress, "ancestral"):
            eps = model(x, torch.full((n,), t, device=device, dtype=torch.long))  # (n, L)
            x = (x - (1 - s.alpha[t]) / torch.sqrt(1 - s.alpha_bar[t]) * eps) / torch.sqrt(
                s.alpha[t]
            )
            if t > 0:
                x = x + s.sigma[t] * _randn((n, length), generator, device, dtype)
    finally:
        model.train(was_training)
    return x.clamp(-1, 1) if clip else x


def respaced_steps(T: int, steps: int) -> list[int]:
    """`steps` distinct timesteps evenly spaced over [0, T-1] (both ends included), ascending."""
    if not 1 <= steps <= T:
        raise UserError(f"sample.fast_steps: {steps} must be in [1, {T}]")
    if steps == 1:
        return [T - 1]
    return sorted({round(i * (T - 1) / (steps - 1)) for i in range(steps)})


@torch.no_grad()
def sample_fast(
    model: DiffWave,
    n: int,
    length: int,
    steps: int = 50,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    progress: bool = False,
    clip: bool = True,
) -> Tensor:
    """DDIM (Song et al. 2021) on a respaced schedule tau_1 < ... < tau_S (`respaced_steps`):
    from t = tau_i to s = tau_{i-1} (abar_s = 1 past the last step),
        x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t),
        sigma^2 = eta^2 (1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s),
        x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps + sigma z.
    eta = 0 (default): deterministic DDIM, which keeps the full sampler's variance better than
    eta = 1 (docs/recipes.md); eta = 1: DDPM respacing (Nichol & Dhariwal 2021), with
    steps = T `sample_ancestral` step for step and draw for draw.
    """
    dtype, device = _model_dtype_device(model)
    s = model.schedule(dtype, device)
    taus = respaced_steps(s.T, steps)
    one = torch.ones((), dtype=dtype, device=device)
    was_training = model.training
    model.eval()
    try:
        x = _randn((n, length), generator, device, dtype)  # (n, L)
        for i in _steps_iter(list(range(len(taus) - 1, -1, -1)), progress, f"ddim-{len(taus)}"):
            t = taus[i]
            ab_t = s.alpha_bar[t]
            ab_s = s.alpha_bar[taus[i - 1]] if i > 0 else one
            eps = model(x, torch.full((n,), t, device=device, dtype=torch.long))  # (n, L)
            x0_hat = (x - torch.sqrt(1 - ab_t) * eps) / torch.sqrt(ab_t)  # (n, L)
            var = eta**2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
            x = torch.sqrt(ab_s) * x0_hat + torch.sqrt((1 - ab_s - var).clamp_min(0)) * eps
            if i > 0 and eta > 0:
                x = x + torch.sqrt(var) * _randn((n, length), generator, device, dtype)
    finally:
        model.train(was_training)
    return x.clamp(-1, 1) if clip else x
