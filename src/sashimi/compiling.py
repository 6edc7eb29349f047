"""The run's one compile setting (`runs.<key>.compile`), applied to training and sampling.

- `never`: nothing is compiled.
- `auto` (default): the S4 layers' compiled paths on CUDA for large problems only
  (:func:`sashimi.ssm.kernels.compile_enabled`); SaShiMi's recurrent step compiled when
  sampling on CUDA. No whole-model torch.compile: it was slower than the S4 paths
  (docs/performance.md).
- `always`: compiled on any device: the S4 paths, SaShiMi's step, and, for a model with no
  compiled path of its own (WaveNet, SampleRNN, DiffWave-WaveNet), the whole model in training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sashimi.errors import UserError

if TYPE_CHECKING:  # torch is imported by the callers; config.py reads this module without it
    import torch
    from torch import nn

MODES = ("auto", "always", "never")
RETIRED_KEYS = ("compile", "s4_compile")  # train.compile, train.s4_compile, sample.compile


def check(mode: str, where: str = "compile") -> str:
    """`mode` if it is one of MODES, else a one-line UserError naming the value."""
    if mode not in MODES:
        raise UserError(f"{where}: {mode!r} is not one of auto, always, never")
    return mode


def has_own_paths(model: nn.Module) -> bool:
    """Whether some layer of `model` offers its own compiled path (a `compile_mode` attribute)."""
    return any(hasattr(m, "compile_mode") for m in model.modules())


def apply_to_model(model: nn.Module, mode: str) -> None:
    """Give every layer with a compiled path (S4Kernel, S4Block, ChannelNorm) the run's mode."""
    from sashimi.ssm.kernels import set_compile_mode

    set_compile_mode(model, check(mode))


def compile_whole(model: nn.Module, mode: str) -> bool:
    """Whether training wraps the whole model (or its loss) in torch.compile: only `always`,
    and only for a model whose layers have no compiled path of their own."""
    return check(mode) == "always" and not has_own_paths(model)


def compile_step(mode: str, device: torch.device | str) -> bool:
    """Whether sampling asks for SaShiMi's compiled recurrent step on `device`."""
    if check(mode) == "auto":
        return str(getattr(device, "type", device)).split(":")[0] == "cuda"
    return mode == "always"
