"""`sashimi bench cauchy`: one S4 kernel per Cauchy backend (pure torch, pykeops), timed in
turns in one process on the same inputs."""

from __future__ import annotations

import statistics
import time

import torch

from sashimi.ssm.keops import unavailable_reason
from sashimi.ssm.kernels import dplr_kernel


def _random_dplr(H: int, N: int, L: int, dtype: torch.dtype, device: torch.device):
    """Inputs of ``dplr_kernel`` with Re(dt Lambda) < 0, as an S4D-Lin-like initialisation."""
    N2 = N // 2
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    dt = torch.full((H,), 1e-2, dtype=dtype, device=device)
    lam = torch.complex(
        -0.5 * torch.ones(H, N2), torch.pi * torch.arange(N2, dtype=torch.float32).expand(H, N2)
    )
    dtA = (lam * 1e-2).to(device=device, dtype=cdtype)  # (H, N2)
    B, P, C = (
        torch.randn(*shape, dtype=cdtype, device=device) for shape in ((H, N2),) * 2 + ((1, H, N2),)
    )
    return dtA, B, P, C, dt


def bench_cauchy(
    H: int = 64,
    L: int = 16000,
    N: int = 64,
    backends: tuple[str, ...] = ("torch", "keops"),
    repeats: int = 3,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Median seconds of one S4 kernel (``dplr_kernel``) forward and forward+backward per backend.

    Every backend gets the same inputs in the same process, after one untimed warm-up call (which
    includes KeOps' compilation, or torch.compile where enabled); the timed calls alternate
    between the backends. Returns
    {"H", "L", "N", "device", "threads", <backend>: {"forward_s", "forward_backward_s"}, ...,
    "keops_over_torch": forward_backward ratio when both ran}.
    """
    dev = torch.device(device)
    leaves = [x.requires_grad_() for x in _random_dplr(H, N, L, dtype, dev)]
    weight = torch.randn(1, H, L, dtype=dtype, device=dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def once(fn) -> float:
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    fns = {}
    for backend in backends:

        def fwd(backend=backend) -> None:
            with torch.no_grad():
                dplr_kernel(*leaves, L=L, backend=backend)

        def fwd_bwd(backend=backend) -> None:
            loss = (dplr_kernel(*leaves, L=L, backend=backend) * weight).sum()
            torch.autograd.grad(loss, leaves)

        fns[backend] = {"forward_s": fwd, "forward_backward_s": fwd_bwd}
        for fn in fns[backend].values():
            fn()  # warm-up (compilation)
    # the backends take turns, so a change in the machine's load hits them alike
    times = {b: {k: [] for k in fns[b]} for b in backends}
    for _ in range(repeats):
        for backend in backends:
            for what, fn in fns[backend].items():
                times[backend][what].append(once(fn))
    out: dict = {"H": H, "L": L, "N": N, "device": str(dev), "threads": torch.get_num_threads()}
    for backend in backends:
        out[backend] = {what: statistics.median(t) for what, t in times[backend].items()}
    if "torch" in out and "keops" in out:
        out["keops_over_torch"] = (
            out["keops"]["forward_backward_s"] / out["torch"]["forward_backward_s"]
        )
    return out


def bench_backends(H: int, L: int, N: int, repeats: int, device: str) -> dict:
    """:func:`bench_cauchy` for `sashimi bench cauchy`: torch always, keops where it compiles
    (else the reason, under "keops")."""
    reason = unavailable_reason()
    out = bench_cauchy(H, L, N, ("torch",) if reason else ("torch", "keops"), repeats, device)
    if reason:
        out["keops"] = {"unavailable": reason}
    return out
