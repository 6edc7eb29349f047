"""SaShiMi: a multi-scale S4 backbone for raw audio (Goel, Gu, Donahue, Re; ICML 2022).

The version the paper's experiments used (see SPEC "SaShiMi backbone"):

    tokens (B, L) -> Embedding(256, H)
      level 0 (width H, length L):  skip x0 -> DownPool(stride 4) ->
      level 1 (2H, L/4):            skip x1 -> DownPool(stride 4) ->
      centre  (4H, L/16):           n_layers x [S4, FF] + skip
      level 1: UpPool -> + x1 -> n_layers x [S4, FF] + skip from right after the UpPool
      level 0: UpPool -> + x0 -> n_layers x [S4, FF] + skip from right after the UpPool
    -> LayerNorm(H) -> Linear(H, 256) -> logits (B, L, 256)

Every [S4] / [FF] is a prenorm residual block y = x + layer(norm(x)) with a scalar
channel norm. The UpPool shifts its output right by one pooled step, so the model is
causal and can be stepped: a DownPool buffers `stride` inputs and fires once per
stride, an UpPool emits one of its buffered outputs per step, and the stages inside a
pool run only when that pool fires (about 1 + 1/4 + 1/16 stages of work per sample).

`unet=True` also puts n_layers [S4, FF] blocks before each DownPool, and every block
output is a skip consumed by the mirrored up block (the DiffWave backbone layout).

Tensors are (B, L, H) everywhere (channels last). Module and parameter names follow
the official state-spaces `Sashimi` (d_layers / c_layers / u_layers, weight_g /
weight_v), so `sashimi.import_checkpoint` only renames a few keys.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sashimi.errors import UserError
from sashimi.ssm import kernels
from sashimi.ssm.s4 import S4Block

# ---------------------------------------------------------------------------
# building blocks (also used by the DiffWave backbone)
# ---------------------------------------------------------------------------


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

    y = s / std(x) * (x - mean(x) + m), statistics over the channel (last) dim,
    biased std, no epsilon. Forward and backward are written out (`_ChannelNormFn`): about
    2-3x faster than autograd through torch.std_mean on CPU, and only x - mean(x) and 1/std
    are kept for the backward. With the compile switch on (`kernels.maybe_compiled`) each is
    one fused pass: 3.6 ms against 12.5 ms at (2, 16000, 64) on 2 cores.
    `channel_norm_reference` is the plain formula (test oracle).
    """

    def __init__(self):
        super().__init__()
        self.m = nn.Parameter(torch.zeros(1))
        self.s = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:  # (..., H) -> (..., H)
        return _ChannelNormFn.apply(x, self.m, self.s)


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
    def forward(ctx, x: Tensor, m: Tensor, s: Tensor) -> Tensor:
        y, xc, r = kernels.maybe_compiled(_channel_norm_fwd, x)(x, m, s)
        ctx.save_for_backward(xc, r, m, s)
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        xc, r, m, s = ctx.saved_tensors
        return kernels.maybe_compiled(_channel_norm_bwd, g)(g.contiguous(), xc, r, m, s)


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
        """Plus `residual` if given (the residual block's skip). Eager even with the compile switch
        on: compiled, the level-0 block was no faster (fwd+bwd 41-49 ms against 38-43 ms eager at
        (2, 16000, 64) on 2 cores; its four matrix products dominate), unlike S4Block's tail."""
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


# ---------------------------------------------------------------------------
# the backbone
# ---------------------------------------------------------------------------


