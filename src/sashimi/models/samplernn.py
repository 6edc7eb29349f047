"""SampleRNN baseline (Mehri et al. 2017), as in the SaShiMi paper's official baseline.

Module structure and parameter names follow state-spaces/s4's `SampleRNN` (`reproduce=True`,
`layer='gru'`), so an official state_dict loads after stripping its prefix. Tiers are listed
lowest first: frame sizes (8, 2, 2) give n_frame_samples n_i = (8, 16, 32), lookback 32. Tier i

    h_i = GRU(input_expand(2 * dequant(frame)) + upsampled conditioning from tier i + 1)
    c_i = ConvTranspose(h_i) + bias                # (M_i, H) -> (M_i * fs_i, H)

and the sample-level MLP predicts y[t] from the embeddings of the last fs_0 tokens plus c_0[t].
Frame m of tier i ends at token x[m n_i] and conditions outputs m n_i .. (m + 1) n_i - 1, so
the model is causal. Weight norm is the legacy kind (`weight_g`, `weight_v`, dim 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sashimi.errors import UserError

Q_ZERO = 128  # the official q_zero(bits=8): the token of 0.0, the start/padding token
N_OUT = 256  # the official SampleLevelMLP always outputs 256 logits


def dequantize(q: Tensor, quantization: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """The official frame-level input dequantiser in `dtype` (official: float32): linear
    q / 128 - 1; mu-law x = q / 128 - 1, then sign(x) ((1 + mu)^|x| - 1) / mu, mu = 255."""
    x = q.to(dtype) / (N_OUT / 2) - 1
    if quantization == "linear":
        return x
    mu = N_OUT - 1
    return torch.sign(x) * (torch.pow(1 + mu, x.abs()) - 1) / mu


def _weight_norm(g: Tensor, v: Tensor) -> Tensor:
    """Legacy weight norm along dim 0: W = v * (g / ||v||), norm over all other dims."""
    return v * (g / v.norm(2, dim=tuple(range(1, v.dim())), keepdim=True))


class _WeightNormed(nn.Module):
    """A `weight` that is plain or legacy weight-normed (`weight_g`, `weight_v`, dim 0).
    Without autograd W is cached, refreshed when g or v change in place or move; writes
    through `.data` need `SampleRNN.setup_step()`."""

    def _init_weight(self, shape: tuple[int, ...], weight_norm: bool) -> None:
        self.use_wn = weight_norm
        if weight_norm:
            self.weight_v = nn.Parameter(torch.empty(shape))
            self.weight_g = nn.Parameter(torch.empty(shape[0], *[1] * (len(shape) - 1)))
        else:
            self.weight = nn.Parameter(torch.empty(shape))
        self._cache: tuple[tuple, Tensor] | None = None

    @torch.no_grad()
    def init_(self, fn) -> None:
        """Initialise the direction with `fn` and set g = ||v|| (so W = v), as weight_norm does."""
        w = self.weight_v if self.use_wn else self.weight
        fn(w)
        if self.use_wn:
            self.weight_g.copy_(w.norm(2, dim=tuple(range(1, w.dim())), keepdim=True))
        if getattr(self, "bias", None) is not None:
            self.bias.zero_()

    def effective_weight(self) -> Tensor:
        if not self.use_wn:
            return self.weight
        g, v = self.weight_g, self.weight_v
        if torch.is_grad_enabled():
            return _weight_norm(g, v)
        key = (g._version, v._version, g.data_ptr(), v.data_ptr(), v.dtype, v.device)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, _weight_norm(g, v))
        return self._cache[1]


class WNConv1d(_WeightNormed):
    """Conv1d, weight (out, in, k), optionally weight-normed per output channel."""

    def __init__(
        self, c_in: int, c_out: int, kernel_size: int, bias: bool = True, weight_norm: bool = True
    ):
        super().__init__()
        self._init_weight((c_out, c_in, kernel_size), weight_norm)
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, self.effective_weight(), self.bias)


class WNConvTranspose1d(_WeightNormed):
    """Bias-free ConvTranspose1d with stride = kernel; weight (in, out, k), weight norm along dim 0
    (per *input* channel, as legacy weight_norm on ConvTranspose1d does)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, weight_norm: bool = True):
        super().__init__()
        self.kernel_size = kernel_size
        self._init_weight((c_in, c_out, kernel_size), weight_norm)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv_transpose1d(x, self.effective_weight(), stride=self.kernel_size)


