"""The original, unconstrained S4 parametrisation: the model of the stability ablation.

SaShiMi's fix (paper section 3.2) ties Q to P and keeps Re Lambda negative (S4Kernel):

    ours:          A = diag(Lambda) - P P^*    Re Lambda = -exp(A_real) < 0
    unconstrained: A = diag(Lambda) - P Q^*    Re Lambda a free real parameter, P and Q untied

Nothing keeps the unconstrained A Hurwitz, so training may push an eigenvalue of A-bar out of
the unit disc and the recurrence then grows without bound. Discretisation, state and layer are
S4Kernel's / S4Block's, so both recurrent modes work as they are; C is stored raw (l_kernel 0).
The kernel is computed exactly from the dense A-bar (:func:`power_kernel`): a few times the
Cauchy kernel's work at the paper's SC09 sizes, fine for an ablation, not a replacement.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from sashimi.errors import UserError
from sashimi.ssm.s4 import S4Block, S4Kernel, _c, _conj_ext

# The SSM parametrisations a SaShiMi model can be built with (its `ssm` keyword).
SSM_KINDS = ("stable", "unconstrained")


class UnconstrainedS4Kernel(S4Kernel):
    """S4Kernel with A = diag(Lambda) - P Q^*: Lambda_real (n_ssm, N/2) replaces A_real, Q (1,
    n_ssm, N/2, 2) sits beside P. Initialised to S4Kernel's system (Lambda_real = -exp(A_real),
    Q = P), so the two differ only in what training can reach."""

    ssm_parameter_names = ("inv_dt", "Lambda_real", "A_imag", "B", "P", "Q")

    def __init__(self, H: int, N: int = 64, channels: int = 1, n_ssm: int = 1,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, backend: str = "auto"):  # fmt: skip
        super().__init__(H, N, channels, n_ssm, dt_min, dt_max, backend)
        Lambda_real = -torch.exp(self.A_real.detach())  # (n_ssm, N2)
        del self.A_real
        self.Lambda_real = nn.Parameter(Lambda_real)
        self.Q = nn.Parameter(self.P.detach().clone())  # (1, n_ssm, N2, 2)

    @classmethod
    @torch.no_grad()
    def from_kernel(cls, kernel: S4Kernel) -> UnconstrainedS4Kernel:
        """The same SSM as a fresh `kernel` (raw C), in the unconstrained parametrisation.

        Draws no random numbers from the global generator, so a model's other layers are
        initialised exactly as in the constrained model.
        """
        if int(kernel.l_kernel):
            raise UserError("UnconstrainedS4Kernel.from_kernel needs a fresh S4Kernel (raw C)")
        with torch.random.fork_rng(devices=[]):
            new = cls(kernel.H, kernel.N, kernel.channels, kernel.n_ssm, backend=kernel.backend)
        new = new.to(kernel.C.device)
        for name in ("inv_dt", "C", "B", "A_imag", "P"):
            getattr(new, name).copy_(getattr(kernel, name))
        new.Q.copy_(kernel.P)
        new.Lambda_real.copy_(-torch.exp(kernel.A_real))
        new.compile_mode = kernel.compile_mode
        return new

    # -- parameters ------------------------------------------------------------------------------

    def ssm_params(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """dt (H,) and complex Lambda, B, P (H, N2), C (channels, H, N2) (Q: see `dense_A`)."""
        dt = F.softplus(self.inv_dt).squeeze(-1)  # (H,)
        Lambda = torch.complex(self.Lambda_real, -self.A_imag)  # (n_ssm, N2)
        B, P = _c(self.B)[0], _c(self.P)[0]  # (n_ssm, N2) each
        rep = self.H // self.n_ssm
        return dt, Lambda.repeat(rep, 1), B.repeat(rep, 1), P.repeat(rep, 1), _c(self.C)

    def _A(self, dtype: torch.dtype) -> Tensor:
        """A = diag(Lambda) - p q^* on the conjugate-extended state, (n_ssm, N, N), differentiable."""
        real = torch.float64 if dtype == torch.complex128 else torch.float32
        Lambda = torch.complex(self.Lambda_real.to(real), -self.A_imag.to(real))  # (n_ssm, N2)
        p = _conj_ext(_c(self.P.to(real))[0])  # (n_ssm, N)
        q = _conj_ext(_c(self.Q.to(real))[0])  # (n_ssm, N)
        return torch.diag_embed(_conj_ext(Lambda)) - p.unsqueeze(-1) * q.conj().unsqueeze(-2)

    def dense_A(self) -> Tensor:
        """Continuous A (n_ssm, N, N) complex128 (used by the recurrent set-up)."""
        return self._A(torch.complex128)

    def discretize(self, dtype: torch.dtype = torch.complex128) -> tuple[Tensor, Tensor]:
        """Bilinear A-bar (H, N, N) and B-bar (H, N), differentiable (the training kernel's)."""
        real = torch.float64 if dtype == torch.complex128 else torch.float32
        dt = F.softplus(self.inv_dt.to(real))  # (H, 1)
        rep = self.H // self.n_ssm
        A = self._A(dtype).repeat(rep, 1, 1)  # (H, N, N)
        B = _conj_ext(_c(self.B.to(real))[0]).repeat(rep, 1)  # (H, N)
        I = torch.eye(self.N, dtype=A.dtype, device=A.device)
        A_back = I - dt[..., None] / 2 * A  # (H, N, N)
        dA = torch.linalg.solve(A_back, I + dt[..., None] / 2 * A)  # (H, N, N)
        dB = torch.linalg.solve(A_back, (dt * B).unsqueeze(-1)).squeeze(-1)  # (H, N)
        return dA, dB

    @torch.no_grad()
    def discrete_dense(self) -> tuple[Tensor, Tensor]:
        return self.discretize(torch.complex128)

    @torch.no_grad()
    def extend(self, L: int) -> None:
        """Nothing to do: this kernel keeps the raw C and computes K directly."""

    # -- convolution mode ------------------------------------------------------------------------

    def forward(self, L: int) -> Tensor:
        """Convolution kernel K: (channels, H, L), K[c, h, l] = C A-bar^l B-bar, exactly."""
        with torch.autocast(self.C.device.type, enabled=False):
            dA, dB = self.discretize(torch.complex128)  # (H, N, N), (H, N)
            C = _conj_ext(_c(self.C.double()))  # (c, H, N)
            K = power_kernel(C, dA, dB, L)  # (c, H, L)
        return K.to(self.C.dtype)


def power_kernel(C: Tensor, dA: Tensor, dB: Tensor, L: int) -> Tensor:
    """K[c, h, l] = Re(C A^l B), l < L, by baby-step giant-step; C (c, H, N), A (H, N, N), B (H, N).

    K[jT + i] = (C A^{jT}) (A^i B), T the power of two >= sqrt(L), both factors built by doubling:
    O(H N L + H N^2 sqrt(L) + H N^3 log L) complex128 work in O(log L) batched products."""
    T = 1 << max(0, math.ceil(math.log2(max(L, 1)) / 2))  # T^2 >= L
    J = -(-L // T)
    AB, M = dB.unsqueeze(-1), dA  # (H, N, 1): A^i B by doubling; M = A^{width}
    while AB.shape[-1] < T:
        AB = torch.cat([AB, M @ AB], dim=-1)  # (H, N, 2 width)
        M = M @ M
    CA = C.unsqueeze(-2)  # (c, H, 1, N): C A^{jT} by doubling, M = A^{T width}
    while CA.shape[-2] < J:
        CA = torch.cat([CA, CA @ M], dim=-2)  # (c, H, 2 width, N)
        if CA.shape[-2] < J:
            M = M @ M
    K = (CA[..., :J, :] @ AB).real  # (c, H, J, T), lag jT + i
    return K.flatten(-2)[..., :L]


def with_ssm(layer: S4Block, ssm: str) -> S4Block:
    """`layer` with its SSM in parametrisation `ssm`: 'stable' (ours, unchanged) or 'unconstrained'."""
    if ssm not in SSM_KINDS:
        raise UserError(f"model.ssm: {ssm!r} is not one of {', '.join(SSM_KINDS)}")
    if ssm == "unconstrained":
        layer.kernel = UnconstrainedS4Kernel.from_kernel(layer.kernel)
    return layer


def spectral_radius(model: nn.Module) -> float:
    """Largest |eigenvalue| of A-bar over every S4 layer and channel of `model` (float64)."""
    radius = 0.0
    for m in model.modules():
        if isinstance(m, S4Kernel):
            dA, _ = m.discrete_dense()  # (H, N, N)
            radius = max(radius, float(torch.linalg.eigvals(dA).abs().max()))
    return radius
