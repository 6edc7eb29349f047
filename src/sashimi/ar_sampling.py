"""Autoregressive sampling in step mode: nucleus filtering, Gumbel-max token draws and the
batched generation loop behind `sashimi sample` (and the speed benchmarks).

The start state matches what training inputs look like (left-padded with 128): a model whose
`default_state` takes `prime_token` (WaveNet) starts as if `context` 128-tokens had been
consumed. The log-likelihood is the model's own (temperature 1, no top-p), summed over the
sampled positions only.
"""

from __future__ import annotations

import inspect

import torch

ZERO_TOKEN = 128  # the token of a zero sample (8-bit quantisers): the start input


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose mass reaches top_p
    (the most likely token always stays), renormalised. probs (B, K) -> (B, K)."""
    if top_p >= 1.0:
        return probs
    p_sorted, idx = probs.sort(dim=-1, descending=True)  # (B, K)
    keep = (p_sorted.cumsum(-1) - p_sorted) < top_p  # (B, K): mass before this token < top_p
    p_sorted = p_sorted * keep
    out = torch.zeros_like(probs).scatter_(-1, idx, p_sorted)  # (B, K)
    return out / out.sum(-1, keepdim=True)


def sample_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    gumbel: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), nucleus-filtered. (B, K) -> (B,).

    Gumbel-max: argmax(z + G) with G = -log(-log U), U ~ U(0, 1), is an exact draw from
    softmax(z), and cheaper per step than softmax + multinomial. `gumbel` (B, K) is G
    drawn in advance (:class:`GumbelNoise`); otherwise it is drawn here from `generator`."""
    if temperature <= 0:
        return logits.argmax(-1)
    z = logits.float() if temperature == 1.0 else logits.float() / temperature  # (B, K)
    if top_p < 1.0:
        keep = top_p_filter(torch.softmax(z, dim=-1), top_p) > 0  # (B, K)
        z = z.masked_fill(~keep, float("-inf"))
    if gumbel is None:
        gumbel = GumbelNoise.draw(z.shape, generator, z.device)  # (B, K)
    return (z + gumbel).argmax(-1)  # (B,)


class GumbelNoise:
    """Gumbel(0, 1) noise for step-by-step sampling, drawn `block` steps at a time from one
    generator: `next()` returns the (B, K) noise of the next step. One draw per block instead
    of five small element-wise ops per step, which is a measurable share of a batch-1 step."""

    def __init__(self, shape: tuple[int, int], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, block: int = 256):  # fmt: skip
        self.shape, self.generator, self.device, self.block = tuple(shape), generator, device, block
        self._buf: torch.Tensor | None = None
        self._i = block

    @staticmethod
    def draw(shape: tuple[int, ...], generator=None, device=None) -> torch.Tensor:
        u = torch.rand(shape, generator=generator, device=device).clamp_(min=1e-30)
        return u.log_().neg_().log_().neg_()  # -log(-log U)

    def next(self) -> torch.Tensor:
        if self._i == self.block:
            self._buf = self.draw((self.block, *self.shape), self.generator, self.device)
            self._i = 0
        self._i += 1
        return self._buf[self._i - 1]  # (B, K)


@torch.no_grad()
def generate_ar(
    model: torch.nn.Module,
    n: int,
    length: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    prefix: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    progress=None,
    compile: bool = False,
    setup: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched generation in step mode. Returns (tokens LongTensor[n, length], loglik float64 [n]).

    Step t consumes x[t] (x[0] = 128) and yields the logits for y[t]. Positions t < len(prefix)
    are forced to the prefix's tokens; the others are sampled. loglik sums log p_model(y[t])
    (temperature 1, no top-p) over the sampled positions only. `compile=True` asks the model's
    setup_step for its compiled step (SaShiMi; other models step as they are); `setup=False`
    reuses the step set-up of a previous call (same weights: no recompilation per batch).
    """
    device = device or next(model.parameters()).device
    if setup:
        setup_ar(model, compile)
    state = initial_state(model, n, device)
    token = torch.full((n,), ZERO_TOKEN, dtype=torch.long, device=device)  # (n,)
    out = torch.empty((n, length), dtype=torch.long, device=device)  # (n, L)
    loglik = torch.zeros(n, dtype=torch.float64, device=device)  # (n,)
    n_prefix = 0 if prefix is None else int(prefix.numel())
    if prefix is not None:
        prefix = prefix.to(device)
    noise = None
    for t in range(length):
        logits, state = model.step(token, state)  # (n, 256)
        logits = logits.float()
        if t < n_prefix:
            token = prefix[t].expand(n)
        else:
            if noise is None:
                noise = GumbelNoise(logits.shape, generator, logits.device)
            token = sample_token(logits, temperature, top_p, gumbel=noise.next())  # (n,)
            logp = torch.log_softmax(logits, dim=-1)  # (n, 256): the model's own distribution
            loglik += logp.gather(1, token[:, None])[:, 0].double()
        out[:, t] = token
        if progress is not None and (t + 1) % 250 == 0:
            progress.update(250)
    if progress is not None:
        progress.update(length % 250)
    return out, loglik


def setup_ar(model: torch.nn.Module, compile: bool = False) -> None:
    """Prepare `model.step` once for a run of batches: compiled if asked (a run asks through
    `compiling.compile_step`) and the model offers it (SaShiMi)."""
    if compile and "compile" in inspect.signature(model.setup_step).parameters:
        model.setup_step(compile=True)
    else:
        model.setup_step()


def initial_state(model: torch.nn.Module, n: int, device: torch.device | None = None):
    """The step-mode state that matches training: inputs are left-padded with 128, so a model
    whose `default_state` accepts `prime_token` (WaveNet: queues filled as if `context`
    128-tokens had been consumed) starts primed with 128; others start from `default_state`."""
    params = inspect.signature(model.default_state).parameters
    if "prime_token" in params:
        return model.default_state(n, device=device, prime_token=ZERO_TOKEN)
    return model.default_state(n, device=device)
