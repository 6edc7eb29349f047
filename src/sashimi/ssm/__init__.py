"""State-space layers: the S4 block (``s4``) and its Cauchy-kernel backends (``kernels``)."""

from sashimi.ssm.s4 import (
    S4Block,
    S4Kernel,
    convert_v3_kernel_state,
    convert_v3_s4_state,
    official_s4_key,
)

__all__ = [
    "S4Block",
    "S4Kernel",
    "convert_v3_kernel_state",
    "convert_v3_s4_state",
    "official_s4_key",
]
