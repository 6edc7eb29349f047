"""SaShiMi: a multi-scale S4 backbone for raw audio (Goel, Gu, Donahue, Re; ICML 2022).

The version the paper's experiments used (see SPEC "SaShiMi backbone"):

    tokens (B, L) -> Embedding(256, H)
      level 0 (width H, length L):  skip x0 -> DownPool(stride 4) ->
      level 1 (2H, L/4):            skip x1 -> DownPool(stride 4) ->
      centre  (4H, L/16):           n_layers x [S4, FF] + skip
      level 1: UpPool -> + x1 -> n_layers x [S4, FF] + skip from right after the UpPool
      level 0: UpPool -> + x0 -> n_layers x [S4, FF] + skip from right after the UpPool
    -> LayerNorm(H) -> Linear(H, 256) -> logits (B, L, 256)

Every [S4] / [FF] is a prenorm residual block (models.blocks). The UpPool's one-pooled-step
shift makes the model causal, so it can be stepped sample by sample (sashimi.generation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sashimi.errors import UserError
from sashimi.generation.stepper import Stepper
from sashimi.models.blocks import DownPool, FFBlock, ResidualBlock, UpPool
from sashimi.models.unet import unet_backbone
from sashimi.ssm.s4 import S4Block
from sashimi.ssm.s4_unconstrained import with_ssm


class SaShiMi(nn.Module):
    """Autoregressive SaShiMi: tokens (B, L) -> logits (B, L, n_classes); logits[:, t] predicts
    y[t] from x[:t+1] (a causal model pads L to a multiple of prod(pool) and crops).

    Defaults are the paper's SC09 / music model. `glu=True` is the released checkpoint's S4
    output layer, `glu=False` gives the paper's parameter counts; `bidirectional` makes every
    S4Block and UpPool non-causal; `unet` adds the down-path blocks (the DiffWave layout);
    `ssm` "unconstrained" is the stability ablation's S4 (sashimi.ssm.s4_unconstrained).
    Generation: setup_step(), state = default_state(B), then `logits, state = step(token,
    state)` per sample, the state updated in place.
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
        ssm: str = "stable",
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
            return ResidualBlock(H, with_ssm(layer, ssm))  # ssm: 'stable' | 'unconstrained'

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
        self._stepper: Stepper | None = None

    # ---- convolution (training) mode ------------------------------------

    def backbone(self, x: Tensor) -> Tensor:
        """(B, L, H) -> (B, L, H), before the final norm. L must be divisible by prod(pool)."""
        up = [(block[0], block[1:]) for block in self.u_layers]  # (UpPool, blocks), innermost first
        return unet_backbone(x, self.d_layers, self.c_layers, up, self.unet, _call)

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
        """Prepare for `step` (redo after the weights change). `compile` wraps each stage in
        torch.compile (eager if that fails); `s4_mode` goes to S4Block.setup_step; `fused`
        (default: = compile) steps each stage as one pure float64 function (generation.fused),
        else block by block; `cuda_graph` (default: on CUDA) replays steps from CUDA graphs, and
        then only the newest `default_state(batch)` of each batch size can be stepped."""
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
        self._stepper = Stepper(
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


def _call(layer: nn.Module, x: Tensor) -> Tensor:
    return layer(x)
