"""`sashimi import-checkpoint`: convert a released official checkpoint to ours.

Kinds (`--model`, else detected from the keys): sashimi, wavenet, samplernn (state-spaces/s4:
a Lightning `.ckpt` with its `hyper_parameters`, or a `.pt` state dict); diffwave
(albertfgu/diffwave-sashimi `<iter>.pkl`, WaveNet or SaShiMi backbone); classifier (the
released SC09 `resnext.pth`, see `released_classifier`). Files are read by
`safe_load.load_foreign`, so nothing in a file runs. The model size comes from the tensor
shapes, the rest from the hyper-parameters or a params.yaml run (`official_baselines`). The
output is a checkpoint in the trainer's format (the classifier's: what
`classifier.load_classifier` reads). Every key must be consumed: a key left over, or a
parameter of our model left unset, is an error naming the keys.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sashimi.errors import UserError
from sashimi.released_classifier import is_released_classifier, released_state_dict
from sashimi.safe_load import load_foreign, to_plain

MODEL_NAME = "sashimi"
CLASSIFIER_NAME = "resnext"  # sashimi.classifier.MODEL_NAME
# --model NAME -> (our model name, run kind)
KINDS: dict[str, tuple[str, str]] = {
    "sashimi": (MODEL_NAME, "ar"),
    "wavenet": ("wavenet", "ar"),
    "samplernn": ("samplernn", "ar"),
    "diffwave": ("diffwave", "diffusion"),
    "classifier": (CLASSIFIER_NAME, "classifier"),
}
_SIGNS: list[tuple[str, tuple[str, ...]]] = [  # (kind, key prefixes that identify it)
    ("samplernn", ("model.frame_level_rnns.",)),
    ("wavenet", ("model.start_conv.", "model.filter_convs.")),
    ("sashimi", ("model.c_layers.", "model.d_layers.", "model.u_layers.")),
    ("diffwave", ("init_conv.", "residual_layer.")),
    ("classifier", ("conv_1_3x3.",)),
]

# residual-block sub-keys that are not S4 (relative to `<block>.`)
_BLOCK_RULES: list[tuple[str, str]] = [
    (r"norm\.norm\.(m|s)", r"norm.\1"),  # v4 / v2 Normalization wrapper around TransposedLN
    (r"norm\.(m|s)", r"norm.\1"),
    (r"layer\.ff\.0\.0\.(weight|bias)", r"layer.linear1.\1"),  # Linear(H, ff H) -> GELU
    (r"layer\.ff\.2\.(weight|bias)", r"layer.linear2.\1"),  # Linear(ff H, H)
]


def _s4_key(rest: str, value: Tensor) -> tuple[str, Tensor] | None:
    """Official S4 sub-key (relative to the residual block's `layer.`) -> ours (relative to
    the S4Block), converting v2/v3 kernel parameters. None if `rest` is not an S4 key."""
    m = re.fullmatch(r"(?:layer\.)?D", rest)
    if m:
        return "D", value
    m = re.fullmatch(r"output_linear(?:\.0)?\.(weight|bias)", rest)
    if m:
        return f"output_linear.{m[1]}", _squeeze_conv(value)
    m = re.fullmatch(r"layer\.kernel\.(inv_dt|A_real|A_imag|B|P|C|l_kernel)", rest)  # v4
    if m:
        return f"kernel.{m[1]}", value
    m = re.fullmatch(r"kernel\.kernel\.(\w+)", rest)  # v2 / v3
    if m:
        name = m[1]
        if (
            name == "log_dt"
        ):  # (H,) with dt = exp(log_dt) -> inv_dt (H, 1) with dt = softplus(inv_dt)
            dt = value.double().exp()
            inv_dt = dt + torch.log(-torch.expm1(-dt))  # log(exp(dt) - 1), stable for small dt
            return "kernel.inv_dt", inv_dt.to(value.dtype).reshape(-1, 1)
        if name in ("inv_w_real", "log_w_real"):  # Re Lambda = -exp(.) in both layouts
            return "kernel.A_real", value
        if name == "w_imag":  # v2/v3 store Im Lambda, v4 stores -Im Lambda
            return "kernel.A_imag", -value
        if name in ("B", "P", "C"):
            return f"kernel.{name}", value
        if name == "L":
            return "kernel.l_kernel", value
    return None


def _squeeze_conv(v: Tensor) -> Tensor:
    """(d_out, d_in, 1) conv weight or (d_out, 1, 1) weight_g -> linear layout."""
    return v.squeeze(-1) if v.dim() == 3 and v.shape[-1] == 1 else v


def _unwrap(obj: Any, src: str) -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # Lightning .ckpt
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise UserError(
            f"{src}: not a state dict (expected a mapping of parameter names to tensors)"
        )
    out = {}
    for k, v in obj.items():
        if not torch.is_tensor(v):
            raise UserError(f"{src}: key {k!r} is not a tensor")
        out[k.removeprefix("_orig_mod.")] = v
    return out


def convert_state_dict(
    sd: Mapping[str, Tensor], src: str = "state dict"
) -> tuple[dict[str, Tensor], dict]:
    """Official SaShiMi state dict -> (our state dict, SaShiMi constructor kwargs).

    Layouts: v4 (`model.*`, `encoder.0.weight`, `decoder.0.output_transform.*`, S4 under
    `layer.layer.`) and v2 / v3 (`encoder.weight`, `decoder.output_transform.*`, S4
    `layer.kernel.kernel.{log_dt, inv_w_real | log_w_real, w_imag, B, P, C, L}`, converted as
    in `s4.convert_v3_kernel_state`). Conv-style weights with a trailing kernel dim of 1 and
    (d_out, 1) biases (v2 TransposedLinear) are squeezed.
    """
    sd = _unwrap(sd, src)
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for k, v in sd.items():
        if k.endswith(".bias") and v.dim() == 2 and v.shape[1] == 1:
            v = v.reshape(-1)  # v2 TransposedLinear bias (d_out, 1)
        new = _convert_key(k, v)
        if new is None:
            unknown.append(k)
            continue
        nk, nv = new
        if nk in out:
            raise UserError(f"{src}: two keys map to {nk!r} (one of them is {k!r})")
        out[nk] = nv
    if unknown:
        raise UserError(f"{src}: unexpected keys for a SaShiMi checkpoint: {_short(unknown)}")
    kwargs = infer_kwargs(out, src)
    return out, kwargs


def _convert_key(k: str, v: Tensor) -> tuple[str, Tensor] | None:
    if k in ("encoder.0.weight", "encoder.weight"):
        return "embedding.weight", v
    m = re.fullmatch(r"decoder\.(?:0\.)?output_transform\.(weight|bias)", k)
    if m:
        return f"output.{m[1]}", v
    if not k.startswith("model."):
        return None
    k = k[len("model.") :]
    m = re.fullmatch(r"norm\.(weight|bias)", k)
    if m:
        return k, v
    # pools: d_layers.i.linear.* (unet: d_layers also holds blocks) / u_layers.j.0.linear.*
    m = re.fullmatch(
        r"((?:d_layers\.\d+)|(?:u_layers\.\d+\.0))\.linear\.(?:conv\.)?(weight_g|weight_v|bias)", k
    )
    if m:
        return f"{m[1]}.linear.{m[2]}", _squeeze_conv(v)
    m = re.fullmatch(r"((?:c_layers\.\d+)|(?:u_layers\.\d+\.\d+)|(?:d_layers\.\d+))\.(.+)", k)
    if not m:
        return None
    block, rest = m[1], m[2]
    for pat, rep in _BLOCK_RULES:
        if re.fullmatch(pat, rest):
            return f"{block}.{re.sub(pat, rep, rest)}", v
    if rest.startswith("layer."):
        s4 = _s4_key(rest[len("layer.") :], v)
        if s4 is not None:
            return f"{block}.layer.{s4[0]}", s4[1]
    return None


def _short(keys: list[str], n: int = 6) -> str:
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def infer_kwargs(sd: Mapping[str, Tensor], src: str = "state dict") -> dict:
    """SaShiMi constructor kwargs from the shapes of our (converted) state dict."""
    try:
        n_classes, H = sd["embedding.weight"].shape
        pools, expand = [], None
        i = 0
        while f"d_layers.{i}.linear.weight_v" in sd or any(
            k.startswith(f"d_layers.{i}.") for k in sd
        ):
            if f"d_layers.{i}.linear.weight_v" in sd:
                d_out, d_in = sd[f"d_layers.{i}.linear.weight_v"].shape
                h = H * (expand or 1) ** len(pools)
                if expand is None:
                    expand = d_out // H
                pools.append(d_in // h)
            i += 1
        unet = i > len(pools)
        n_blocks = len({int(k.split(".")[1]) for k in sd if k.startswith("c_layers.")})
        ff_keys = [k for k in sd if k.startswith("c_layers.") and ".layer.linear1.weight" in k]
        ff = sd[ff_keys[0]].shape[0] // (H * expand ** len(pools)) if ff_keys else 0
        n_layers = n_blocks // 2 if ff_keys else n_blocks
        Hc = H * expand ** len(pools)
        s4 = "c_layers.0.layer."
        glu = sd[s4 + "output_linear.weight"].shape[0] == 2 * Hc
        n_ssm, n2 = sd[s4 + "kernel.A_real"].shape
        channels = sd[s4 + "kernel.C"].shape[0]
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise UserError(
            f"{src}: cannot infer the SaShiMi size from the shapes (missing/odd key {e})"
        ) from None
    kwargs = dict(
        d_model=int(H), n_layers=int(n_layers), pool=[int(p) for p in pools], expand=int(expand),
        ff=int(ff), glu=bool(glu), d_state=int(2 * n2), bidirectional=channels == 2, unet=bool(unet),
        n_classes=int(n_classes),
    )  # fmt: skip
    if n_ssm != 1:
        kwargs["n_ssm"] = int(n_ssm)
    return kwargs


def _model_class(name: str) -> type:
    if name == CLASSIFIER_NAME:
        from sashimi.classifier import DigitClassifier

        return DigitClassifier
    from sashimi.models import MODELS

    return MODELS[name]


def load_into_model(
    our_sd: Mapping[str, Tensor], kwargs: dict, src: str = "state dict", name: str = MODEL_NAME
):
    """Build model `name` (default SaShiMi) with `kwargs` and load `our_sd` strictly (the error
    names missing / unexpected keys). The classifier's front-end buffers are its own."""
    model = _model_class(name)(**kwargs)
    own = model.state_dict()
    if name == CLASSIFIER_NAME:
        our_sd = {k: v for k, v in own.items() if k.startswith("frontend.")} | dict(our_sd)
    missing = [k for k in own if k not in our_sd]
    unexpected = [k for k in our_sd if k not in own]
    label = f"{type(model).__name__}({_fmt(kwargs)})"
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        raise UserError(f"{src}: does not fit {label}: {'; '.join(parts)}")
    for k, v in our_sd.items():
        if own[k].shape != v.shape:
            raise UserError(
                f"{src}: {k}: shape {tuple(v.shape)} does not fit {tuple(own[k].shape)}"
            )
    model.load_state_dict(our_sd, strict=True)
    return model


