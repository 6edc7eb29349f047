"""Official baseline state dicts -> (our state dict, our constructor kwargs).

WaveNet and SampleRNN come from state-spaces/s4 (Lightning `state_dict`, keys `model.*`),
DiffWave from albertfgu/diffwave-sashimi (`model_state_dict`). Keys are renamed by each
model's own converter; the sizes are read from the tensor shapes. What the shapes cannot
tell comes from `hints` (the checkpoint's hyper-parameters, or a params.yaml run):
- WaveNet `layers` / `blocks` (dilation cycle): else the paper's 10 layers per block when the
  layer count is a multiple of 10;
- SampleRNN `quantization` (default mu-law);
- DiffWave `dilation_cycle` (WaveNet backbone): else the paper's 12 for 36 layers, 10 for 30;
  the diffusion schedule `T`, `beta_start`, `beta_end` (default the paper's 200, 1e-4, 0.02).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from sashimi.errors import UserError

_PAPER_DILATION_CYCLE = {36: 12, 30: 10}  # diffwave-sashimi configs/model/wavenet{,_small}.yaml


def _count(sd: Mapping[str, Tensor], prefix: str) -> int:
    """Number of distinct indices i among keys `<prefix>i.*`."""
    return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})


def _shape_error(src: str, model: str, e: Exception) -> UserError:
    return UserError(f"{src}: cannot infer the {model} size from the shapes (missing key {e})")


def wavenet(sd: Mapping[str, Tensor], hints: Mapping, src: str) -> tuple[dict, dict]:
    """state-spaces/s4 WaveNetModel -> (WaveNet state dict, WaveNet kwargs)."""
    from sashimi.models.wavenet import from_official_state_dict

    our = from_official_state_dict(dict(sd))
    try:
        n = _count(our, "filter_convs.")
        kw = dict(
            residual_channels=our["start_conv.weight"].shape[0],
            dilation_channels=our["filter_convs.0.weight"].shape[0],
            skip_channels=our["skip_convs.0.weight"].shape[0],
            end_channels=our["end_conv_1.weight"].shape[0],
            kernel_size=our["filter_convs.0.weight"].shape[2],
            classes=our["end_conv_2.weight"].shape[0],
            bias="start_conv.bias" in our,
        )
    except (KeyError, IndexError) as e:
        raise _shape_error(src, "WaveNet", e) from None
    layers, blocks = hints.get("layers"), hints.get("blocks")
    if layers is None and n % 10 == 0:
        layers = 10  # the paper's (and the official default) dilation cycle
    if layers is None:
        raise UserError(
            f"{src}: {n} WaveNet layers, but the layers per block (dilation cycle) is not in the "
            "weights: give a checkpoint with hyper_parameters or --config-from-run RUN"
        )
    if int(layers) * int(blocks or n // int(layers)) != n:
        raise UserError(
            f"{src}: layers={layers}, blocks={blocks} do not give the {n} layers in the weights"
        )
    kw = {k: (v if isinstance(v, bool) else int(v)) for k, v in kw.items()}
    return our, dict(kw, layers=int(layers), blocks=n // int(layers))


def samplernn(sd: Mapping[str, Tensor], hints: Mapping, src: str) -> tuple[dict, dict]:
    """state-spaces/s4 SampleRNN -> (SampleRNN state dict, SampleRNN kwargs)."""
    from sashimi.models.samplernn import from_official_state_dict

    our = from_official_state_dict(dict(sd))
    try:
        tiers = _count(our, "frame_level_rnns.")
        frame_sizes = [
            int(our[f"frame_level_rnns.{i}.upsampling.bias"].shape[1]) for i in range(tiers)
        ]
        kw = dict(
            frame_sizes=frame_sizes,
            n_rnn=sum(k.startswith("frame_level_rnns.0.rnn.weight_ih_l") for k in our),
            d_hidden=int(our["frame_level_rnns.0.rnn.weight_hh_l0"].shape[1]),
            d_model=int(our["sample_level_mlp.embedding.weight"].shape[1]),
            learn_h0="frame_level_rnns.0.rnn.h0" in our,
            weight_norm="sample_level_mlp.hidden.weight_g" in our,
            quantization=str(hints.get("quantization", "mu-law")),
        )
    except (KeyError, IndexError) as e:
        raise _shape_error(src, "SampleRNN", e) from None
    if tiers == 0:
        raise UserError(f"{src}: no frame_level_rnns keys: not a SampleRNN checkpoint")
    return our, kw


def diffwave(sd: Mapping[str, Tensor], hints: Mapping, src: str) -> tuple[dict, dict]:
    """albertfgu/diffwave-sashimi WaveNet / Sashimi -> (DiffWave state dict, DiffWave kwargs)."""
    from sashimi.models.diffwave import convert_official_state_dict

    backbone = "wavenet" if any(k.startswith("residual_layer.") for k in sd) else "sashimi"
    our = convert_official_state_dict(dict(sd), backbone)
    try:
        fc1, fc2 = our["backbone.embed.fc1.weight"], our["backbone.embed.fc2.weight"]
        kw = dict(
            backbone=backbone,
            diffusion_step_embed_dim_in=int(fc1.shape[1]),
            diffusion_step_embed_dim_mid=int(fc1.shape[0]),
            diffusion_step_embed_dim_out=int(fc2.shape[0]),
        )
        kw |= (_diffwave_wavenet if backbone == "wavenet" else _diffwave_sashimi)(our, hints, src)
    except (KeyError, IndexError) as e:
        raise _shape_error(src, f"DiffWave ({backbone})", e) from None
    for k in ("T", "beta_start", "beta_end"):
        if hints.get(k) is not None:
            kw[k] = hints[k]
    return our, kw


def _diffwave_wavenet(our: Mapping[str, Tensor], hints: Mapping, src: str) -> dict:
    n = _count(our, "backbone.layers.")
    cycle = hints.get("dilation_cycle", _PAPER_DILATION_CYCLE.get(n))
    if cycle is None:
        raise UserError(
            f"{src}: {n} DiffWave WaveNet layers, but the dilation cycle is not in the weights "
            "(known for the paper's 36 and 30): give --config-from-run RUN"
        )
    return dict(
        res_channels=int(our["backbone.input_conv.weight_v"].shape[0]),
        skip_channels=int(our["backbone.skip_proj.weight_v"].shape[0]),
        num_res_layers=n,
        dilation_cycle=int(cycle),
    )


def _diffwave_sashimi(our: Mapping[str, Tensor], hints: Mapping, src: str) -> dict:
    H = int(our["backbone.input_proj.weight_v"].shape[0])
    d_model, pool, expand, unet = H, [], 1, False
    for i in range(_count(our, "backbone.d_layers.")):
        w = our.get(f"backbone.d_layers.{i}.linear.weight_v")  # DownPool (H e, H p)
        if w is None:
            unet = True  # a residual block on the down path
            continue
        pool.append(int(w.shape[1]) // H)
        expand = int(w.shape[0]) // H
        H = int(w.shape[0])
    c = "backbone.c_layers.0."
    ff_w = our.get(c + "ff.linear1.weight_v")
    return dict(
        d_model=d_model,
        n_layers=_count(our, "backbone.c_layers."),
        pool=pool,
        expand=expand,
        ff=int(ff_w.shape[0]) // H if ff_w is not None else 0,
        bidirectional=our[c + "layer.kernel.C"].shape[0] == 2,
        unet=unet,
        glu=our[c + "layer.output_linear.weight"].shape[0] == 2 * H,
        d_state=2 * int(our[c + "layer.kernel.A_real"].shape[1]),
    )