class SaShiMi(nn.Module):
    """Autoregressive SaShiMi: tokens (B, L) -> logits (B, L, n_classes).

    Defaults are the paper's SC09 / music model (8 layers, d_model 64, pool [4, 4],
    expand 2, ff 2). `glu=True` gives the released SC09 checkpoint's S4 output layer
    (Linear(H, 2H) -> GLU); `glu=False` the paper's parameter counts (plain Linear(H, H)).
    `bidirectional` passes through to every S4Block (non-causal; the UpPools then drop
    their shift too); `unet` adds the down-path blocks; `backend` picks the S4 kernel
    backend ("auto" | "torch" | "naive" | "keops"); `n_ssm` the number of (Lambda, P, B)
    copies per S4 layer.

    forward(tokens (B, L)) -> logits (B, L, n_classes); logits[:, t] predicts y[t] from
    x[:t+1]. L need not be a multiple of prod(pool) for a causal model (it is right-padded
    and cropped, which changes nothing before L); a bidirectional model raises UserError.

    Generation: setup_step() once (after loading / training; `compile=True` for speed),
    state = default_state(B), then `logits, state = step(token, state)` per sample; the
    state is updated in place. step() runs without autograd and without dropout on the
    fused path.
    """

    kind = "ar"
    context = 0

    def __init__(
        self,
        d_model: int = 64,
        n_layers: int = 8,
        pool: Sequence[int] = (4, 4),
        expand: int = 2,
        ff: int = 2,
        glu: bool = False,
        d_state: int = 64,
        bidirectional: bool = False,
        unet: bool = False,
        dropout: float = 0.0,
        n_classes: int = 256,
        backend: str = "auto",
        n_ssm: int = 1,
    ):
        super().__init__()
        self.d_model, self.n_layers, self.pool = d_model, n_layers, tuple(int(p) for p in pool)
        self.expand, self.ff, self.glu, self.d_state = expand, ff, glu, d_state
        self.bidirectional, self.unet, self.n_classes = bidirectional, unet, n_classes
        self.causal = not bidirectional
        self.stride_total = math.prod(self.pool)

        def s4(H: int) -> ResidualBlock:
            layer = S4Block(
                d_model=H, d_state=d_state, glu=glu, bidirectional=bidirectional,
                dropout=dropout, n_ssm=n_ssm, backend=backend,
            )  # fmt: skip
            return ResidualBlock(H, layer)

        def blocks(H: int) -> list[ResidualBlock]:
            out = []
            for _ in range(n_layers):
                out.append(s4(H))
                if ff > 0:
                    out.append(ResidualBlock(H, FFBlock(H, ff, dropout)))
            return out

        self.embedding = nn.Embedding(n_classes, d_model)

        H = d_model
        d_layers: list[nn.Module] = []
        for p in self.pool:  # down path: [blocks (unet)] + DownPool per level
            if unet:
                d_layers += blocks(H)
            d_layers.append(DownPool(H, H * expand, stride=p))
            H *= expand
        self.d_layers = nn.ModuleList(d_layers)
        self.c_layers = nn.ModuleList(blocks(H))  # centre, at d_model * expand**len(pool)
        u_layers = []
        for p in self.pool[::-1]:  # up path, innermost level first (official order)
            H //= expand
            u_layers.append(
                nn.ModuleList([UpPool(H * expand, H, stride=p, causal=self.causal), *blocks(H)])
            )
        self.u_layers = nn.ModuleList(u_layers)
        assert H == d_model
        self.norm = nn.LayerNorm(d_model)
        self.output = nn.Linear(d_model, n_classes)
        self._stepper: _Stepper | None = None

    # ---- convolution (training) mode ------------------------------------

    def backbone(self, x: Tensor) -> Tensor:
        """(B, L, H) -> (B, L, H), before the final norm. L must be divisible by prod(pool)."""
        skips = [x]
        for layer in self.d_layers:
            x = layer(x)
            skips.append(x)
        for layer in self.c_layers:
            x = layer(x)
        x = x + skips.pop()  # skip around the centre
        for block in self.u_layers:
            if self.unet:  # every layer consumes the mirrored down output
                for layer in block:
                    x = layer(x) + skips.pop()
            else:
                x = block[0](x) + skips.pop()  # UpPool, plus the input of the matching down stage
                s = x
                for layer in block[1:]:
                    x = layer(x)
                x = x + s  # skip around the up stage, from right after its UpPool
        return x

    def forward(self, tokens: Tensor) -> Tensor:  # (B, L) int64 -> (B, L, n_classes)
        B, L = tokens.shape
        pad = -L % self.stride_total
        if pad:
            if not self.causal:
                raise UserError(
                    f"SaShiMi: sequence length {L} must be divisible by prod(pool) = {self.stride_total} "
                    "for a bidirectional model"
                )
            # causal: right-padding changes no earlier output, so pad and crop
            tokens = F.pad(tokens, (0, pad), value=self.n_classes // 2)  # (B, L + pad)
        x = self.embedding(tokens)  # (B, L, H)
        x = self.norm(self.backbone(x))  # (B, L, H)
        logits = self.output(x)  # (B, L, n_classes)
        return logits[:, :L] if pad else logits

    # ---- recurrent (generation) mode ------------------------------------

    def setup_step(
        self,
        compile: bool = False,
        s4_mode: str = "auto",
        fused: bool | None = None,
        cuda_graph: bool | None = None,
    ) -> None:
        """Prepare for `step` (idempotent; redo after the weights change): discretise every S4
        layer, cache the weight-normed pool weights. `compile=True` wraps each stage's step in
        torch.compile (the first steps are slow while it compiles; falls back to eager if
        compilation fails). `s4_mode` is passed to S4Block.setup_step ("auto" | "modal" |
        "dense"; "dense" is the official-style exact step, the slow reference). `fused` (default:
        = compile) steps each stage as one pure function of stacked tensors in real float64
        arithmetic, the form torch.compile fuses; otherwise every block steps through its own
        `step` (S4Block's complex modal step: fewer eager ops, and the fused path's oracle).
        `cuda_graph` (default: on a CUDA model) replays the steps from CUDA graphs
        (_GraphedSteps): the state then lives in the model, and only the newest
        `default_state(batch)` of each batch size can be stepped."""
        if not self.causal:
            raise UserError("SaShiMi.setup_step: a bidirectional model cannot be stepped")
        for m in self.modules():
            if isinstance(m, (DownPool, UpPool)):
                m.setup_step()
        fused = (compile if fused is None else fused) and s4_mode != "dense"
        on_cuda = next(self.parameters()).device.type == "cuda"
        if cuda_graph and not on_cuda:
            raise UserError("SaShiMi.setup_step: cuda_graph=True needs the model on a CUDA device")
        cuda_graph = on_cuda if cuda_graph is None else cuda_graph
        self._stepper = _Stepper(
            self, compile=compile, fused=fused, s4_mode=s4_mode, cuda_graph=cuda_graph
        )

    def default_state(self, batch: int, device=None) -> dict:
        """Fresh generation state; `step` updates it in place and returns it."""
        if self._stepper is None:
            raise RuntimeError("SaShiMi.default_state: call setup_step() first")
        return self._stepper.default_state(batch, device)

    def step(self, token: Tensor, state: dict) -> tuple[Tensor, dict]:  # (B,) -> (B, n_classes)
        """Consume token x[t] and return the logits for y[t]."""
        if self._stepper is None:
            raise RuntimeError("SaShiMi.step: call setup_step() first")
        with torch.no_grad():
            return self._stepper.step(token, state), state

    def _apply(self, fn, recurse: bool = True):
        self._stepper = None  # dtype / device changed: step caches are stale
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        # pickle / deepcopy: the step caches (maybe compiled functions) stay behind
        return dict(super().__getstate__(), _stepper=None)


# ---------------------------------------------------------------------------
# recurrent mode: the machinery behind SaShiMi.step
# ---------------------------------------------------------------------------


class _GenericChain:
    """A chain of residual blocks stepped block by block through their own `step` (the oracle)."""

    fused = False

    def __init__(self, blocks: Sequence[ResidualBlock]):
        self.blocks = list(blocks)

    def default_state(self, batch: int, device) -> list:
        return [b.default_state(batch, device=device) for b in self.blocks]

    def __call__(self, x: Tensor, states: list) -> tuple[Tensor, list]:  # (B, H)
        new = []
        for blk, st in zip(self.blocks, states):
            x, st = blk.step(x, st)
            new.append(st)
        return x, new


class _FusedChain:
    """The same chain as ONE pure function of stacked tensors (fast path, eval semantics: no dropout).

    Every S4 layer steps in its diagonalised float64 form from `S4Kernel.modal_system()`
    (per channel: poles lambda-bar and output weights c-hat, state s_t = lambda-bar s_{t-1} + u_t,
    y_t = Re(c-hat . s_t) + D u_t), reduced and rewritten for torch.compile:

    - conjugate pairs: the conjugate-extended S4 system is real, so complex poles come in
      conjugate pairs whose terms in y are conjugates; one mode of each clearly separated pair
      is kept with its weight doubled (`_pair_conjugate_modes`, checked against all modes);
    - the output reads the previous state, y_t = Re((c-hat lambda-bar) . s_{t-1}) + (D + Re sum c-hat) u_t;
    - the update is applied one step late: a layer keeps (s_{t-2}, u_{t-1}) and step t forms
      s_{t-1} = lambda-bar s_{t-2} + u_{t-1} in the same pass that reduces it for y_t, so the
      float64 state (the bulk of the memory traffic at larger batches) is read and written once
      per step, in place (see _fused_chain_step);
    - the input enters along 1 + i: the state kept is (1 + i) s, and the output weights are
      divided by 1 + i to match. With real arithmetic, s = s_r + i s_i and lambda-bar = a + i b:
      s_r <- a s_r - b s_i + u, s_i <- a s_i + b s_r + u. The two parts then have the same
      form, and Inductor computes and stores both in the one loop that reduces them for y
      (with u in s_r only, it recomputed s_i in a second pass over the state: one more read
      of the state, the largest memory cost at batch 16; ~20% of a batch-16 step).
    Then GELU -> output linear (-> GLU) as in S4Block; the linear weights are kept transposed
    and contiguous (x @ W^T streams W row by row: about 2x faster than F.linear's transposed
    GEMM when the weights come from main memory, as they do at batch 1). The state of the chain
    is a tuple with (s_r (B, H, M), s_i (B, H, M), u (B, H)) float64 per S4 layer. Built only
    when every S4 layer is well conditioned for the modal form (else the chain stays generic).
    """

    fused = True

    def __init__(self, blocks: Sequence[ResidualBlock]):
        kinds, norm_m, norm_s = [], [], []
        lams, G, E, Wo, bo, W1, b1, W2, b2 = [], [], [], [], [], [], [], [], []
        glu = False
        with torch.no_grad():
            for blk in blocks:
                layer = blk.layer
                norm_m.append(blk.norm.m.reshape(()))
                norm_s.append(blk.norm.s.reshape(()))
                if isinstance(layer, S4Block):
                    lam, c, cond = layer.kernel.modal_system()  # (H, N), (1, H, N) complex128
                    if cond >= _MAX_MODAL_COND or layer.bidirectional:
                        raise _NotFusable(f"S4 eigenvector condition number {cond:.1e}")
                    kinds.append("s4")
                    glu = layer.glu
                    E.append(layer.D.double()[0] + c[0].real.sum(-1))  # (H,)
                    lam, c = _pair_conjugate_modes(lam, c[0])  # (H, M) each
                    lams.append(torch.stack([lam.real, lam.imag]))  # (2, H, M): a, b
                    g = c * lam / (1 + 1j)  # (H, M): the state kept is (1 + i) s
                    G.append(torch.stack([g.real, g.imag]))  # (2, H, M)
                    Wo.append(layer.output_linear.weight.t())  # (H, H or 2H)
                    bo.append(layer.output_linear.bias)
                elif isinstance(layer, FFBlock):
                    kinds.append("ff")
                    W1.append(layer.linear1.weight.t())  # (H, ff H)
                    b1.append(layer.linear1.bias)
                    W2.append(layer.linear2.weight.t())  # (ff H, H)
                    b2.append(layer.linear2.bias)
                else:
                    raise _NotFusable(f"layer {type(layer).__name__}")
            # layers may keep different numbers of modes: pad with inert modes (pole 0, weight 0)
            M = max((t.shape[-1] for t in lams), default=0)
            lams, G = ([F.pad(t, (0, M - t.shape[-1])) for t in ts] for ts in (lams, G))

            def stack(ts):
                return torch.stack([t.detach() for t in ts]).contiguous() if ts else torch.zeros(0)

            self.kinds, self.glu = tuple(kinds), glu
            Wo, W1, W2 = stack(Wo), stack(W1), stack(W2)
            self.params = (
                *(stack(t) for t in (norm_m, norm_s, lams, G, E)),
                Wo, stack(bo), W1, stack(b1), W2, stack(b2),
                *(_blocked(W) for W in (Wo, W1, W2)),
            )
        self.n_s4, self.M, self.H = kinds.count("s4"), M, blocks[0].d_model

    def default_state(self, batch: int, device) -> tuple:
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        def layer() -> tuple[Tensor, Tensor, Tensor]:
            return zeros(batch, self.H, self.M), zeros(batch, self.H, self.M), zeros(batch, self.H)

        return tuple(layer() for _ in range(self.n_s4))

    def __call__(self, x: Tensor, state: tuple) -> tuple[Tensor, tuple]:
        return _fused_chain_step(x, state, self.params, self.kinds, self.glu), state


class _NotFusable(Exception):
    pass


_MAX_MODAL_COND = 1e10  # as S4Block: above this the float64 modal step loses accuracy


def _pair_conjugate_modes(lam: Tensor, c: Tensor, tol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(H, N) poles and weights -> (H, M): one mode per clearly separated conjugate pair.

    A mode m pairs with p = the mode nearest to conj(lambda_m) when, in every channel, the
    pairing is mutual, p != m, p is the same index, and |lambda_p - conj lambda_m| <=
    tol * |Im lambda_m| (two near-real poles are never taken for a pair). The kept mode
    (Im > 0) gets the pair's averaged pole and weight, doubled: Re(c s) + Re(conj(c s)) =
    2 Re(c s). Every other mode is kept as it is. The result is accepted only if its impulse
    response Re(sum c lambda^l) matches the full one to 1e-6 (relative, per channel) at
    l = 0..255 and 2^8..2^20; otherwise all N modes are returned unchanged.
    """
    H, N = lam.shape
    idx = torch.arange(N, device=lam.device)
    p = (lam.unsqueeze(-1) - lam.conj().unsqueeze(-2)).abs().argmin(-1)  # (H, N) partner
    mismatch = (lam.gather(1, p) - lam.conj()).abs()  # (H, N)
    paired = (
        (p.gather(1, p) == idx) & (p != idx) & (p == p[:1]) & (mismatch <= tol * lam.imag.abs())
    ).all(0)  # (N,)
    paired &= paired[p[0]]
    keep_pair = paired & (lam.imag > 0).all(0)  # (N,)
    drop = torch.zeros(N, dtype=torch.bool, device=lam.device)
    drop[p[0][keep_pair]] = True
    if not keep_pair.any() or (keep_pair & drop).any() or int(keep_pair.sum()) != int(drop.sum()):
        return lam, c
    lam2 = torch.where(keep_pair, (lam + lam.gather(1, p).conj()) / 2, lam)[:, ~drop]  # (H, M)
    c2 = torch.where(keep_pair, c + c.gather(1, p).conj(), c)[:, ~drop]  # (H, M)

    def response(lam: Tensor, c: Tensor) -> Tensor:
        """Re(sum_m c_m lambda_m^l) at l = 0..255 and 2^8..2^20, (H, 269)."""
        near = torch.cumprod(lam.unsqueeze(-1).expand(*lam.shape, 255), dim=-1)  # lambda^1..255
        far, q = [], lam
        for _ in range(20):  # repeated squaring: lambda^(2^k), k = 1..20
            q = q * q
            far.append(q)
        powers = torch.cat([torch.ones_like(near[..., :1]), near, torch.stack(far[7:], -1)], -1)
        return (c.unsqueeze(-1) * powers).sum(-2).real

    full = response(lam, c)
    dev = (response(lam2, c2) - full).abs().amax(-1) / full.abs().amax(-1).clamp_min(1e-30)
    if dev.max() > 1e-6:  # pairing moved the impulse response: keep every mode
        return lam, c
    return lam2, c2


def _linear(x: Tensor, WT: Tensor, b: Tensor, WB: Tensor | None = None) -> Tensor:
    """x (B, K) @ WT (K, N) + b. Under torch.compile at batch 1 (shapes are static there) it is
    written as a reduction over K, which Inductor fuses with the element-wise work around it
    (fewer kernels per step than calling a GEMV); with WB = the same weight blocked as
    (N/16, K, 16) (see _blocked) the reduction streams it in order."""
    if x.shape[0] == 1 and torch.compiler.is_compiling():
        if WB is not None:
            return (x.view(1, 1, -1, 1) * WB).sum(-2).reshape(1, -1) + b  # (1, N/16, 16) -> (1, N)
        return (x.unsqueeze(-1) * WT).sum(-2) + b  # (1, N)
    return torch.addmm(b, x, WT)


def _blocked(WT: Tensor, block: int = 16) -> Tensor:
    """Stacked transposed weights (n, K, N) -> (n, N/block, K, block), each block of outputs'
    weights contiguous over K. Inductor's batch-1 reduction computes 16 outputs (one AVX-512
    vector) at a time over all K: with (K, N) weights its reads stride by N floats, with
    these it reads memory in order (about 1.3x faster per batch-1 step: the centre's 12.6 MB of
    weights come from main memory every call). Kept beside the (K, N) copy that the GEMMs of
    larger batches use (~19 MB more for the paper model). One block of all N if 16 does not
    divide N."""
    if WT.dim() != 3:  # no layers of this kind (an empty placeholder)
        return WT
    n, K, N = WT.shape
    block = block if N % block == 0 else N
    return WT.view(n, K, N // block, block).permute(0, 2, 1, 3).contiguous()


def _fused_chain_step(
    x: Tensor, state: tuple, params: tuple, kinds: tuple, glu: bool
) -> Tensor:
    """x (B, H) -> x. Per S4 layer, state[j] = (s_r, s_i, u) (float64) is updated in place
    (see _FusedChain): no allocation per step, and half the memory of writing into a second
    set of buffers (batch 16: 5-15% faster per step, as the state then stays in cache longer).
    Each new part reads both old parts, so a compiler must read (s_r, s_i) before it writes
    them. Inductor does when both parts are formed in one loop, as the 1 + i input makes them;
    with s_i formed in a separate pass it once did not (wrong logits at batch 3). The compiled
    stages are therefore checked against eager on their first call (_Stepper._compile)."""
    norm_m, norm_s, lam, G, E, WoT, bo, W1T, b1, W2T, b2, WoB, W1B, W2B = params
    j = f = 0
    for k, kind in enumerate(kinds):
        xc = x - x.mean(dim=-1, keepdim=True)  # ChannelNorm, as in ChannelNorm.forward
        z = (xc + norm_m[k]) * (norm_s[k] * (xc * xc).mean(dim=-1, keepdim=True).rsqrt())  # (B, H)
        if kind == "s4":
            u = z.to(torch.float64)  # (B, H)
            sr, si, u_prev = state[j]  # s_{t-2} (B, H, M) twice, u_{t-1} (B, H)
            a, b = lam[j, 0], lam[j, 1]  # (H, M)
            v = u_prev.unsqueeze(-1)  # (B, H, 1)
            nr, ni = a * sr - b * si + v, a * si + b * sr + v  # s_{t-1}
            y = (G[j, 0] * nr - G[j, 1] * ni).sum(-1) + E[j] * u  # (B, H)
            sr.copy_(nr)
            si.copy_(ni)
            u_prev.copy_(u)
            h = _linear(F.gelu(y.to(x.dtype)), WoT[j], bo[j], WoB[j])  # (B, H or 2H)
            if glu:
                h = F.glu(h, dim=-1)
            j += 1
        else:
            h = _linear(F.gelu(_linear(z, W1T[f], b1[f], W1B[f])), W2T[f], b2[f], W2B[f])  # (B, H)
            f += 1
        x = x + h
    return x


class _Stepper:
    """The recurrent view of a SaShiMi: per level l (width H_l, one tick per prod(pool[:l])
    samples) a chain of down blocks (unet only), a DownPool, an UpPool and a chain of up
    blocks; the centre at level P = len(pool).

    Per tick of level l: run the down blocks, buffer the result in the DownPool; emit one
    buffered UpPool output; when the DownPool's buffer is full (every pool[l] ticks) fire it,
    tick level l+1 once and refill the UpPool's buffer from its result (emitting before
    refilling is the one-pooled-step causal shift); then run the up blocks.

    The dense per-stage work (a chain of residual blocks with its skips, plus the final norm
    and output layer at level 0) is one function per stage; with `fused=True` the chains are
    _FusedChain (one pure function of stacked tensors, the thing torch.compile is applied to),
    else _GenericChain (each block's own `step`).
    """

    def __init__(
        self,
        model: SaShiMi,
        compile: bool = False,
        fused: bool = True,
        s4_mode: str = "auto",
        cuda_graph: bool = False,
    ):
        self.model = model
        self.cuda_graph = cuda_graph
        self._graphed: dict[int, _GraphedSteps | None] = {}  # batch size -> its graphs
        P = len(model.pool)
        self.P, self.strides, self.unet = P, model.pool, model.unet
        self.down_blocks: list[list[ResidualBlock]] = [[] for _ in range(P)]
        self.down_pools: list[DownPool] = []
        level = 0
        for layer in model.d_layers:
            if isinstance(layer, DownPool):
                self.down_pools.append(layer)
                level += 1
            else:
                self.down_blocks[level].append(layer)
        self.up_pools: list[UpPool] = [None] * P  # type: ignore[list-item]
        self.up_blocks: list[list[ResidualBlock]] = [[] for _ in range(P)]
        for j, block in enumerate(model.u_layers):  # innermost first
            self.up_pools[P - 1 - j] = block[0]
            self.up_blocks[P - 1 - j] = list(block[1:])

        def chain(blocks, fused=fused):
            if fused and not self.unet and blocks:
                try:
                    return _FusedChain(blocks)
                except _NotFusable:
                    pass
            for blk in blocks:  # generic: each S4Block steps itself
                if isinstance(blk.layer, S4Block):
                    blk.layer.setup_step(mode=s4_mode)
            return _GenericChain(blocks)

        self.up_chains = [chain(b) for b in self.up_blocks]
        self.center_chain = chain(list(model.c_layers))
        self.down_chains = [chain(b, fused=False) for b in self.down_blocks]  # unet only
        with torch.no_grad():
            self.head = (model.norm.weight.detach(), model.norm.bias.detach(),
                         model.output.weight.detach().t().contiguous(), model.output.bias.detach())  # fmt: skip
        self._fn_up: list[Callable] = [self._make_up(l) for l in range(P)]
        self._fn_center: Callable = self._make_center()
        if compile:
            self._compile()

    # -- stage functions (pure: tensors in, tensors out) --

    def _make_center(self) -> Callable:
        chain = self.center_chain

        def center(x: Tensor, state) -> tuple[Tensor, object]:
            y, state = chain(x, state)
            return y + x, state  # skip around the centre

        return center

    def _make_up(self, level: int) -> Callable:
        chain, blocks = self.up_chains[level], self.up_blocks[level]
        last, unet = level == 0, self.unet
        eps = self.model.norm.eps

        def up(y: Tensor, skips: list, state, head: tuple) -> tuple[Tensor, object]:
            # y: the UpPool's output for this tick (B, H_l); skips: this tick's level-l skips
            if unet:  # every block consumes the mirrored down output
                y = y + skips[-1]
                new = []
                for i, (blk, st) in enumerate(zip(blocks, state)):
                    y, st = blk.step(y, st)
                    y = y + skips[-2 - i]
                    new.append(st)
                state = new
            else:
                y = y + skips[0]  # plus the input of the matching down stage
                s = y
                y, state = chain(y, state)
                y = y + s  # skip around the up stage
            if last:  # final LayerNorm and output layer
                y = _linear(F.layer_norm(y, y.shape[-1:], head[0], head[1], eps), head[2], head[3])
            return y, state

        return up

    def _compile(self) -> None:
        # On CPU the C++ wrapper saves ~15% per step at batch 1 (less Python between kernels).
        cpu = next(self.model.parameters()).device.type == "cpu"
        # realize_opcount_threshold: Inductor inlines an element-wise result into each consumer
        # unless it takes more ops than this (default 30). At batch 1 the linears are
        # reductions over the input, so GELU's erf was recomputed, in scalar code, once per
        # block of 16 outputs (8-32 times per element: ~2/3 of a centre call). At 8, GELU's
        # output is stored once, vectorised: centre call 2.6 -> 1.6 ms, batch-1 step ~20% faster.
        options = {"cpp_wrapper": True, "realize_opcount_threshold": 8} if cpu else {}

        def wrap(fn: Callable) -> Callable:
            compiled = torch.compile(fn, dynamic=False, options=options)
            use_compiled: dict = {}  # batch size -> the compiled code passed its check

            def call(*args):
                key = args[0].shape[0]  # the stage's input (B, H): B fixes every other shape
                if key not in use_compiled:
                    use_compiled[key] = _compiled_matches_eager(fn, compiled, args)
                if use_compiled[key]:
                    try:
                        return compiled(*args)
                    except Exception as e:  # e.g. a recompile that fails: stay correct, go eager
                        _warn_eager(f"torch.compile failed ({type(e).__name__}: {e})")
                        use_compiled[key] = False
                return fn(*args)

            return call

        self._fn_up = [wrap(f) for f in self._fn_up]
        self._fn_center = wrap(self._fn_center)

    # -- state --

    def default_state(self, batch: int, device=None) -> dict:
        p = next(self.model.parameters())
        device = p.device if device is None else torch.device(device)
        if self.cuda_graph and device.type == "cuda":
            if batch not in self._graphed:  # None: capture failed, step without graphs
                self._graphed[batch] = _GraphedSteps.capture(self, batch, device)
            if self._graphed[batch] is not None:
                return self._graphed[batch].reset()
        return self._fresh_state(batch, device)

    def _fresh_state(self, batch: int, device: torch.device) -> dict:
        p = next(self.model.parameters())
        return {
            "down_buf": [[] for _ in range(self.P)],  # inputs waiting in each DownPool
            "up_buf": [  # outputs each UpPool still has to emit: zeros first (causal shift),
                # laid out as UpPool.refill lays out its outputs (same strides: no recompiles)
                list(torch.zeros(batch, s, up.d_output, device=device, dtype=p.dtype).unbind(1))
                for up, s in zip(self.up_pools, self.strides)
            ],
            "down": [c.default_state(batch, device) for c in self.down_chains],
            "center": self.center_chain.default_state(batch, device),
            "up": [c.default_state(batch, device) for c in self.up_chains],
        }

    # -- one sample --

    def step(self, token: Tensor, state: dict) -> Tensor:
        if "graphed" in state:
            return state["graphed"].step(token, state)
        return self._step(token, state)

    def _step(self, token: Tensor, state: dict) -> Tensor:
        x = F.embedding(token, self.model.embedding.weight)  # (B, H)
        return self._tick(0, x, state)

    def _tick(self, l: int, x: Tensor, state: dict) -> Tensor:
        if l == self.P:
            y, state["center"] = self._fn_center(x, state["center"])
            return y
        if self.unet:  # down blocks, every output a skip for the mirrored up block
            skips = [x]
            new = []
            for blk, st in zip(self.down_blocks[l], state["down"][l]):
                x, st = blk.step(x, st)
                skips.append(x)
                new.append(st)
            state["down"][l] = new
        else:
            skips = [x]
        buf = state["down_buf"][l]
        buf.append(x)
        up_buf = state["up_buf"][l]
        y = up_buf.pop(0)  # emit first: the output computed one pooled step ago
        if len(buf) == self.strides[l]:  # the DownPool fires: run the next level once
            z = self._tick(l + 1, self.down_pools[l].fire(buf), state)
            buf.clear()
            up_buf.extend(self.up_pools[l].refill(z))
        y, state["up"][l] = self._fn_up[l](y, skips, state["up"][l], self.head)
        return y


def _tensors(obj) -> list[Tensor]:
    """The tensors in nested tuples, lists and dicts (values), in order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _map_tensors(fn: Callable[[Tensor], Tensor], obj):
    """`obj` with every tensor t in its nested tuples and lists replaced by fn(t)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(fn, o) for o in obj)
    return obj


class _GraphedSteps:
    """The recurrent step replayed from CUDA graphs, for one batch size.

    On a GPU a step is launch-bound: dozens of small kernels, each launched from Python
    (paper model on an H100, batch 1: 1.13 ms per step launched, 0.136 ms replayed). Which
    stages run at step t depends only on t mod T, T = prod(pool), so T graphs, one per phase,
    capture every possible step. They share one memory pool and are always replayed in the
    order they were captured (phase 0, 1, ..., T-1, 0, ...), so a tensor that one phase leaves
    in the state (a DownPool input, an UpPool output) is still in place when a later phase
    reads it. The last phase copies the state back into the tensors the period started from.
    The state thus lives here, at fixed addresses: `reset` refills it with a fresh state and
    returns a handle; only the newest handle can step. (A capture that fails half-way warns
    and leaves this batch size to the launched step; torch may then refuse the default CUDA
    generator for the rest of the process, as it did in a test here.)"""

    @torch.no_grad()  # as SaShiMi.step: the stages are compiled (and captured) without autograd
    def __init__(self, stepper: _Stepper, batch: int, device: torch.device):
        self.stepper, self.batch, self.device = stepper, batch, device
        T = math.prod(stepper.strides)
        self.token = torch.full((batch,), 128, dtype=torch.long, device=device)  # (B,)
        state = stepper._fresh_state(batch, device)
        # warm-up on a side stream, as capture requires: compiles every stage (and runs its
        # first-call check) for this batch size; two periods leave the state at a period start
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2 * T):
                stepper._step(self.token, state)
        torch.cuda.current_stream(device).wait_stream(side)
        self.start = _tensors(state)  # the period-start state tensors
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.logits: list[Tensor] = []  # each phase's output buffer (B, n_classes)
        for phase in range(T):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                y = stepper._step(self.token, state)
                if phase == T - 1:  # close the period: carry the state back to its start
                    end = _tensors(state)
                    if [t.shape for t in end] != [t.shape for t in self.start]:
                        raise RuntimeError("the state's layout changed over one period")
                    for a, b in zip(self.start, end):
                        if a is not b:  # (states updated in place are already there)
                            a.copy_(b)
            self.graphs.append(g)
            self.logits.append(y)
        self.phase, self.epoch = 0, 0

    @classmethod
    def capture(cls, stepper: _Stepper, batch: int, device: torch.device) -> _GraphedSteps | None:
        try:
            return cls(stepper, batch, device)
        except Exception as e:  # a stage that cannot be captured: step without graphs
            warnings.warn(
                f"SaShiMi step: CUDA graph capture failed ({type(e).__name__}: {e}); "
                "stepping without graphs",
                stacklevel=4,
            )
            return None

    @torch.no_grad()
    def reset(self) -> dict:
        """A fresh generation: the state refilled in place, and a handle that steps it."""
        for a, b in zip(self.start, _tensors(self.stepper._fresh_state(self.batch, self.device))):
            a.copy_(b)
        self.phase = 0
        self.epoch += 1
        return {"graphed": self, "epoch": self.epoch}

    def step(self, token: Tensor, handle: dict) -> Tensor:  # (B,) -> (B, n_classes)
        if handle["epoch"] != self.epoch:
            raise RuntimeError(
                "SaShiMi.step: this state was replaced by a newer default_state() of the same "
                "batch size (with CUDA graphs the state lives in the model: one per batch size)"
            )
        self.token.copy_(token)
        p = self.phase
        self.graphs[p].replay()
        self.phase = (p + 1) % len(self.graphs)
        return self.logits[p].clone()  # the buffer is overwritten T steps from now


def _warn_eager(why: str) -> None:
    warnings.warn(f"SaShiMi step: {why}; using eager for this stage", stacklevel=3)


def _compiled_matches_eager(fn: Callable, compiled: Callable, args: tuple, calls: int = 3) -> bool:
    """Run a stage function eager and compiled on the same inputs for `calls` consecutive
    calls and say whether they agree. The inputs are copies of `args` with the same strides
    (no recompile): float32 tensors (inputs, skips, head) random, others (the float64 state)
    zero, as at the start of generation. Each call updates the state in place, so from the
    second call on the update reads non-zero values: a compiled step that wrote one state
    part before reading it for the other (an Inductor miscompile we met) fails here instead
    of producing wrong audio."""
    g = torch.Generator(device=_tensors(args)[0].device).manual_seed(0)

    def fresh(t: Tensor) -> Tensor:
        out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        if t.dtype == torch.float32:
            return out.copy_(torch.randn(t.shape, generator=g, device=t.device))
        return out.zero_()

    def same(t: Tensor) -> Tensor:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)

    a = _map_tensors(fresh, args)
    b = _map_tensors(same, a)
    try:
        for _ in range(calls):
            ref, out = fn(*a), compiled(*b)
            for x, y in zip(_tensors((ref, a)), _tensors((out, b))):
                # loose enough for TF32 or another summation order, tight enough for a
                # state part read after it was overwritten (errors of order one)
                if not torch.allclose(x, y, rtol=1e-2, atol=1e-3):
                    err = (x - y).abs().max().item()
                    _warn_eager(f"the compiled stage differs from eager by {err:.2e}")
                    return False
    except Exception as e:  # no compiler / unsupported op: stay correct, go eager
        _warn_eager(f"torch.compile failed ({type(e).__name__}: {e})")
        return False
    return True


# ---------------------------------------------------------------------------
# parameter count by formula (checked against the model in tests)
# ---------------------------------------------------------------------------


def s4_param_count(
    H: int, d_state: int = 64, glu: bool = False, bidirectional: bool = False, n_ssm: int = 1
) -> int:
    """S4 layer: dt (H), Lambda real+imag (n_ssm N/2 each), B and P (n_ssm N/2 complex),
    C (channels H N/2 complex), D (H), output linear H -> H (or 2H with GLU) with bias."""
    n2 = d_state // 2
    channels = 2 if bidirectional else 1
    out = (2 * H if glu else H) * (H + 1)
    return H + 2 * n_ssm * n2 + 2 * (2 * n_ssm * n2) + channels * H * 2 * n2 + H + out


def param_count(
    d_model: int = 64, n_layers: int = 8, pool: Sequence[int] = (4, 4), expand: int = 2, ff: int = 2,
    glu: bool = False, d_state: int = 64, bidirectional: bool = False, unet: bool = False,
    n_classes: int = 256, n_ssm: int = 1, **_: object,
) -> int:  # fmt: skip
    """Total parameters of `SaShiMi(**kwargs)` (embedding and output layer included)."""

    def stage(H: int) -> int:
        ffp = (H * ff * H + ff * H + ff * H * H + H + 2) if ff > 0 else 0
        return n_layers * (s4_param_count(H, d_state, glu, bidirectional, n_ssm) + 2 + ffp)

    total = n_classes * d_model + 2 * d_model + d_model * n_classes + n_classes
    H = d_model
    for s in pool:
        Ho = H * expand
        total += H * s * Ho + 2 * Ho  # DownPool: v, g, bias
        total += Ho * H * s + 2 * H * s  # UpPool (Ho -> H*s): v, g, bias
        total += stage(H) * (2 if unet else 1)
        H = Ho
    return total + stage(H)