class LearnedUpsampling1d(nn.Module):
    """(B, H, M) -> (B, H, M * fs): transposed conv with stride fs plus a (H, fs) position bias."""

    def __init__(self, d_hidden: int, frame_size: int, weight_norm: bool = True):
        super().__init__()
        self.conv_t = WNConvTranspose1d(d_hidden, d_hidden, frame_size, weight_norm)
        self.bias = nn.Parameter(torch.zeros(d_hidden, frame_size))

    def forward(self, x: Tensor) -> Tensor:
        B, H, M = x.shape
        bias = self.bias[None, :, None, :].expand(B, H, M, -1).reshape(B, H, -1)  # (B, H, M fs)
        return self.conv_t(x) + bias  # (B, H, M fs)


class GRU(nn.GRU):
    """Batch-first GRU with a learned initial state `h0` (n_layers, 1, H)."""

    def __init__(self, d_hidden: int, n_layers: int, learn_h0: bool = True):
        super().__init__(d_hidden, d_hidden, num_layers=n_layers, batch_first=True)
        self.learn_h0 = learn_h0
        if learn_h0:
            self.h0 = nn.Parameter(torch.zeros(n_layers, 1, d_hidden))

    def initial_state(self, batch: int, device=None, dtype=None) -> Tensor:
        """(n_layers, B, H): the learned h0 expanded to the batch, else zeros."""
        if self.learn_h0:
            return self.h0.expand(-1, batch, -1).to(device=device)
        p = self.weight_hh_l0
        return torch.zeros(
            self.num_layers,
            batch,
            self.hidden_size,
            device=device or p.device,
            dtype=dtype or p.dtype,
        )


def _lecun_uniform_(w: Tensor) -> None:
    bound = math.sqrt(3.0 / w.shape[1])  # fan_in of a 2-D (out, in) matrix
    nn.init.uniform_(w, -bound, bound)


class FrameLevelRNN(nn.Module):
    """One tier: frame of n_frame_samples samples -> d_hidden, GRU over frames, upsample by frame_size."""

    def __init__(
        self, frame_size: int, n_frame_samples: int, d_hidden: int, n_rnn: int,
        learn_h0: bool = True, weight_norm: bool = True,
    ):  # fmt: skip
        super().__init__()
        self.frame_size, self.n_frame_samples = frame_size, n_frame_samples
        H = d_hidden
        self.input_expand = WNConv1d(n_frame_samples, H, 1, bias=True, weight_norm=weight_norm)
        self.input_expand.init_(nn.init.kaiming_uniform_)
        self.rnn = GRU(H, n_rnn, learn_h0)
        with torch.no_grad():
            for i in range(n_rnn):  # the official "reproduce" init: per-gate blocks
                W_ih = getattr(self.rnn, f"weight_ih_l{i}")  # (3H, H): gates r, z, n
                W_hh = getattr(self.rnn, f"weight_hh_l{i}")  # (3H, H)
                for j in range(3):
                    _lecun_uniform_(W_ih[j * H : (j + 1) * H])
                _lecun_uniform_(W_hh[:H])
                _lecun_uniform_(W_hh[H : 2 * H])
                nn.init.orthogonal_(W_hh[2 * H :])
                getattr(self.rnn, f"bias_ih_l{i}").zero_()
                getattr(self.rnn, f"bias_hh_l{i}").zero_()
        self.upsampling = LearnedUpsampling1d(H, frame_size, weight_norm)
        self.upsampling.conv_t.init_(
            lambda w: nn.init.uniform_(w, -math.sqrt(6 / H), math.sqrt(6 / H))
        )

    def forward(self, frames: Tensor, cond: Tensor | None, h: Tensor) -> tuple[Tensor, Tensor]:
        """frames (B, M, n) float, cond (B, M, H) or None, h (n_rnn, B, H)
        -> upsampled outputs (B, M fs, H), new h."""
        u = self.input_expand(frames.transpose(1, 2)).transpose(1, 2)  # (B, M, H)
        if cond is not None:
            u = u + cond
        out, h = self.rnn(u, h.contiguous())  # (B, M, H), (n_rnn, B, H)
        return self.upsampling(out.transpose(1, 2)).transpose(1, 2), h  # (B, M fs, H)