def _fmt(kwargs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items())


# ---------------------------------------------------------------------------- reading


def read_source(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """(official state dict, plain hyper-parameters) of an official file. Read through
    `safe_load.load_foreign`: weights_only plus inert stand-ins, nothing in it runs."""
    path = Path(path)
    obj = load_foreign(path)
    if is_released_classifier(obj):
        return released_state_dict(obj, str(path)), {}
    hp: Any = {}
    if isinstance(obj, Mapping):
        hp = to_plain(obj.get("hyper_parameters")) or {}
        if isinstance(obj.get("model_state_dict"), Mapping):  # diffwave-sashimi `<iter>.pkl`
            obj = obj["model_state_dict"]
    return _unwrap(obj, str(path)), hp if isinstance(hp, dict) else {}


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The official state dict of a file (see `read_source`)."""
    return read_source(path)[0]


def detect_kind(sd: Mapping[str, Tensor], src: str = "state dict") -> str:
    """Which official model a state dict holds, from its keys."""
    for kind, prefixes in _SIGNS:
        if any(k.startswith(prefixes) for k in sd):
            return kind
    raise UserError(
        f"{src}: cannot tell the model from its keys ({_short(list(sd), 4)}); give --model NAME"
    )


def convert(
    kind: str, sd: Mapping[str, Tensor], hints: Mapping, src: str = "state dict"
) -> tuple[dict[str, Tensor], dict]:
    """Official state dict of `kind` -> (our state dict, our constructor kwargs)."""
    from sashimi import official_baselines, released_classifier

    if kind == "sashimi":
        return convert_state_dict(sd, src)
    if kind == "classifier":
        return released_classifier.convert_state_dict(sd, src)
    if kind in ("wavenet", "samplernn", "diffwave"):
        return getattr(official_baselines, kind)(sd, hints, src)
    raise UserError(f"--model {kind!r}: not one of {', '.join(KINDS)}")


# ---------------------------------------------------------------------------- CLI


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", required=True,
                   help="official checkpoint (Lightning .ckpt, .pt state dict, diffwave-sashimi "
                   ".pkl, or the released resnext.pth)")  # fmt: skip
    p.add_argument("--model", choices=list(KINDS),
                   help="what the file holds (default: detected from its keys)")  # fmt: skip
    p.add_argument("--out", help="output checkpoint (default with --config-from-run: "
                   "results/runs/RUN/checkpoints/imported.pt)")  # fmt: skip
    p.add_argument("--config-from-run", metavar="RUN",
                   help="take model kwargs and config from this run of params.yaml (checked against the shapes)")  # fmt: skip
    p.add_argument(
        "--dropout", type=float, help="model dropout (not stored in the weights; default 0)"
    )
    p.add_argument("--backend", help="S4 kernel backend for the built model (default auto)")


def _from_run(run_cfg, name: str, kwargs: dict, src: Path) -> tuple[dict, dict, Path]:
    """(kwargs completed from the run's model block, the run's config, its imported.pt), after
    checking every shape-determining kwarg against the run."""
    import inspect

    if run_cfg.model_name != name:
        raise UserError(f"runs.{run_cfg.key}: model {run_cfg.model_name!r} is not {name!r}")
    for k, v in kwargs.items():
        have = run_cfg.model.get(k)
        if have is not None and _norm(have) != _norm(v):
            raise UserError(
                f"runs.{run_cfg.key}.model.{k}: {have!r} does not match the checkpoint ({v!r})"
            )
    accepted = inspect.signature(_model_class(name)).parameters
    extra = {k: v for k, v in run_cfg.model.items() if k not in kwargs and k in accepted}
    config = dict(run_cfg.raw, imported_from=str(src))
    return kwargs | extra, config, run_cfg.run_dir / "checkpoints" / "imported.pt"


def run(args: argparse.Namespace) -> int:
    src = Path(args.src)
    sd, hp = read_source(src)
    kind = getattr(args, "model", None) or detect_kind(sd, str(src))
    name, run_kind = KINDS[kind]
    hints = dict(hp["model"]) if isinstance(hp.get("model"), dict) else {}
    run_cfg = None
    if args.config_from_run:
        from sashimi.config import load_params

        run_cfg = load_params(args.params).run(args.config_from_run)
        hints |= dict(run_cfg.model)
    our_sd, kwargs = convert(kind, sd, hints, str(src))
    config: dict = {
        "model": dict(name=name, **kwargs),
        "kind": run_kind,
        "imported_from": str(src),
    }
    out = args.out
    if run_cfg is not None:
        kwargs, config, default_out = _from_run(run_cfg, name, kwargs, src)
        out = out or default_out
    if out is None:
        raise UserError("import-checkpoint: give --out FILE or --config-from-run RUN")
    for flag in ("dropout", "backend"):
        if getattr(args, flag, None) is not None:
            if name != MODEL_NAME and kwargs.get("backbone") != "sashimi":
                raise UserError(f"--{flag}: only for SaShiMi models, not {kind}")
            kwargs[flag] = getattr(args, flag)
    model = load_into_model(our_sd, kwargs, str(src), name)
    _write(out, model, name, kwargs, run_kind, config)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"imported {src} -> {out}: {type(model).__name__}({_fmt(kwargs)}), {n_params:,} parameters"
    )
    return 0


def _write(out, model, name: str, kwargs: dict, run_kind: str, config: dict) -> None:
    """Our checkpoint format (what checkpoints.load_model and classifier.load_classifier read)."""
    from sashimi.io import atomic_write

    ckpt = {
        "model": model.state_dict(),
        "model_name": name,
        "model_kwargs": kwargs,
        "kind": run_kind,
        "step": 0,
        "epoch": 0,
        "best_val": math.inf,
        "config": config,
    }
    with atomic_write(out, "wb") as f:
        torch.save(ckpt, f)


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v
