"""The layers SaShiMi and DiffWave's SaShiMi backbone are built from (SPEC "SaShiMi backbone").

WNLinear (weight norm), ChannelNorm (scalar shift and scale), FFBlock, the prenorm
ResidualBlock, and the pools: DownPool folds `stride` steps into channels, UpPool
unfolds them (shifted by one pooled step when causal). Tensors are (B, L, H), channels
last. The pools also offer a step mode (`setup_step`, `fire`, `refill`) for generation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sashimi.errors import UserError
from sashimi.ssm import kernels


class WNLinear(nn.Module):
    """Weight-normalised linear layer: W = g * v / ||v||, the norm taken per output row.

    Parameters are named as by the legacy `torch.nn.utils.weight_norm(dim=0)`:
    `weight_g` (d_out, 1), `weight_v` (d_out, d_in), `bias` (d_out,).
    """

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        lin = nn.Linear(d_in, d_out, bias=bias)  # default PyTorch init, then g = ||v||
        self.weight_v = nn.Parameter(lin.weight.detach().clone())  # (d_out, d_in)
        self.weight_g = nn.Parameter(lin.weight.detach().norm(dim=1, keepdim=True))  # (d_out, 1)
        self.bias = nn.Parameter(lin.bias.detach().clone()) if bias else None  # (d_out,)

    @property
    def weight(self) -> Tensor:
        v = self.weight_v
        return self.weight_g * v / v.norm(dim=1, keepdim=True)  # (d_out, d_in)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class ChannelNorm(nn.Module):
    """Channel norm with SCALAR learned shift m and scale s (official TransposedLN, scalar=True).

    y = s / std(x) * (x - mean(x) + m), statistics over the channel (last) dim, biased std,
    no epsilon. Forward and backward are written out (`_ChannelNormFn`) so that only
    x - mean(x) and 1/std are kept; `compile_mode` (kernels.set_compile_mode) may fuse each
    into one pass. `channel_norm_reference` is the plain formula (test oracle).
    """

    def __init__(self):
        super().__init__()
        self.m = nn.Parameter(torch.zeros(1))
        self.s = nn.Parameter(torch.ones(1))
        self.compile_mode = "auto"

    def forward(self, x: Tensor) -> Tensor:  # (..., H) -> (..., H)
        return _ChannelNormFn.apply(x, self.m, self.s, self.compile_mode)


def channel_norm_reference(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    """The channel norm as a plain formula (autograd does the backward)."""
    std, mean = torch.std_mean(x, dim=-1, keepdim=True, correction=0)  # (..., 1)
    return (x - mean + m) * (s / std)


def _channel_norm_fwd(x: Tensor, m: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    xc = x - x.mean(dim=-1, keepdim=True)  # (..., H)
    r = (xc * xc).mean(dim=-1, keepdim=True).rsqrt()  # (..., 1)
    return (xc + m) * (s * r), xc, r


def _channel_norm_bwd(
    g: Tensor, xc: Tensor, r: Tensor, m: Tensor, s: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    H = xc.shape[-1]
    g_sum = g.sum(dim=-1, keepdim=True)  # (..., 1)
    gz = (g * xc).sum(dim=-1, keepdim=True) + m * g_sum  # sum g (x_c + m), (..., 1)
    sr = s * r  # (..., 1)
    dx = sr * (g - g_sum / H) - (sr * r * r / H) * gz * xc  # (..., H)
    return dx, (sr * g_sum).sum().reshape(1), (r * gz).sum().reshape(1)


class _ChannelNormFn(torch.autograd.Function):
    """y = s r (x_c + m) with x_c = x - mean(x), r = 1/std(x) (per row, over the last dim H).

    Backward, with g = dL/dy and sums over the row:
        dL/dx = s r (g - sum(g)/H) - (s r^3 / H) (sum(g x_c) + m sum(g)) x_c
        dL/dm = sum over everything of s r g,   dL/ds = sum over everything of r g (x_c + m).
    """

    @staticmethod
    def forward(ctx, x: Tensor, m: Tensor, s: Tensor, compile_mode: str = "auto") -> Tensor:
        y, xc, r = kernels.maybe_compiled(_channel_norm_fwd, x, compile_mode)(x, m, s)
        ctx.save_for_backward(xc, r, m, s)
        ctx.compile_mode = compile_mode
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        xc, r, m, s = ctx.saved_tensors
        bwd = kernels.maybe_compiled(_channel_norm_bwd, g, ctx.compile_mode)
        return (*bwd(g.contiguous(), xc, r, m, s), None)


class FFBlock(nn.Module):
    """Position-wise feed-forward: Linear(H, ff*H) -> GELU -> dropout -> Linear(ff*H, H).

    `weight_norm=True` uses weight-normalised linears (the DiffWave+SaShiMi repo's FF).
    """

    def __init__(
        self, d_model: int, expand: int = 2, dropout: float = 0.0, weight_norm: bool = False
    ):
        super().__init__()
        Lin = WNLinear if weight_norm else nn.Linear
        self.linear1 = Lin(d_model, expand * d_model)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.linear2 = Lin(expand * d_model, d_model)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:  # (..., H) -> (..., H)
        """Plus `residual` if given (the residual block's skip). Always eager: its matrix
        products dominate, so compiling gains nothing (docs/performance.md)."""
        y = self.linear2(self.dropout(F.gelu(self.linear1(x))))
        return y if residual is None else y + residual

    def setup_step(self) -> None:
        pass

    def default_state(self, batch: int, device=None) -> None:
        return None

    def step(self, x: Tensor, state: None = None) -> tuple[Tensor, None]:  # (B, H)
        return self.forward(x), None


class ResidualBlock(nn.Module):
    """Prenorm residual block y = x + layer(norm(x)); `layer` is an S4Block or an FFBlock."""

    def __init__(self, d_model: int, layer: nn.Module):
        super().__init__()
        self.d_model = d_model
        self.norm = ChannelNorm()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:  # (B, L, H) -> (B, L, H)
        return self.layer(self.norm(x), residual=x)

    def setup_step(self) -> None:
        if hasattr(self.layer, "setup_step"):
            self.layer.setup_step()

    def default_state(self, batch: int, device=None):
        return self.layer.default_state(batch, device=device)

    def step(self, x: Tensor, state) -> tuple[Tensor, object]:  # (B, H)
        y, state = self.layer.step(self.norm(x), state)
        return x + y, state


class DownPool(nn.Module):
    """Fold `stride` consecutive steps into channels, then a weight-normed Linear(H*s, H_out).

    Input feature h*s + j of the linear is channel h at time l*s + j (official layout).
    """

    def __init__(self, d_input: int, d_output: int, stride: int):
        super().__init__()
        self.d_input, self.d_output, self.stride = d_input, d_output, stride
        self.linear = WNLinear(d_input * stride, d_output)
        self._w_step: Tensor | None = None

    def _weight_time_major(self) -> Tensor:
        """The weight with its input columns reordered to j*H + h, so a plain reshape of
        (B, L/s, s, H) to (B, L/s, s*H) feeds it (no transpose of the activations)."""
        H, s = self.d_input, self.stride
        W = self.linear.weight  # (H_out, H*s), column h*s + j
        return W.view(-1, H, s).transpose(1, 2).reshape(-1, s * H)  # (H_out, s*H), column j*H + h

    def forward(self, x: Tensor) -> Tensor:  # (B, L, H) -> (B, L/s, H_out)
        B, L, H = x.shape
        s = self.stride
        if L % s:
            raise UserError(f"DownPool: sequence length {L} is not divisible by the stride {s}")
        x = x.reshape(B, L // s, s * H)  # feature j*H + h = x[:, l*s + j, h]
        return F.linear(x, self._weight_time_major(), self.linear.bias)

    def setup_step(self) -> None:
        with torch.no_grad():  # transposed and contiguous: x @ W^T streams W row by row
            self._w_step = self._weight_time_major().detach().t().contiguous()  # (s*H, H_out)

    def fire(self, buffer: Sequence[Tensor]) -> Tensor:
        """Step mode: `stride` buffered inputs [(B, H)] * s -> one output (B, H_out)."""
        x = torch.cat(list(buffer), dim=-1)  # (B, s*H), feature j*H + h
        return torch.addmm(self.linear.bias, x, self._w_step)


class UpPool(nn.Module):
    """Weight-normed Linear(H_in, H_out*s), then unfold channels into `stride` time steps.

    Output feature h*s + j becomes channel h at time l*s + j. With `causal=True` the
    output is shifted right by one pooled step (zeros first), so the output at time t
    depends only on pooled inputs that have fully arrived before t.
    """

    def __init__(self, d_input: int, d_output: int, stride: int, causal: bool = True):
        super().__init__()
        self.d_input, self.d_output, self.stride, self.causal = d_input, d_output, stride, causal
        self.linear = WNLinear(d_input, d_output * stride)
        self._w_step: Tensor | None = None
        self._b_step: Tensor | None = None

    def _weight_time_major(self) -> tuple[Tensor, Tensor]:
        """Weight rows and bias reordered to j*H_out + h (time-major), see DownPool."""
        Ho, s = self.d_output, self.stride
        W = self.linear.weight.view(Ho, s, -1).transpose(0, 1).reshape(s * Ho, -1)  # (s*Ho, H_in)
        b = self.linear.bias.view(Ho, s).t().reshape(s * Ho)  # (s*Ho,)
        return W, b

    def forward(self, x: Tensor) -> Tensor:  # (B, L', H_in) -> (B, L'*s, H_out)
        B, Lp, _ = x.shape
        W, b = self._weight_time_major()
        if self.causal:  # shift by one pooled step: output block l comes from input l-1
            y = F.linear(x[:, :-1], W, b)  # (B, L'-1, s*Ho)
            y = F.pad(y, (0, 0, 1, 0))  # (B, L', s*Ho), zeros first
        else:
            y = F.linear(x, W, b)  # (B, L', s*Ho)
        return y.reshape(B, Lp * self.stride, self.d_output)  # time l*s + j, channel h

    def setup_step(self) -> None:
        with torch.no_grad():  # weight transposed and contiguous, as in DownPool
            W, b = self._weight_time_major()
            self._w_step, self._b_step = W.detach().t().contiguous(), b.detach().clone()

    def refill(self, x: Tensor) -> list[Tensor]:
        """Step mode: one pooled input (B, H_in) -> the next `stride` outputs [(B, H_out)] * s."""
        y = torch.addmm(self._b_step, x, self._w_step)  # (B, s*Ho), feature j*Ho + h
        return list(y.view(x.shape[0], self.stride, self.d_output).unbind(1))
