"""Official albertfgu/diffwave-sashimi `WaveNet` / `Sashimi` state dicts -> our `DiffWave`.

Renaming only, plus 1x1-conv weights (out, in, 1) becoming linear weights (out, in) and the
"S4 v3" layers converted by `sashimi.ssm.s4.convert_v3_s4_state`.
"""

from __future__ import annotations

from torch import Tensor

from sashimi.errors import UserError
from sashimi.ssm.s4 import convert_v3_s4_state

_WAVENET_RULES = [  # (official prefix, our prefix), first match wins
    ("init_conv.0.conv.", "backbone.input_conv."),
    ("residual_layer.fc_t1.", "backbone.embed.fc1."),
    ("residual_layer.fc_t2.", "backbone.embed.fc2."),
    ("final_conv.0.conv.", "backbone.skip_proj."),
    ("final_conv.2.conv.", "backbone.output_conv."),
]
_WAVENET_LAYER_RULES = [
    ("fc_t.", "step_proj."),
    ("dilated_conv_layer.conv.", "dilated_conv."),
    ("res_conv.", "res_conv."),
    ("skip_conv.", "skip_conv."),
]


def _convert_wavenet(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        for a, b in _WAVENET_RULES:
            if k.startswith(a):
                out[b + k[len(a) :]] = v
                break
        else:
            head = "residual_layer.residual_blocks."
            if not k.startswith(head):
                raise UserError(f"official DiffWave WaveNet state_dict: unexpected key {k!r}")
            i, rest = k[len(head) :].split(".", 1)
            for a, b in _WAVENET_LAYER_RULES:
                if rest.startswith(a):
                    out[f"backbone.layers.{i}.{b}{rest[len(a) :]}"] = v
                    break
            else:
                raise UserError(f"official DiffWave WaveNet state_dict: unexpected key {k!r}")
    return out


def _squeeze_conv(k: str, v: Tensor) -> Tensor:
    """1x1 Conv1d weights (out, in, 1) / weight_g (out, 1, 1) -> Linear shapes (out, in) / (out, 1)."""
    return v[..., 0] if k.endswith(("weight", "weight_g", "weight_v")) and v.dim() == 3 else v


_SASHIMI_RULES = [  # (official prefix, our prefix); values of 1x1 convs lose their last dim
    ("init_conv.0.conv.", "backbone.input_proj."),
    ("fc_t1.", "backbone.embed.fc1."),
    ("fc_t2.", "backbone.embed.fc2."),
    ("norm.", "backbone.norm."),
    ("final_conv.0.conv.", "backbone.output_hidden."),
    ("final_conv.2.conv.", "backbone.output_proj."),
]
_SASHIMI_BLOCK_RULES = [  # inside d_layers.i / c_layers.i / u_layers.i
    ("fc_t.", "step_proj."),
    ("norm1.", "norm1."),
    ("norm2.", "norm2."),
    ("ff.ff.0.conv.", "ff.linear1."),
    ("ff.ff.2.conv.", "ff.linear2."),
    ("linear.conv.", "linear."),  # DownPool / UpPool
]


def _convert_sashimi(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    s4: dict[str, dict[str, Tensor]] = {}  # block prefix -> its S4 (v3) state
    for k, v in sd.items():
        for a, b in _SASHIMI_RULES:
            if k.startswith(a):
                out[b + k[len(a) :]] = _squeeze_conv(k, v)
                break
        else:
            parts = k.split(".", 2)
            if len(parts) < 3 or parts[0] not in ("d_layers", "c_layers", "u_layers"):
                raise UserError(f"official DiffWave SaShiMi state_dict: unexpected key {k!r}")
            block, rest = f"backbone.{parts[0]}.{parts[1]}.", parts[2]
            if rest.startswith("layer."):
                s4.setdefault(block, {})[rest[len("layer.") :]] = v
                continue
            for a, b in _SASHIMI_BLOCK_RULES:
                if rest.startswith(a):
                    out[block + b + rest[len(a) :]] = _squeeze_conv(k, v)
                    break
            else:
                raise UserError(f"official DiffWave SaShiMi state_dict: unexpected key {k!r}")
    for block, state in s4.items():  # S4 v3: log_dt, inv_w_real, w_imag, kernel.kernel.L, ...
        out.update({f"{block}layer.{k}": v for k, v in convert_v3_s4_state(state).items()})
    return out


def convert_official_state_dict(sd: dict[str, Tensor], backbone: str) -> dict[str, Tensor]:
    """Map an albertfgu/diffwave-sashimi `WaveNet` / `Sashimi` state_dict onto `DiffWave(backbone=...)`.

    WaveNet: init_conv.0.conv -> input_conv; residual_layer.fc_t1/2 -> embed.fc1/2;
    residual_layer.residual_blocks.i.{fc_t, dilated_conv_layer.conv, res_conv, skip_conv} ->
    layers.i.{step_proj, dilated_conv, res_conv, skip_conv}; final_conv.0.conv -> skip_proj;
    final_conv.2.conv -> output_conv (all under `backbone.`).
    SaShiMi: init_conv.0.conv -> input_proj; fc_t1/2 -> embed.fc1/2; {d,c,u}_layers.i.{fc_t,
    norm1, norm2, ff.ff.0.conv, ff.ff.2.conv, linear.conv} -> {step_proj, norm1, norm2,
    ff.linear1, ff.linear2, linear}; {d,c,u}_layers.i.layer.* (S4 v3) -> layer.* via
    `convert_v3_s4_state`; norm -> norm; final_conv.0.conv -> output_hidden; final_conv.2.conv ->
    output_proj. 1x1-conv weights (out, in, 1) become linear weights (out, in).
    """
    if backbone == "wavenet":
        return _convert_wavenet(sd)
    if backbone == "sashimi":
        return _convert_sashimi(sd)
    raise UserError(f"backbone: {backbone!r} is not one of 'wavenet', 'sashimi'")