class SampleLevelMLP(nn.Module):
    """Embeddings of the last frame_size tokens (conv with kernel frame_size) + conditioning -> logits."""

    def __init__(
        self, frame_size: int, d_hidden: int, d_model: int, q_levels: int, weight_norm: bool = True
    ):
        super().__init__()
        self.d_model = d_model
        self.embedding = nn.Embedding(q_levels, d_model)
        self.input = WNConv1d(d_model, d_hidden, frame_size, bias=False, weight_norm=weight_norm)
        self.hidden = WNConv1d(d_hidden, d_hidden, 1, bias=True, weight_norm=weight_norm)
        self.output = WNConv1d(d_hidden, N_OUT, 1, bias=True, weight_norm=weight_norm)
        self.input.init_(nn.init.kaiming_uniform_)
        self.hidden.init_(nn.init.kaiming_uniform_)
        self.output.init_(lambda w: _lecun_uniform_(w.view(w.shape[0], -1)))

    def forward(self, tokens: Tensor, cond: Tensor) -> Tensor:
        """tokens (B, L + fs - 1), cond (B, L, H) -> logits (B, L, 256)."""
        e = self.embedding(tokens).transpose(1, 2)  # (B, d_model, L + fs - 1)
        z = F.relu(self.input(e) + cond.transpose(1, 2))  # (B, H, L)
        z = F.relu(self.hidden(z))  # (B, H, L)
        return self.output(z).transpose(1, 2)  # (B, L, 256)


@dataclass
class SampleRNNState:
    """Step state: per-tier GRU states, the last `lookback` tokens, step count t, and each
    tier's upsampled outputs for its current frame (cond[i]: (B, fs_i, H), None before use)."""

    hidden: list[Tensor]
    window: Tensor  # (B, lookback) long
    t: int
    cond: list[Tensor | None]


