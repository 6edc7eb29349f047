"""The skip layout of the SaShiMi U-Net, shared by SaShiMi and DiffWave's SaShiMi backbone.

skips: the input, then every down-path output (blocks and DownPools)
centre: blocks, plus a skip around them
per up level (innermost first): UpPool + the matching down output, then
  unet=True:  every block adds the mirrored down-path output
  unet=False: the blocks, plus a skip around them from right after the UpPool
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn


def unet_backbone(
    x: Tensor,
    down: Sequence[nn.Module],
    center: Sequence[nn.Module],
    up: Sequence[tuple[nn.Module, Sequence[nn.Module]]],
    unet: bool,
    call: Callable[[nn.Module, Tensor], Tensor],
) -> Tensor:
    """(B, L, H) -> (B, L, H). `up` holds (UpPool, blocks) per level, innermost first;
    `call(layer, x)` runs one down / centre / up layer (pools are called as `layer(x)`)."""
    skips = [x]
    for layer in down:
        x = call(layer, x)
        skips.append(x)
    for layer in center:
        x = call(layer, x)
    x = x + skips.pop()  # skip around the centre
    for pool, blocks in up:
        x = pool(x) + skips.pop()  # plus the input of the matching down stage
        if unet:  # every block consumes the mirrored down output
            for layer in blocks:
                x = call(layer, x) + skips.pop()
        else:
            s = x
            for layer in blocks:
                x = call(layer, x)
            x = x + s  # skip around the up stage, from right after its UpPool
    return x
