"""The recurrent view of a SaShiMi: what `SaShiMi.step` runs, one sample at a time."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sashimi.generation.cuda_graphs import GraphedSteps, map_tensors, tensors
from sashimi.generation.fused import FusedChain, GenericChain, NotFusable, linear
from sashimi.models.blocks import DownPool, ResidualBlock, UpPool
from sashimi.ssm.s4 import S4Block


class Stepper:
    """The recurrent view of a SaShiMi: per level l (one tick per prod(pool[:l]) samples) down
    blocks (unet only), a DownPool, an UpPool and up blocks; the centre at level P = len(pool).

    A tick of level l runs the down blocks and buffers the result in the DownPool, emits one
    buffered UpPool output, and every pool[l] ticks fires the DownPool, ticks level l+1 and
    refills the UpPool (emitting before refilling is the causal shift); then the up blocks.
    Each stage's dense work is one function: FusedChain (`fused=True`, what torch.compile is
    applied to) or GenericChain (each block's own `step`).
    """

    def __init__(
        self,
        model: nn.Module,  # a SaShiMi (typed loosely: models.sashimi imports this module)
        compile: bool = False,
        fused: bool = True,
        s4_mode: str = "auto",
        cuda_graph: bool = False,
    ):
        self.model = model
        self.cuda_graph = cuda_graph
        self._graphed: dict[int, GraphedSteps | None] = {}  # batch size -> its graphs
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
                    return FusedChain(blocks)
                except NotFusable:
                    pass
            for blk in blocks:  # generic: each S4Block steps itself
                if isinstance(blk.layer, S4Block):
                    blk.layer.setup_step(mode=s4_mode)
            return GenericChain(blocks)

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
                y = linear(F.layer_norm(y, y.shape[-1:], head[0], head[1], eps), head[2], head[3])
            return y, state

        return up

    def _compile(self) -> None:
        # On a CPU: the C++ wrapper (less Python between kernels), and a low
        # realize_opcount_threshold so that GELU's output is stored once instead of recomputed
        # inside each batch-1 linear's reduction (docs/performance.md, "Generation").
        cpu = next(self.model.parameters()).device.type == "cpu"
        options = {"cpp_wrapper": True, "realize_opcount_threshold": 8} if cpu else {}

        def wrap(fn: Callable) -> Callable:
            compiled = torch.compile(fn, dynamic=False, options=options)
            use_compiled: dict = {}  # batch size -> the compiled code passed its check

            def call(*args):
                key = args[0].shape[0]  # the stage's input (B, H): B fixes every other shape
                if key not in use_compiled:
                    use_compiled[key] = compiled_matches_eager(fn, compiled, args)
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
                self._graphed[batch] = GraphedSteps.capture(self, batch, device)
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


def _warn_eager(why: str) -> None:
    warnings.warn(f"SaShiMi step: {why}; using eager for this stage", stacklevel=3)


def compiled_matches_eager(fn: Callable, compiled: Callable, args: tuple, calls: int = 3) -> bool:
    """Whether a stage function agrees eager and compiled over `calls` consecutive calls, on
    copies of `args` (same strides): float32 tensors random, the float64 state zero at first.
    From the second call the in-place update reads non-zero state, so a compiled step that
    writes one state part before reading it fails here instead of producing wrong audio."""
    g = torch.Generator(device=tensors(args)[0].device).manual_seed(0)

    def fresh(t: Tensor) -> Tensor:
        out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        if t.dtype == torch.float32:
            return out.copy_(torch.randn(t.shape, generator=g, device=t.device))
        return out.zero_()

    def same(t: Tensor) -> Tensor:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)

    a = map_tensors(fresh, args)
    b = map_tensors(same, a)
    try:
        for _ in range(calls):
            ref, out = fn(*a), compiled(*b)
            for x, y in zip(tensors((ref, a)), tensors((out, b))):
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