class SampleRNN(nn.Module):
    """Three-tier (by default) SampleRNN with GRUs, learned h0, weight norm; upstream keywords."""

    kind = "ar"

    def __init__(
        self,
        frame_sizes: tuple[int, ...] | list[int] = (8, 2, 2),
        n_rnn: int = 1,
        d_hidden: int = 1024,
        d_model: int = 256,
        q_levels: int = 256,
        learn_h0: bool = True,
        weight_norm: bool = True,
        quantization: str = "mu-law",
    ) -> None:
        super().__init__()
        frame_sizes = tuple(int(f) for f in frame_sizes)
        if not frame_sizes or min(frame_sizes) < 1:
            raise UserError(f"SampleRNN: frame_sizes must be positive, got {frame_sizes}")
        if quantization not in ("mu-law", "linear"):
            raise UserError(
                f"SampleRNN: quantization must be 'mu-law' or 'linear', got {quantization!r}"
            )
        if q_levels != N_OUT:
            raise UserError(f"SampleRNN: q_levels must be {N_OUT} (8-bit audio), got {q_levels}")
        self.frame_sizes, self.n_rnn, self.d_hidden, self.d_model = (
            frame_sizes,
            n_rnn,
            d_hidden,
            d_model,
        )
        self.q_levels, self.quantization = q_levels, quantization
        self.n_frame_samples = [math.prod(frame_sizes[: i + 1]) for i in range(len(frame_sizes))]
        self.frame_level_rnns = nn.ModuleList(
            FrameLevelRNN(fs, n, d_hidden, n_rnn, learn_h0, weight_norm)
            for fs, n in zip(frame_sizes, self.n_frame_samples)
        )
        self.sample_level_mlp = SampleLevelMLP(
            frame_sizes[0], d_hidden, d_model, q_levels, weight_norm
        )

    @property
    def lookback(self) -> int:
        """Samples in one top-tier frame (32 for frame sizes 8, 2, 2)."""
        return self.n_frame_samples[-1]

    @property
    def context(self) -> int:
        return self.lookback - 1

    def _dtype(self) -> torch.dtype:
        return self.sample_level_mlp.embedding.weight.dtype

    def initial_hidden(self, batch: int, device=None) -> list[Tensor]:
        """Per-tier GRU states (n_rnn, B, H), the learned h0 expanded (lowest tier first)."""
        return [rnn.rnn.initial_state(batch, device) for rnn in self.frame_level_rnns]

    def detach_state(self, state: list[Tensor]) -> list[Tensor]:
        return [h.detach() for h in state]

    def forward(
        self, x: Tensor, state: list[Tensor] | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """x: LongTensor (B, lookback - 1 + L), L a multiple of the lookback -> logits (B, L, 256).
        `state`: per-tier GRU states (None = learned h0); the returned one continues the
        sequence exactly in the next chunk (overlapping by lookback - 1 tokens), as in TBPTT."""
        B, L_in = x.shape
        L = L_in - self.context
        if L <= 0 or L % self.lookback:
            raise UserError(
                f"SampleRNN: input length {L_in} must be lookback - 1 ({self.context}) plus a "
                f"positive multiple of the lookback ({self.lookback})"
            )
        hidden = self.initial_hidden(B, x.device) if state is None else state
        samples = 2 * dequantize(x, self.quantization, self._dtype())  # (B, L_in)
        cond, new_hidden = None, [None] * len(self.frame_level_rnns)
        for i in reversed(range(len(self.frame_level_rnns))):  # top tier first
            rnn, n = self.frame_level_rnns[i], self.n_frame_samples[i]
            frames = samples[:, self.lookback - n : L_in - n + 1].reshape(B, -1, n)  # (B, L / n, n)
            cond, new_hidden[i] = rnn(frames, cond, hidden[i])  # (B, L / n_{i-1}, H)
        fs0 = self.frame_sizes[0]
        logits = self.sample_level_mlp(x[:, self.lookback - fs0 :], cond)  # (B, L, 256)
        return (logits, new_hidden) if return_state else logits

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def setup_step(self) -> None:
        """Recompute the weight-norm caches used without autograd (they also refresh by
        themselves on in-place updates, but not on writes through `.data`)."""
        for mod in self.modules():
            if isinstance(mod, _WeightNormed):
                mod._cache = None
                mod.effective_weight()

    def default_state(self, batch: int, device: torch.device | str | None = None) -> SampleRNNState:
        """Learned h0 per tier and a window of lookback - 1 tokens of 128 (the training padding).
        Also runs `setup_step`."""
        self.setup_step()
        p = self.sample_level_mlp.embedding.weight
        device = p.device if device is None else torch.device(device)
        window = torch.full(
            (batch, self.lookback), Q_ZERO, dtype=torch.long, device=device
        )  # (B, lookback)
        hidden = [h.clone() for h in self.initial_hidden(batch, device)]
        return SampleRNNState(hidden, window, 0, [None] * len(self.frame_level_rnns))

    @torch.no_grad()
    def step(self, token: Tensor, state: SampleRNNState) -> tuple[Tensor, SampleRNNState]:
        """Consume token x[t] (B,) and return logits for y[t] (B, 256). Tier i runs its GRU
        when t % n_i == 0 on the last n_i tokens, conditioned on sub-position
        (t // n_i) % fs_{i+1} of tier i + 1's current output. (The official step ignores its
        first token and starts from a window of 128s; with x[0] = 128, as in training, they agree.)"""
        K, t = len(self.frame_level_rnns), state.t
        window = torch.cat([state.window[:, 1:], token[:, None]], 1)  # (B, lookback)
        hidden, cond = list(state.hidden), list(state.cond)
        for i in reversed(range(K)):
            n = self.n_frame_samples[i]
            if t % n:
                continue
            frame = 2 * dequantize(window[:, -n:], self.quantization, self._dtype())  # (B, n)
            c = None
            if i < K - 1:
                j = (t // n) % self.frame_sizes[i + 1]
                c = cond[i + 1][:, j : j + 1]  # (B, 1, H)
            cond[i], hidden[i] = self.frame_level_rnns[i](
                frame[:, None], c, hidden[i]
            )  # (B, fs_i, H)
        fs0 = self.frame_sizes[0]
        j = t % fs0
        logits = self.sample_level_mlp(window[:, -fs0:], cond[0][:, j : j + 1])  # (B, 1, 256)
        return logits[:, 0], SampleRNNState(hidden, window, t + 1, cond)


def from_official_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """An official (state-spaces/s4) SampleRNN state_dict as ours: the module trees match, so
    only the `state_dict.` and `model.` prefixes go (no encoder/decoder keys: they are `id`)."""
    out = {}
    for key, v in sd.items():
        k = key.removeprefix("state_dict.")
        if k.startswith("model."):
            out[k.removeprefix("model.")] = v
    return out
