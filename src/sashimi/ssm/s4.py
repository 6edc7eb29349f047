"""S4 layer (DPLR state space) as used by SaShiMi: convolution mode to train, recurrent mode to sample.

Per channel h (N = d_state, kept as N/2 complex-conjugate pairs):

    A = diag(Lambda) - P P^*    Re Lambda = -exp(A_real) < 0, Im Lambda = -A_imag, Q tied to conj(P)
    dt = softplus(inv_dt)       A-bar = (I - dt/2 A)^{-1} (I + dt/2 A), B-bar = (I - dt/2 A)^{-1} dt B
    y = K * u + D u             K[l] = C A-bar^l B-bar, causal FFT convolution of size 2L
    out = output_linear(dropout(GELU(y)))      glu=True: Linear(H, 2H) then GLU over features

Re Lambda < 0 and P P^* >= 0 make A-bar a strict contraction for any parameters and dt > 0, so
generation cannot blow up (the paper's stability fix). The stored C is C~ = C (I - A-bar^l), as
in the official code, whose v4 and "S4 v3" state dicts load by renaming.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from sashimi.errors import UserError
from sashimi.ssm import kernels
from sashimi.ssm.kernels import dplr_kernel, resolve_backend

# The SSM parameters (Lambda, P, B, dt): S4Kernel declares them (`ssm_parameter_names`), and the
# optimiser gives them train.ssm_lr and no weight decay (sashimi.optim).
SSM_PARAMETER_NAMES = ("inv_dt", "A_real", "A_imag", "B", "P")

# Above this eigenvector condition number the float64 modal step would lose more than ~1e-6
# relative accuracy, so setup_step falls back to the exact dense step.
_MAX_MODAL_COND = 1e10


# ----------------------------------------------------------------------------------------------
# Initialisation: HiPPO-LegS in normal-plus-low-rank form
# ----------------------------------------------------------------------------------------------


def hippo_legs(N: int) -> tuple[Tensor, Tensor]:
    """HiPPO-LegS (A, B) in float64: A[n, k] = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k), 0 (n < k); B_n = sqrt(2n+1)."""
    q = torch.arange(N, dtype=torch.float64)
    r = torch.sqrt(2 * q + 1)  # (N,)
    A = -torch.tril(r[:, None] * r[None, :], diagonal=-1) - torch.diag(q + 1)  # (N, N)
    return A, r


def hippo_legs_nplr(N: int, B_clip: float = 2.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(Lambda, P, B, V), complex128, with A_legs = V (diag(Lambda) - P P^*) V^*: A_legs + p p^T,
    p_n = sqrt(n + 1/2), is -1/2 I + skew, so V is unitary. Keeps the N/2 eigenvalues with
    Im < 0 (ascending; V: (N, N/2)) and clips Im B to [-B_clip, B_clip], as the official init."""
    A, B = hippo_legs(N)
    p = torch.sqrt(torch.arange(N, dtype=torch.float64) + 0.5)  # (N,)
    S = A + p[:, None] * p[None, :]  # normal: -1/2 I + skew
    lam_re = torch.diagonal(S).mean()
    lam_im, V = torch.linalg.eigh(S.to(torch.complex128) * -1j)  # Hermitian -i S
    Lambda = lam_re + 1j * lam_im  # (N,)
    idx = torch.argsort(Lambda.imag)[: N // 2]
    Lambda, V = Lambda[idx], V[:, idx]  # (N/2,), (N, N/2)
    Vh = V.conj().T
    B = Vh @ B.to(V)  # (N/2,)
    P = Vh @ p.to(V)  # (N/2,)
    B = torch.complex(B.real, B.imag.clamp(-B_clip, B_clip))
    return Lambda, P, B, V


def _inverse_softplus(x: Tensor) -> Tensor:
    return torch.log(torch.exp(x) - 1)


def _c(x: Tensor) -> Tensor:
    """Complex view of a real (..., 2) parameter."""
    return torch.view_as_complex(x)


def _conj_ext(x: Tensor) -> Tensor:
    """Conjugate-extended vector (x, conj x) along the last dim."""
    return torch.cat([x, x.conj()], dim=-1)


# ----------------------------------------------------------------------------------------------
# The SSM kernel
# ----------------------------------------------------------------------------------------------


class S4Kernel(nn.Module):
    """DPLR SSM parameters and the length-L convolution kernel (channels, H, L).

    Complex parameters are float32 real views (trailing dim 2); channels = 2 when bidirectional
    (C[1] the backward kernel); channel h uses SSM copy h % n_ssm (official '(v t)' layout).
    l_kernel == 0 means raw C; the first forward at length L stores C~ = C (I - A-bar^L), a
    longer one doubles l_kernel, a shorter one truncates the kernel.
    """

    ssm_parameter_names = SSM_PARAMETER_NAMES  # own lr, no weight decay (sashimi.optim)

    def __init__(
        self,
        H: int,
        N: int = 64,
        channels: int = 1,
        n_ssm: int = 1,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        backend: str = "auto",
    ):
        super().__init__()
        if N % 2 or N <= 0:
            raise UserError(f"S4 d_state must be a positive even number, got {N}")
        if n_ssm <= 0 or H % n_ssm:
            raise UserError(f"S4 n_ssm={n_ssm} must divide d_model={H}")
        resolve_backend(backend)
        self.H, self.N, self.channels, self.n_ssm, self.backend = H, N, channels, n_ssm, backend
        self.compile_mode = "auto"
        N2 = N // 2

        # Same random draws, in the same order, as the official SSMKernelDPLR (seeded inits coincide).
        log_dt_range = math.log(dt_max) - math.log(dt_min)
        log_dt = torch.rand(H, 1) * log_dt_range + math.log(dt_min)  # (H, 1)
        inv_dt = _inverse_softplus(torch.exp(log_dt))  # dt = softplus(inv_dt)
        Lambda, P, B, _ = hippo_legs_nplr(N)  # (N2,) complex128 each
        C = torch.randn(channels, H, N2, dtype=torch.cfloat).conj().resolve_conj()  # (c, H, N2)

        self.inv_dt = nn.Parameter(inv_dt)  # (H, 1)
        self.C = nn.Parameter(torch.view_as_real(C).contiguous())  # (channels, H, N2, 2)
        copies = lambda x: x.float().expand(n_ssm, *x.shape[1:]).contiguous()  # noqa: E731
        self.B = nn.Parameter(copies(torch.view_as_real(B)[None]).unsqueeze(0))  # (1, n_ssm, N2, 2)
        self.A_real = nn.Parameter(copies(torch.log(-Lambda.real)[None]))  # (n_ssm, N2)
        self.A_imag = nn.Parameter(copies(-Lambda.imag[None]))  # (n_ssm, N2)
        self.P = nn.Parameter(copies(torch.view_as_real(P)[None]).unsqueeze(0))  # (1, n_ssm, N2, 2)
        self.register_buffer("l_kernel", torch.tensor(0, dtype=torch.int64))

    # -- parameters ------------------------------------------------------------------------------

    def ssm_params(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """dt (H,) and complex Lambda, B, P (H, N2), C (channels, H, N2), broadcast to H channels."""
        dt = F.softplus(self.inv_dt).squeeze(-1)  # (H,)
        Lambda = torch.complex(-torch.exp(self.A_real), -self.A_imag)  # (n_ssm, N2)
        B, P = _c(self.B)[0], _c(self.P)[0]  # (n_ssm, N2) each
        rep = self.H // self.n_ssm  # channel h uses SSM copy h % n_ssm
        return dt, Lambda.repeat(rep, 1), B.repeat(rep, 1), P.repeat(rep, 1), _c(self.C)

    def dense_A(self) -> Tensor:
        """Continuous A = diag(Lambda) - p p^* on the conjugate-extended state, (n_ssm, N, N) complex128."""
        A_real, A_imag = self.A_real.double(), self.A_imag.double()
        Lambda = torch.complex(-torch.exp(A_real), -A_imag)  # (n_ssm, N2)
        p = _conj_ext(_c(self.P.double())[0])  # (n_ssm, N)
        return torch.diag_embed(_conj_ext(Lambda)) - p.unsqueeze(-1) * p.conj().unsqueeze(-2)

    @torch.no_grad()
    def discrete_dense(self) -> tuple[Tensor, Tensor]:
        """Bilinear A-bar (H, N, N) and B-bar (H, N) on the conjugate-extended state, complex128."""
        dt = F.softplus(self.inv_dt.double())  # (H, 1)
        A = self.dense_A().repeat(self.H // self.n_ssm, 1, 1)  # (H, N, N)
        B = _conj_ext(_c(self.B.double())[0]).repeat(self.H // self.n_ssm, 1)  # (H, N)
        I = torch.eye(self.N, dtype=A.dtype, device=A.device)
        A_back = I - dt[..., None] / 2 * A  # (H, N, N)
        dA = torch.linalg.solve(A_back, I + dt[..., None] / 2 * A)  # (H, N, N)
        dB = torch.linalg.solve(A_back, (dt * B).unsqueeze(-1)).squeeze(-1)  # (H, N)
        return dA, dB

    # -- C~ bookkeeping --------------------------------------------------------------------------

    @staticmethod
    def _row_times_power(C: Tensor, dA: Tensor, n: int) -> Tensor:
        """C A-bar^n for row vectors C (c, H, N), by binary powering (squarings only on the matrix)."""
        out, M = C, dA
        while n:
            if n & 1:
                out = torch.einsum("chn,hnm->chm", out, M)
            n >>= 1
            if n:
                M = M @ M
        return out

    @torch.no_grad()
    def extend(self, L: int) -> None:
        """Make the stored C~ cover length L (0 -> L, then doubling, as the official code), with
        dense float64 powers of A-bar (the modal form is too ill-conditioned here)."""
        l = int(self.l_kernel)
        if l >= L:
            return
        dA, _ = self.discrete_dense()  # (H, N, N)
        C = _conj_ext(_c(self.C.double()))  # (c, H, N)
        if l == 0:
            C = C - self._row_times_power(C, dA, L)  # C~ = C (I - A-bar^L)
            l = L
        while l < L:
            C = C + self._row_times_power(C, dA, l)  # C~_{2l} = C~_l (I + A-bar^l)
            l *= 2
        self.C.copy_(torch.view_as_real(C[..., : self.N // 2]))
        self.l_kernel.fill_(l)

    def forward(self, L: int) -> Tensor:
        """Convolution kernel K: (channels, H, L)."""
        if int(self.l_kernel) < L:
            self.extend(L)
        l = int(self.l_kernel)
        with torch.autocast(self.C.device.type, enabled=False):
            dt, Lambda, B, P, C = self.ssm_params()
            dtA = Lambda * dt.unsqueeze(-1)  # (H, N2)
            K = dplr_kernel(dtA, B, P, C, dt, l, self.backend, self.compile_mode)  # (c, H, l)
        return K[..., :L]

    # -- recurrent mode --------------------------------------------------------------------------

    @torch.no_grad()
    def step_system(self) -> tuple[Tensor, Tensor, Tensor]:
        """Exact A-bar (H, N, N), B-bar (H, N), C (c, H, N) on the conjugate-extended state; C from
        C~ by solving (I - A-bar^l)^T C^T = C~^T (official dense set-up)."""
        dA, dB = self.discrete_dense()
        C = _conj_ext(_c(self.C.double()))  # (c, H, N)
        l = int(self.l_kernel)
        if l > 0:
            I = torch.eye(self.N, dtype=dA.dtype, device=dA.device)
            M = (I - torch.linalg.matrix_power(dA, l)).transpose(-1, -2)  # (H, N, N)
            C = torch.linalg.solve(M, C.unsqueeze(-1)).squeeze(-1)  # (c, H, N)
        return dA, dB, C

    @torch.no_grad()
    def modal_system(self) -> tuple[Tensor, Tensor, float]:
        """Diagonalised system: poles lambda-bar (H, N), output weights c-hat (c, H, N), cond(V).

        A = V diag(sigma) V^{-1}, lambda-bar = (1 + dt sigma/2)/(1 - dt sigma/2), s_t = lambda-bar
        s_{t-1} + u_t, y_t = Re(sum_m c-hat_m s_t,m), c-hat = (C V) * (V^{-1} B-bar). Float64: V is
        ill-conditioned (cond ~ 1e8 at init), and the error is ~cond * eps."""
        A = self.dense_A()  # (n_ssm, N, N)
        sigma, V = torch.linalg.eig(A)  # (n_ssm, N), (n_ssm, N, N)
        cond = float(torch.linalg.cond(V).max())
        Vinv = torch.linalg.inv(V)
        rep = self.H // self.n_ssm  # per channel below
        sigma, V, Vinv = sigma.repeat(rep, 1), V.repeat(rep, 1, 1), Vinv.repeat(rep, 1, 1)
        dt = F.softplus(self.inv_dt.double())  # (H, 1)
        half = 1 - dt * sigma / 2  # (H, N)
        lam = (1 + dt * sigma / 2) / half  # (H, N)
        B = _conj_ext(_c(self.B.double())[0]).repeat(rep, 1)  # (H, N)
        b = torch.einsum("hmn,hn->hm", Vinv, B) * dt / half  # V^{-1} B-bar, (H, N)
        CV = torch.einsum("chn,hnm->chm", _conj_ext(_c(self.C.double())), V)  # (c, H, N)
        l = int(self.l_kernel)
        if l > 0:
            CV = CV / -torch.expm1(l * torch.log(lam))  # undo (I - A-bar^l) in the eigenbasis
        return lam, CV * b, cond


# ----------------------------------------------------------------------------------------------
# FFT convolution
# ----------------------------------------------------------------------------------------------


class FFTConv(torch.autograd.Function):
    """y = (k * x)[:L] + D x, a size-2L circular convolution of the zero-padded x (B, L, H) with
    k (H, n_k <= 2L; lags >= L wrap to negative ones: the bidirectional kernel), D (H,).

    Written out so every transform is real (autograd's rfft backward is complex, docs/performance.md):
        G = rfft(g, n)    dL/dx = irfft(G conj(K))[:L] + D g    dL/dk = irfft(sum_b G conj(X))[:n_k]
    """

    @staticmethod
    def forward(ctx, x: Tensor, k: Tensor, D: Tensor) -> Tensor:
        L, n_k = x.shape[1], k.shape[-1]
        n = 2 * L
        k_f = torch.fft.rfft(k, n=n)  # (H, L+1)
        x_f = torch.fft.rfft(x.transpose(1, 2), n=n)  # (B, H, L+1)
        y = torch.fft.irfft(x_f * k_f, n=n)[..., :L]  # (B, H, L)
        ctx.save_for_backward(x, x_f, k_f, D)  # x_f kept for dL/dk (memory for time)
        ctx.n_k = n_k
        if torch.compiler.is_compiling():  # (a whole-model torch.compile: no out= here, as
            # a traced forward's out= result comes back cut off from this Function's backward)
            return torch.addcmul(y.transpose(1, 2), x, D).contiguous()  # (B, L, H)
        # written into a (B, L, H)-contiguous buffer: left to itself addcmul would keep y's
        # (B, H, L) memory layout, and every later op (GELU, the linear) would pay for it
        return torch.addcmul(y.transpose(1, 2), x, D, out=torch.empty_like(x))  # (B, L, H)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, x_f, k_f, D = ctx.saved_tensors
        L = g.shape[1]
        n = 2 * L
        g_f = torch.fft.rfft(g.transpose(1, 2), n=n)  # (B, H, L+1)
        gx = gk = gD = None
        if ctx.needs_input_grad[1]:  # sum_b G conj(X), accumulated in place
            gk_f = g_f[0] * x_f[0].conj()  # (H, L+1)
            for b in range(1, g_f.shape[0]):
                gk_f.addcmul_(g_f[b], x_f[b].conj())
            gk = torch.fft.irfft(gk_f, n=n)[..., : ctx.n_k]  # (H, n_k)
        if ctx.needs_input_grad[0]:  # (g_f is not needed after this: multiplied in place)
            gx = torch.fft.irfft(g_f.mul_(k_f.conj()), n=n)[..., :L].transpose(1, 2)  # (B, L, H)
            # (B, L, H) contiguous, as forward
            gx = torch.addcmul(gx, g, D, out=torch.empty_like(g))
        if ctx.needs_input_grad[2]:
            gD = (g * x).sum((0, 1))  # (H,)
        return gx, gk, gD


# ----------------------------------------------------------------------------------------------
# The block
# ----------------------------------------------------------------------------------------------


def s4_head(
    y: Tensor, W: Tensor, b: Tensor, glu: bool, residual: Tensor | None = None, p: float = 0.0
) -> Tensor:
    """S4Block's pointwise tail, both modes: GELU -> dropout(p) -> linear (-> GLU) (+ residual),
    (..., H) -> (..., H). A plain function, so `kernels.maybe_compiled` can fuse it."""
    y = F.gelu(y)
    if p > 0:
        y = F.dropout(y, p)
    y = F.linear(y, W, b)  # (..., H or 2H)
    if glu:
        y = F.glu(y, dim=-1)
    return y if residual is None else y + residual


class ModalForm(NamedTuple):
    """An S4Block's recurrence in diagonal float64 form: s_t = lam s_{t-1} + u_t,
    y_t = Re(sum_m c_m s_t,m) + D u_t, out = W GELU(y) + b (-> GLU); `stable` if cond allows."""

    lam: Tensor  # (H, N) complex128, poles lambda-bar
    c: Tensor  # (H, N) complex128, output weights c-hat
    D: Tensor  # (H,) float64
    W: Tensor  # (H or 2H, H), the output linear's weight
    b: Tensor  # (H or 2H,)
    glu: bool
    cond: float

    @property
    def stable(self) -> bool:
        return self.cond < _MAX_MODAL_COND


class S4Block(nn.Module):
    """S4 layer on (B, L, H): FFTConv(u) + D u -> GELU -> dropout -> output linear (-> GLU), the
    official order. Recurrent mode steps a float64 modal state (the exact dense step when
    cond > _MAX_MODAL_COND); `modal_form()` is the interface of the fused generation engine."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        glu: bool = False,
        bidirectional: bool = False,
        dropout: float = 0.0,
        n_ssm: int = 1,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        backend: str = "auto",
    ):
        super().__init__()
        H = self.d_model = d_model
        self.d_state, self.glu, self.bidirectional = d_state, glu, bidirectional
        # Creation order as in the official FFTConv/S4Block (D, kernel, output linear): same RNG draws.
        self.D = nn.Parameter(torch.randn(1, H))  # (1, H)
        self.kernel = S4Kernel(
            H,
            N=d_state,
            channels=2 if bidirectional else 1,
            n_ssm=n_ssm,
            dt_min=dt_min,
            dt_max=dt_max,
            backend=backend,
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.output_linear = nn.Linear(H, 2 * H if glu else H)
        self.compile_mode = "auto"  # the pointwise tail (kernels.set_compile_mode)
        self._step_mode: str | None = None

    # -- convolution mode ------------------------------------------------------------------------

    def fft_conv(self, u: Tensor) -> Tensor:
        """y = K * u + D u on (B, L, H); bidirectional as the official FFTConv:
        y[t] = sum_s k0[s] u[t-s] + sum_s k1[s] u[t+1+s] + D u[t] (k0, k1 from C[0], C[1])."""
        L = u.size(1)
        x = u if u.dtype in (torch.float32, torch.float64) else u.float()
        K = self.kernel(L)  # (channels, H, L)
        if self.bidirectional:
            # Official layout: forward kernel at lags 0..L-1, backward kernel k1[j] at lag -(j+1).
            k = F.pad(K[0], (0, L)) + F.pad(K[1].flip(-1), (L, 0))  # (H, 2L)
        else:
            k = K[0]  # (H, L)
        with torch.autocast(x.device.type, enabled=False):
            return FFTConv.apply(x, k.to(x.dtype), self.D[0].to(x.dtype))  # (B, L, H)

    def forward(self, u: Tensor, residual: Tensor | None = None) -> Tensor:
        """u: (B, L, H) -> (B, L, H); plus `residual` (B, L, H) if given (the residual block's skip,
        added here so that the compiled pointwise tail fuses it)."""
        y = self.fft_conv(u).to(u.dtype)  # (B, L, H)
        W, b = self.output_linear.weight, self.output_linear.bias
        p = self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0
        # with dropout: eager (torch's RNG)
        head = s4_head if p > 0 else kernels.maybe_compiled(s4_head, y, self.compile_mode)
        return head(y, W, b, self.glu, residual, p)

    # -- recurrent mode --------------------------------------------------------------------------

    @torch.no_grad()
    def modal_form(self) -> ModalForm:
        """The diagonalised recurrence from the current parameters (see ModalForm)."""
        if self.bidirectional:
            raise UserError("S4Block(bidirectional=True) has no recurrent (step) mode")
        lam, c, cond = self.kernel.modal_system()  # (H, N), (1, H, N)
        W, b = self.output_linear.weight.detach(), self.output_linear.bias.detach()
        D = self.D.double()[0]  # (H,)
        return ModalForm(lam, c[0], D, W, b, self.glu, cond)

    @torch.no_grad()
    def setup_step(self, mode: str = "auto") -> None:
        """Precompute the recurrent system (redo after updates/.to()): mode "auto" (modal unless
        ill-conditioned), "modal", or "dense" (exact, slower)."""
        if self.bidirectional:
            raise UserError("S4Block(bidirectional=True) has no recurrent (step) mode")
        if mode not in ("auto", "modal", "dense"):
            raise UserError(f"unknown S4 step mode {mode!r}; expected auto, modal or dense")
        D = self.D.double()[0]  # (H,)
        if mode in ("auto", "modal"):
            form = self.modal_form()
            if mode == "modal" or form.stable:
                # An extra mode with pole 0 and weight D carries the skip term: its state is just u_t.
                lam = F.pad(form.lam, (0, 1))  # (H, M = N+1) complex128
                c = torch.cat([form.c, D.to(form.c.dtype).unsqueeze(-1)], dim=-1)  # (H, M)
                self._lam = lam  # (H, M) complex128
                # Re(c-hat . s) as a real dot product with the (re, im) view of s: weights (Re c, -Im c).
                self._c_ri = torch.stack([c.real, -c.imag], dim=-1).flatten(-2)  # (H, 2M)
                # Real form (for torch.compile): lambda-bar and c-hat split into real/imag parts.
                self._lam_r, self._lam_i, self._c_r, self._c_i = lam.real, lam.imag, c.real, c.imag
                self._step_mode = "modal"
                return
            msg = (
                f"S4 step: eigenvectors too ill-conditioned (cond {form.cond:.1e}); "
                "using the dense step"
            )
            warnings.warn(msg, stacklevel=2)
        dA, dB, C = self.kernel.step_system()
        self._dA, self._dB, self._dC, self._D = dA, dB, C[0], D  # (H, N, N), (H, N), (H, N), (H,)
        self._step_mode = "dense"

    def default_state(self, batch: int, device: torch.device | str | None = None) -> Tensor:
        """Zero recurrent state, float64 real view of complex modes: (batch, H, N+1, 2) modal, (batch, H, N, 2) dense."""
        if self._step_mode is None:
            self.setup_step()
        size = self._lam.shape[-1] if self._step_mode == "modal" else self.d_state
        device = self.D.device if device is None else device
        return torch.zeros(batch, self.d_model, size, 2, dtype=torch.float64, device=device)

    def step(self, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One time step: u (B, H) -> y (B, H); state from :meth:`default_state` or a previous step."""
        if self._step_mode == "modal":
            if torch.compiler.is_compiling():
                y, state = self._step_modal_real(u, state)
            else:
                y, state = self._step_modal_complex(u, state)
        elif self._step_mode == "dense":
            s = torch.view_as_complex(state)  # (B, H, N)
            bu = self._dB * u.to(torch.float64).unsqueeze(-1)  # (B, H, N)
            s = torch.einsum("hmn,bhn->bhm", self._dA, s) + bu  # (B, H, N)
            y = torch.einsum("hn,bhn->bh", self._dC, s).real + self._D * u  # (B, H)
            state = torch.view_as_real(s)
        else:
            raise RuntimeError("call setup_step() before step()")
        W, b = self.output_linear.weight, self.output_linear.bias
        return s4_head(y.to(u.dtype), W, b, self.glu), state

    def _step_modal_complex(self, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """Eager modal step in as few kernel launches as possible (batch-1 cost is dispatch, not FLOPs)."""
        u_c = u.to(torch.complex128).unsqueeze(-1)  # (B, H, 1)
        # s_t = lambda-bar s_{t-1} + u_t
        s = torch.addcmul(u_c, self._lam, torch.view_as_complex(state))  # (B, H, M)
        s = torch.view_as_real(s)  # (B, H, M, 2)
        y = (s.flatten(-2) * self._c_ri).sum(-1)  # Re(c-hat . s_t), includes D u_t, (B, H)
        return y, s

    def _step_modal_real(self, u: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """The same step in real arithmetic, which Inductor fuses into one kernel under torch.compile."""
        u = u.to(torch.float64).unsqueeze(-1)  # (B, H, 1)
        sr, si = state[..., 0], state[..., 1]  # (B, H, M)
        nr = self._lam_r * sr - self._lam_i * si + u
        ni = self._lam_i * sr + self._lam_r * si
        y = (self._c_r * nr - self._c_i * ni).sum(-1)  # (B, H)
        return y, torch.stack([nr, ni], dim=-1)

    # -- official checkpoints --------------------------------------------------------------------

    def load_official_state_dict(self, sd: Mapping[str, Tensor], strict: bool = True):
        """Load a state-spaces/s4 (v4) S4Block state dict (keys layer.D, layer.kernel.*, output_linear.0.*)."""
        return self.load_state_dict({official_s4_key(k): v for k, v in sd.items()}, strict=strict)


def official_s4_key(key: str) -> str:
    """One official (state-spaces/s4 v4) S4Block key as ours (same shapes and values):
    layer.<name> -> <name>, output_linear.0.<p> -> output_linear.<p>."""
    if key.startswith("layer."):
        return key[len("layer.") :]
    if key.startswith("output_linear.0."):
        return "output_linear." + key[len("output_linear.0.") :]
    raise UserError(f"unexpected key {key!r} in an official S4Block state dict")


def convert_v3_kernel_state(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An "S4 v3" SSKernelNPLR state dict (log_dt, inv_w_real, w_imag, B, P, C, L; any common
    prefix) as :class:`S4Kernel` keys, prefix dropped. v3 has dt = exp(log_dt), Re Lambda =
    -exp(inv_w_real), Im Lambda = w_imag; inv_dt = softplus^{-1}(dt) in float64 keeps K unchanged."""
    names = {"log_dt", "inv_w_real", "w_imag", "B", "P", "C", "L"}
    found = {k.rsplit(".", 1)[-1]: v for k, v in sd.items() if k.rsplit(".", 1)[-1] in names}
    missing = names - found.keys()
    if missing:
        raise UserError(f"S4 v3 kernel state is missing {', '.join(sorted(missing))}")
    log_dt = found["log_dt"]
    dt = torch.exp(log_dt.double())
    inv_dt = (dt + torch.log(-torch.expm1(-dt))).to(log_dt.dtype).unsqueeze(-1)  # (H, 1)
    return {
        "inv_dt": inv_dt,
        "C": found["C"],
        "B": found["B"],
        "A_real": found["inv_w_real"],
        "A_imag": -found["w_imag"],
        "P": found["P"],
        "l_kernel": found["L"].to(torch.int64),
    }


def convert_v3_s4_state(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Convert a whole "S4 v3" S4 module state dict (D, kernel.kernel.*, output_linear.0.*) to S4Block keys."""
    out = {"D": sd["D"]}
    out.update(
        {
            "kernel." + k: v
            for k, v in convert_v3_kernel_state(
                {k: v for k, v in sd.items() if k.startswith("kernel.")}
            ).items()
        }
    )
    for name in ("weight", "bias"):
        v = sd[f"output_linear.0.{name}"]
        out[f"output_linear.{name}"] = (
            v.reshape(v.shape[0], -1) if name == "weight" else v.reshape(-1)
        )
    return out
