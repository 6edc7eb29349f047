"""Chains of residual blocks stepped one sample at a time, for SaShiMi generation.

GenericChain steps each block through its own `step` (the oracle). FusedChain is the same
chain as ONE pure function of stacked tensors in real float64 arithmetic, the form that
torch.compile fuses: every S4 layer enters through `S4Block.modal_form()`, the norms and
FF layers through their parameters. Eval semantics (no dropout).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sashimi.models.blocks import FFBlock, ResidualBlock
from sashimi.ssm.s4 import S4Block


class GenericChain:
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


class FusedChain:
    """The same chain as ONE pure function of stacked tensors (fast path, eval semantics).

    Each S4 layer steps its modal form (s_t = lambda-bar s_{t-1} + u_t, y_t = Re(c-hat . s_t)
    + D u_t) rewritten for torch.compile (why each pays: docs/performance.md, "Generation"):
    one mode per conjugate pair (pair_conjugate_modes); y_t = Re((c-hat lambda-bar) . s_{t-1})
    + E u_t, E = D + Re sum c-hat, so the update runs one step late, in place, in the pass that
    reduces it; the input enters along 1 + i, so s_r and s_i update in the same form.
    State per S4 layer: (s_r, s_i (B, H, M), u (B, H)) float64. Raises NotFusable unless
    every S4 layer's modal form is stable.
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
                    if layer.bidirectional:
                        raise NotFusable("a bidirectional S4 layer")
                    form = layer.modal_form()  # lam, c (H, N) complex128
                    if not form.stable:
                        raise NotFusable(f"S4 eigenvector condition number {form.cond:.1e}")
                    kinds.append("s4")
                    glu = form.glu
                    E.append(form.D + form.c.real.sum(-1))  # (H,)
                    lam, c = pair_conjugate_modes(form.lam, form.c)  # (H, M) each
                    lams.append(torch.stack([lam.real, lam.imag]))  # (2, H, M): a, b
                    g = c * lam / (1 + 1j)  # (H, M): the state kept is (1 + i) s
                    G.append(torch.stack([g.real, g.imag]))  # (2, H, M)
                    Wo.append(form.W.t())  # (H, H or 2H)
                    bo.append(form.b)
                elif isinstance(layer, FFBlock):
                    kinds.append("ff")
                    W1.append(layer.linear1.weight.t())  # (H, ff H)
                    b1.append(layer.linear1.bias)
                    W2.append(layer.linear2.weight.t())  # (ff H, H)
                    b2.append(layer.linear2.bias)
                else:
                    raise NotFusable(f"layer {type(layer).__name__}")
            # layers may keep different numbers of modes: pad with inert modes (pole 0, weight 0)
            M = max((t.shape[-1] for t in lams), default=0)
            lams, G = ([F.pad(t, (0, M - t.shape[-1])) for t in ts] for ts in (lams, G))

            def stack(ts):
                return torch.stack([t.detach() for t in ts]).contiguous() if ts else torch.zeros(0)

            self.kinds, self.glu = tuple(kinds), glu
            Wo, W1, W2 = stack(Wo), stack(W1), stack(W2)
            self.params = (
                *(stack(t) for t in (norm_m, norm_s, lams, G, E)),
                Wo,
                stack(bo),
                W1,
                stack(b1),
                W2,
                stack(b2),
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
        return fused_chain_step(x, state, self.params, self.kinds, self.glu), state


class NotFusable(Exception):
    pass


def pair_conjugate_modes(lam: Tensor, c: Tensor, tol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(H, N) poles and weights -> (H, M): one mode per clearly separated conjugate pair.

    m pairs with the mode p nearest conj(lambda_m) when, in every channel, the pairing is
    mutual, p != m and |lambda_p - conj lambda_m| <= tol |Im lambda_m|; the Im > 0 mode keeps
    the averaged pole and the doubled weight (Re(c s) + Re(conj(c s)) = 2 Re(c s)). All N modes
    come back unless the impulse response still matches to 1e-6 at l = 0..255 and 2^8..2^20."""
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


def linear(x: Tensor, WT: Tensor, b: Tensor, WB: Tensor | None = None) -> Tensor:
    """x (B, K) @ WT (K, N) + b. Under torch.compile at batch 1 (static shapes) it is written
    as a reduction over K, which Inductor fuses with the element-wise work around it; with
    WB = the same weight blocked as (N/16, K, 16) (see _blocked) it streams WB in order."""
    if x.shape[0] == 1 and torch.compiler.is_compiling():
        if WB is not None:
            return (x.view(1, 1, -1, 1) * WB).sum(-2).reshape(1, -1) + b  # (1, N/16, 16) -> (1, N)
        return (x.unsqueeze(-1) * WT).sum(-2) + b  # (1, N)
    return torch.addmm(b, x, WT)


def _blocked(WT: Tensor, block: int = 16) -> Tensor:
    """Stacked transposed weights (n, K, N) -> (n, N/block, K, block), so Inductor's batch-1
    reduction (16 outputs, one AVX-512 vector, at a time) reads them in memory order; one block
    of all N if 16 does not divide N."""
    if WT.dim() != 3:  # no layers of this kind (an empty placeholder)
        return WT
    n, K, N = WT.shape
    block = block if N % block == 0 else N
    return WT.view(n, K, N // block, block).permute(0, 2, 1, 3).contiguous()


def fused_chain_step(x: Tensor, state: tuple, params: tuple, kinds: tuple, glu: bool) -> Tensor:
    """x (B, H) -> x, each S4 layer's state (s_r, s_i, u) updated in place (see FusedChain).
    Each new part reads both old ones, hence the first-call check against eager
    (stepper.compiled_matches_eager)."""
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
            h = linear(F.gelu(y.to(x.dtype)), WoT[j], bo[j], WoB[j])  # (B, H or 2H)
            if glu:
                h = F.glu(h, dim=-1)
            j += 1
        else:
            h = linear(F.gelu(linear(z, W1T[f], b1[f], W1B[f])), W2T[f], b2[f], W2B[f])  # (B, H)
            f += 1
        x = x + h
    return x
