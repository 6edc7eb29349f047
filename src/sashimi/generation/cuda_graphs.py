"""SaShiMi's recurrent step replayed from CUDA graphs, one set per batch size."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor


class Steps(Protocol):
    """What GraphedSteps replays: generation.stepper.Stepper (not imported: it imports us)."""

    strides: tuple[int, ...]  # pool per level; T = prod(strides) phases

    def _fresh_state(self, batch: int, device: torch.device) -> dict: ...

    def _step(self, token: Tensor, state: dict) -> Tensor: ...


def tensors(obj) -> list[Tensor]:
    """The tensors in nested tuples, lists and dicts (values), in order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in tensors(o)]
    return []


def map_tensors(fn: Callable[[Tensor], Tensor], obj):
    """`obj` with every tensor t in its nested tuples and lists replaced by fn(t)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, o) for o in obj)
    return obj


class GraphedSteps:
    """The recurrent step replayed from CUDA graphs, for one batch size (a GPU step is
    launch-bound: docs/performance.md, "Generation").

    Which stages run at step t depends only on t mod T, T = prod(pool), so T graphs, one per
    phase, sharing one memory pool and replayed in capture order, cover every step; the last
    copies the state back to where the period started. The state thus lives here: `reset`
    refills it and returns a handle, and only the newest handle can step. A failed capture
    warns and leaves this batch size to the launched step."""

    @torch.no_grad()  # as SaShiMi.step: the stages are compiled (and captured) without autograd
    def __init__(self, stepper: Steps, batch: int, device: torch.device):
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
        self.start = tensors(state)  # the period-start state tensors
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.logits: list[Tensor] = []  # each phase's output buffer (B, n_classes)
        for phase in range(T):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                y = stepper._step(self.token, state)
                if phase == T - 1:  # close the period: carry the state back to its start
                    end = tensors(state)
                    if [t.shape for t in end] != [t.shape for t in self.start]:
                        raise RuntimeError("the state's layout changed over one period")
                    for a, b in zip(self.start, end):
                        if a is not b:  # (states updated in place are already there)
                            a.copy_(b)
            self.graphs.append(g)
            self.logits.append(y)
        self.phase, self.epoch = 0, 0

    @classmethod
    def capture(cls, stepper: Steps, batch: int, device: torch.device) -> GraphedSteps | None:
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
        for a, b in zip(self.start, tensors(self.stepper._fresh_state(self.batch, self.device))):
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
