"""WaveNet baseline (van den Oord et al. 2016), as in the SaShiMi paper's official baseline.

Structure (state-spaces/s4 `WaveNetModel` with the framework's encoder and decoder around it):

    tokens -> Embedding(256, 256) -> start_conv 1x1 (256 -> R)
    for i in range(blocks * layers):             # dilation d = 2^(i mod layers)
        z = tanh(filter_conv_d(h)) * sigmoid(gate_conv_d(h))     # causal, kernel k
        skip += skip_conv(z)                     # 1x1, D -> S
        h = residual_conv(z) + h                 # 1x1, D -> R
    relu -> end_conv_1 (S -> E) -> relu -> end_conv_2 (E -> 256) -> Linear(256, 256)

Convolution mode uses "valid" dilated convolutions and, like the official code, returns the
last L_in - RF positions (RF = 1 + (k - 1) blocks (2^layers - 1), 4093 in the paper). `step`
keeps per layer a ring buffer of its last (k - 1) d inputs (Paine et al. 2016's "queues").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sashimi.errors import UserError

N_TOKENS = 256  # input vocabulary; the official WaveNetModel hard-codes d_model = 256


@dataclass
class WaveNetState:
    """Fast-generation state, updated in place by `WaveNet.step`: the step count t and per
    layer i a ring buffer `queues[i]` ((k - 1) d_i, B, R), slot tau % len holding input tau."""

    queues: list[Tensor]
    t: int


@dataclass
class WaveNetNaiveState:
    """Oracle state: the last (at most RF) tokens consumed, LongTensor (B, <= RF)."""

    tokens: Tensor


class WaveNet(nn.Module):
    """Gated dilated causal convolutions over 8-bit tokens; upstream keyword names."""

    kind = "ar"

    def __init__(
        self,
        layers: int = 10,
        blocks: int = 4,
        residual_channels: int = 64,
        dilation_channels: int = 64,
        skip_channels: int = 1024,
        end_channels: int = 512,
        kernel_size: int = 2,
        classes: int = 256,
        bias: bool = False,
    ) -> None:
        super().__init__()
        sizes = dict(layers=layers, blocks=blocks, residual_channels=residual_channels,
                     dilation_channels=dilation_channels, skip_channels=skip_channels,
                     end_channels=end_channels)  # fmt: skip
        for name, value in sizes.items():
            if value < 1:
                raise UserError(f"WaveNet: {name} must be >= 1, got {value}")
        if kernel_size < 2:
            raise UserError(f"WaveNet: kernel_size must be >= 2, got {kernel_size}")
        if classes != N_TOKENS:
            raise UserError(f"WaveNet: classes must be {N_TOKENS} (8-bit audio), got {classes}")
        self.layers, self.blocks = layers, blocks
        self.residual_channels, self.dilation_channels = residual_channels, dilation_channels
        self.skip_channels, self.end_channels = skip_channels, end_channels
        self.kernel_size, self.classes, self.bias = kernel_size, classes, bias

        self.dilations = [2 ** (i % layers) for i in range(blocks * layers)]
        self.receptive_field = 1 + (kernel_size - 1) * sum(self.dilations)

        R, D, S = residual_channels, dilation_channels, skip_channels
        self.embedding = nn.Embedding(N_TOKENS, N_TOKENS)  # framework encoder
        self.start_conv = nn.Conv1d(classes, R, 1, bias=bias)
        self.filter_convs = nn.ModuleList()
        self.gate_convs = nn.ModuleList()
        self.residual_convs = nn.ModuleList()
        self.skip_convs = nn.ModuleList()
        for _ in self.dilations:
            self.filter_convs.append(nn.Conv1d(R, D, kernel_size, bias=bias))
            self.gate_convs.append(nn.Conv1d(R, D, kernel_size, bias=bias))
            self.residual_convs.append(nn.Conv1d(D, R, 1, bias=bias))
            self.skip_convs.append(nn.Conv1d(D, S, 1, bias=bias))
        self.end_conv_1 = nn.Conv1d(S, end_channels, 1, bias=True)
        self.end_conv_2 = nn.Conv1d(end_channels, classes, 1, bias=True)
        self.decoder = nn.Linear(classes, N_TOKENS)  # framework decoder (output_transform)
        self._fused: dict[str, object] | None = None

    @property
    def context(self) -> int:
        """Left-context tokens the input carries: the receptive field (official indexing)."""
        return self.receptive_field

    # ------------------------------------------------------------------ convolution mode
    def _filter_gate(self, i: int) -> tuple[Tensor, Tensor | None]:
        """Filter and gate convs of layer i stacked along output channels: (2D, R, k)."""
        W = torch.cat([self.filter_convs[i].weight, self.gate_convs[i].weight], 0)  # (2D, R, k)
        b = None
        if self.bias:
            b = torch.cat([self.filter_convs[i].bias, self.gate_convs[i].bias], 0)  # (2D,)
        return W, b

    def _stack(self, h: Tensor, pad: bool, n_out: int | None = None) -> Tensor:
        """Residual stack + head: h (B, R, L) -> logits (B, L_out, 256). pad=False: valid
        convolutions, L_out = L - RF + 1; pad=True: zero left-padding, L_out = L (what zero
        queues compute); n_out: only the last n_out positions reach the skip sum and head."""
        k, D = self.kernel_size, self.dilation_channels
        L_out = h.shape[-1] if pad else h.shape[-1] - self.receptive_field + 1
        L_out = L_out if n_out is None else min(n_out, L_out)
        skip = 0
        for i, d in enumerate(self.dilations):
            x = F.pad(h, ((k - 1) * d, 0)) if pad else h  # (B, R, L_i + (k-1)d)
            W, b = self._filter_gate(i)
            fg = F.conv1d(x, W, b, dilation=d)  # (B, 2D, L_i)
            z = torch.tanh(fg[:, :D]) * torch.sigmoid(fg[:, D:])  # (B, D, L_i)
            skip = skip + self.skip_convs[i](z[:, :, z.shape[-1] - L_out :])  # (B, S, L_out)
            h = self.residual_convs[i](z) + x[:, :, (k - 1) * d :]  # (B, R, L_i)
        y = F.relu(self.end_conv_1(F.relu(skip)))  # (B, E, L_out)
        y = self.end_conv_2(y)  # (B, 256, L_out)
        return self.decoder(y.transpose(1, 2))  # (B, L_out, 256)

    def _embed(self, x: Tensor) -> Tensor:
        """Tokens (B, L) -> start_conv output (B, R, L)."""
        return self.start_conv(self.embedding(x).transpose(1, 2))  # (B, R, L)

    def forward(self, x: Tensor) -> Tensor:
        """x: LongTensor (B, RF + L) -> logits (B, L, 256); logits[:, j] is for input RF + j."""
        L_in = x.shape[-1]
        if L_in <= self.receptive_field:
            raise UserError(
                f"WaveNet: input length {L_in} must exceed the receptive field {self.receptive_field}"
            )
        return self._stack(
            self._embed(x), pad=False, n_out=L_in - self.receptive_field
        )  # (B, L, 256)

    def forward_causal(self, x: Tensor) -> Tensor:
        """Zero-padded causal mode: x (B, L) -> logits (B, L, 256), equal to stepping from
        `default_state` through all of x (zero queues = zero padding of every layer input)."""
        return self._stack(self._embed(x), pad=True)

    # ------------------------------------------------------------------ fast generation
    @torch.no_grad()
    def setup_step(self) -> None:
        """Fold weights for the queue step (re-run after any weight change): embedding and
        start_conv into one (256, R) table, taps into one (k R, 2D) matrix per layer, skip convs
        into one (n_layers D, S) matrix, end_conv_2 and decoder into one (E, 256). With
        sigmoid(g) = (1 + tanh(g / 2)) / 2 one tanh serves filter and gate (z' = 2z, the 1/2
        folded into the residual and skip matrices)."""
        R, D = self.residual_channels, self.dilation_channels
        W_in = self.embedding.weight @ self.start_conv.weight[:, :, 0].T  # (256, R)
        if self.bias:
            W_in = W_in + self.start_conv.bias
        half = torch.cat([W_in.new_ones(D), W_in.new_full((D,), 0.5)])  # (2D,) gate scale
        W_fg, b_fg, W_res, b_res = [], [], [], []
        for i in range(len(self.dilations)):
            W, b = self._filter_gate(i)  # (2D, R, k): tap j multiplies x[t - (k-1-j) d]
            W = W.permute(2, 1, 0).reshape(self.kernel_size * R, 2 * D) * half  # (kR, 2D)
            W_fg.append(W.contiguous())
            b_fg.append(W.new_zeros(2 * D) if b is None else b * half)  # (2D,)
            W_res.append(0.5 * self.residual_convs[i].weight[:, :, 0].T.contiguous())  # (D, R)
            b_res.append(self.residual_convs[i].bias if self.bias else None)
        W_skip = 0.5 * torch.cat([c.weight[:, :, 0].T for c in self.skip_convs], 0)  # (nD, S)
        b_skip = sum(c.bias for c in self.skip_convs) if self.bias else None  # (S,)
        W_dec = self.decoder.weight  # (256, 256)
        W_end2 = (W_dec @ self.end_conv_2.weight[:, :, 0]).T.contiguous()  # (E, 256)
        b_end2 = W_dec @ self.end_conv_2.bias + self.decoder.bias  # (256,)
        self._fused = dict(
            W_in=W_in.contiguous(), W_fg=W_fg, b_fg=b_fg, W_res=W_res, b_res=b_res,
            W_skip=W_skip.contiguous(), b_skip=b_skip,
            W_end1=self.end_conv_1.weight[:, :, 0].T.contiguous(), b_end1=self.end_conv_1.bias,
            W_end2=W_end2, b_end2=b_end2,
        )  # fmt: skip

    def default_state(
        self, batch: int, device: torch.device | str | None = None, prime_token: int | None = None
    ) -> WaveNetState:
        """Zero queues (the official generation state), after `setup_step`. With `prime_token`,
        as if `context` copies of it had been consumed: stepping then reproduces `forward` on
        inputs left-padded with that token."""
        self.setup_step()
        p = self.start_conv.weight
        device = p.device if device is None else torch.device(device)
        queues = [
            torch.zeros(
                (self.kernel_size - 1) * d,
                batch,
                self.residual_channels,
                dtype=p.dtype,
                device=device,
            )
            for d in self.dilations
        ]  # (Q_i, B, R) each
        state = WaveNetState(queues, 0)
        if prime_token is not None:
            self._prime(state, prime_token)
        return state

    @torch.no_grad()
    def _prime(self, state: WaveNetState, token: int) -> None:
        """Fill the queues with the layer inputs of a zero-padded causal pass over RF tokens."""
        RF, k = self.receptive_field, self.kernel_size
        dev = state.queues[0].device
        h = self._embed(
            torch.full((1, RF), token, dtype=torch.long, device=self.embedding.weight.device)
        )
        h = h.to(dev)  # (1, R, RF)
        for i, d in enumerate(self.dilations):
            Q = (k - 1) * d
            slots = torch.arange(RF - Q, RF, device=dev) % Q  # (Q,) slot of each time RF-Q..RF-1
            state.queues[i][slots] = (
                h[0, :, RF - Q :].T[:, None].to(state.queues[i].dtype)
            )  # (Q, B, R)
            x = F.pad(h, (Q, 0))  # (1, R, RF + Q)
            W, b = self._filter_gate(i)
            fg = F.conv1d(x, W, b, dilation=d)  # (1, 2D, RF)
            D = self.dilation_channels
            z = torch.tanh(fg[:, :D]) * torch.sigmoid(fg[:, D:])  # (1, D, RF)
            h = self.residual_convs[i](z) + h  # (1, R, RF)
        state.t = RF

    @torch.no_grad()
    def step(self, token: Tensor, state: WaveNetState) -> tuple[Tensor, WaveNetState]:
        """Consume token (B,) and return logits (B, 256); layer i reads x_i[t - j d], j = k-1..1,
        from its ring buffer (Q = (k - 1) d), then writes x_i[t] over the oldest slot t % Q."""
        if self._fused is None:
            self.setup_step()
        P, k, D, t = self._fused, self.kernel_size, self.dilation_channels, state.t
        W_fg, b_fg, W_res, b_res = P["W_fg"], P["b_fg"], P["W_res"], P["b_res"]
        h = P["W_in"][token]  # (B, R) input of layer 0
        zs = []
        for i, d in enumerate(self.dilations):
            q = state.queues[i]  # (Q, B, R)
            Q = q.shape[0]
            oldest = q[t % Q]  # (B, R) x_i[t - (k-1) d]
            taps = [oldest] + [q[(t - j * d) % Q] for j in range(k - 2, 0, -1)] + [h]  # k x (B, R)
            fg = torch.addmm(b_fg[i], torch.cat(taps, 1), W_fg[i])  # (B, 2D): f, g / 2
            tf, tg = torch.tanh(fg).split(D, 1)  # (B, D) each
            z2 = torch.addcmul(tf, tf, tg)  # (B, D) = 2 tanh(f) sigmoid(g)
            zs.append(z2)
            oldest.copy_(h)  # slot t % Q now holds x_i[t]
            h = torch.addmm(h, z2, W_res[i])  # (B, R) input of layer i + 1
            if b_res[i] is not None:
                h = h + b_res[i]
        skip = torch.cat(zs, 1) @ P["W_skip"]  # (B, S)
        if P["b_skip"] is not None:
            skip = skip + P["b_skip"]
        y = torch.relu(torch.addmm(P["b_end1"], torch.relu(skip), P["W_end1"]))  # (B, E)
        logits = torch.addmm(P["b_end2"], y, P["W_end2"])  # (B, 256)
        state.t = t + 1
        return logits, state

    # ------------------------------------------------------------------ naive oracle
    def default_state_naive(
        self, batch: int, device: torch.device | str | None = None
    ) -> WaveNetNaiveState:
        """Empty token history for `step_naive`."""
        device = self.start_conv.weight.device if device is None else device
        return WaveNetNaiveState(torch.zeros(batch, 0, dtype=torch.long, device=device))

    @torch.no_grad()
    def step_naive(
        self, token: Tensor, state: WaveNetNaiveState
    ) -> tuple[Tensor, WaveNetNaiveState]:
        """Oracle step: the zero-padded causal conv over the last RF tokens (equals `step`)."""
        tokens = torch.cat([state.tokens, token[:, None]], 1)[
            :, -self.receptive_field :
        ]  # (B, <= RF)
        logits = self._stack(self._embed(tokens), pad=True, n_out=1)[:, -1]  # (B, 256)
        return logits, WaveNetNaiveState(tokens)

    def _apply(self, fn, *args, **kwargs):  # .to() / .double() / .cuda(): folded weights are stale
        self._fused = None
        return super()._apply(fn, *args, **kwargs)


def from_official_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """An official (state-spaces/s4, v2 or v4 keys) WaveNet Lightning state_dict, optionally
    behind `state_dict.`, as ours: model.<name> -> <name>, encoder[.0].weight ->
    embedding.weight, decoder[.0].output_transform.* -> decoder.*; other keys are ignored."""
    out = {}
    for key, v in sd.items():
        k = key.removeprefix("state_dict.")
        if k.startswith("model."):
            out[k.removeprefix("model.")] = v
        elif k in ("encoder.0.weight", "encoder.weight"):
            out["embedding.weight"] = v
        elif k.startswith(("decoder.0.output_transform.", "decoder.output_transform.")):
            out["decoder." + k.rsplit(".", 1)[1]] = v
    return out
