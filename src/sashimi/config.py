"""params.yaml -> typed, frozen configuration. The only reader of params.yaml.

Layout of params.yaml (see the file itself for every number):

    scale: demo                 # the one switch: demo | paper
    seed: 0
    train_defaults: {...}       # merged under every run's `train`
    sample_defaults: {...}      # merged under every run's `sample`
    datasets: {KEY: {...}}      # what to download and how to prepare it
    runs: {KEY: {...}}          # one training run each: model, data, optimisation

A mapping's `demo:` / `paper:` block is deep-merged over it at that scale (the other dropped),
so a run is written once at paper scale with a short `demo:` block for the CPU demo. Errors
are one line naming the key path: `params.yaml: runs.R.train.lr: 'fast' is not of type 'number'`.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sashimi import compiling
from sashimi.errors import UserError

SCALES = ("demo", "paper")
SCHEMA_PATH = Path(__file__).with_name("params.schema.yaml")  # package data: works installed


@dataclass(frozen=True)
class DatasetConfig:
    key: str
    format: str  # how `sashimi prepare` reads it: sc09 | beethoven | youtubemix | fsdd | folder | synth-*
    quantization: str  # mu-law | linear
    download: str | None = None  # what `sashimi download` fetches (None: generated or local)
    sample_rate: int = 16000
    chunk_length: int | None = None  # None: whole clips (SC09); else fixed chunks (music)
    clip_length: int | None = None  # pad/trim length for diffusion and the classifier (SC09: 16000)
    source_dir: str | None = None  # override the raw folder (e.g. your own audio for `folder`)
    options: dict = field(default_factory=dict)  # format-specific extras (e.g. synthetic n_clips)

    @property
    def raw_dir(self) -> Path:
        if self.source_dir:
            return Path(self.source_dir)
        return Path("data/raw") / (self.download or self.key)

    @property
    def prepared_dir(self) -> Path:
        return Path("data/prepared") / self.key


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32
    optimizer: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3
    ssm_lr: float = 1e-3  # S4 parameters (Lambda, P, B, dt): own lr, no weight decay
    weight_decay: float = 0.0  # the official AdamW recipe (params.yaml train_defaults)
    momentum: float = 0.9  # sgd only
    scheduler: str = "plateau"  # plateau | cosine | constant
    patience: int = 20  # plateau: validations without improvement
    factor: float = 0.2  # plateau / step: lr multiplier
    milestones: tuple[int, ...] = ()  # step: optimiser steps where the lr is multiplied by factor
    warmup_steps: int = 0  # cosine
    max_steps: int | None = None
    max_epochs: int | None = None  # epoch budget (counts over resumes, like max_steps)
    max_minutes: float | None = None
    val_every: int | str = 1000  # steps between validations, or "epoch": once per epoch
    val_batches: int | None = None  # None: the whole validation split
    clip_grad: float | None = None
    clip_mode: str = "norm"  # norm | value
    tbptt: int | None = None  # truncated-BPTT chunk length (SampleRNN)
    amp: bool = False  # bf16 autocast on GPU (ignored on CPU); the official runs are fp32
    keep_last: int = 2
    seed: int = 0
    num_workers: int = 2
    log_every: int = 50
    ckpt_every: int = 1000
    max_length: int | None = None  # crop training clips/chunks to this many samples (demo)
    # the digit classifier only (kind: classifier)
    augment: bool = False  # amplitude, speed/pitch, time-shift and noise augmentation
    precise_bn_batches: int = 0  # re-estimate BatchNorm statistics before each validation
    noise_dir: str | None = None  # background-noise .wav folder (None: synthetic noise)


@dataclass(frozen=True)
class SampleConfig:
    n: int = 16
    seconds: float = 1.0
    batch_size: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    sampler: str = "ancestral"  # diffusion: ancestral | fast
    fast_steps: int = 50
    seed: int | None = None  # None: the run's train.seed
    prefix_seconds: float = 1.0  # `sashimi sample --prefix`: seconds of the clip conditioned on


@dataclass(frozen=True)
class RunConfig:
    key: str
    kind: str  # ar | diffusion | classifier
    dataset: str
    model_name: str
    model: dict
    train: TrainConfig
    sample: SampleConfig
    compile: str = "auto"  # auto | always | never: the run's one compile setting (compiling.py)
    table: str | None = None  # which paper table the run belongs to
    label: str | None = None  # its row label there
    raw: dict = field(default_factory=dict)  # the resolved mapping (saved in checkpoints)

    @property
    def run_dir(self) -> Path:
        return Path("results/runs") / self.key


@dataclass(frozen=True)
class Params:
    path: Path
    scale: str
    seed: int
    datasets: dict[str, DatasetConfig]
    runs: dict[str, RunConfig]
    raw: dict

    def run(self, key: str) -> RunConfig:
        if key not in self.runs:
            raise UserError(f"{self.path}: runs.{key}: no such run (known: {', '.join(self.runs)})")
        return self.runs[key]

    def dataset(self, key: str) -> DatasetConfig:
        if key not in self.datasets:
            raise UserError(f"{self.path}: datasets.{key}: no such dataset")
        return self.datasets[key]

    def dataset_of(self, run_key: str) -> DatasetConfig:
        return self.datasets[self.run(run_key).dataset]

    def flat(self, run_key: str) -> dict[str, Any]:
        """The run's resolved config flattened to `a.b.c: scalar` (for MLflow params)."""
        run = self.run(run_key)
        out = {"scale": self.scale, "run": run.key, "dataset": run.dataset, "compile": run.compile}
        out.update(
            _flatten(
                {
                    "model": run.model,
                    "train": dataclasses.asdict(run.train),
                    "sample": dataclasses.asdict(run.sample),
                }
            )
        )
        out.update(_flatten({"data": dataclasses.asdict(self.datasets[run.dataset])}))
        return out


# ----------------------------------------------------------------------------- loading


def load_params(
    path: str | os.PathLike = "params.yaml", scale: str | None = None, check_models: bool = True
) -> Params:
    """Read, validate and resolve params.yaml. `scale` (or $SASHIMI_SCALE) overrides the file's."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{path}: file not found (run from the repository root or pass --params)"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: invalid YAML{where}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    validate_schema(raw, path)

    scale = scale or os.environ.get("SASHIMI_SCALE") or raw.get("scale", "demo")
    if scale not in SCALES:
        raise UserError(f"{path}: scale: {scale!r} is not one of {', '.join(SCALES)}")
    resolved = resolve_scale(raw, scale)

    datasets = {k: _dataset(path, k, v) for k, v in resolved.get("datasets", {}).items()}
    runs = {}
    for key, spec in resolved.get("runs", {}).items():
        train = _layered(
            raw.get("train_defaults"),
            raw["runs"][key].get("train"),
            raw["runs"][key].get(scale, {}).get("train"),
            scale,
        )
        sample = _layered(
            raw.get("sample_defaults"),
            raw["runs"][key].get("sample"),
            raw["runs"][key].get(scale, {}).get("sample"),
            scale,
        )
        runs[key] = _run(path, key, dict(spec, train=train, sample=sample), datasets, check_models)
    return Params(
        path=path,
        scale=scale,
        seed=int(resolved.get("seed", 0)),
        datasets=datasets,
        runs=runs,
        raw=resolved,
    )


def resolve_scale(obj: Any, scale: str) -> Any:
    """Recursively merge each mapping's `<scale>:` block over it and drop all scale blocks."""
    if isinstance(obj, list):
        return [resolve_scale(v, scale) for v in obj]
    if not isinstance(obj, dict):
        return obj
    base = {k: resolve_scale(v, scale) for k, v in obj.items() if k not in SCALES}
    if isinstance(obj.get(scale), dict):
        base = deep_merge(base, resolve_scale(obj[scale], scale))
    return base


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def validate_schema(raw: dict, path: Path) -> None:
    import jsonschema

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(
        validator.iter_errors(raw), key=lambda e: (len(e.absolute_path), str(e.absolute_path))
    )
    if not errors:
        return
    err = _deepest(errors[0])
    keys = [str(p) for p in err.absolute_path]
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed) - _pattern_ok(err))
        keys.append(extra[0] if extra else "?")
        msg = f"unknown key (allowed: {', '.join(allowed)})"
        if keys[-1] in compiling.RETIRED_KEYS:
            msg = "retired key: set the run's `compile: auto | always | never` instead"
    elif err.validator == "required":
        missing = [r for r in err.validator_value if r not in err.instance]
        keys.append(missing[0] if missing else "?")
        msg = "required key is missing"
    else:
        msg = err.message
    raise UserError(f"{path}: {'.'.join(keys) or '<top>'}: {msg}")


def _deepest(err):
    # anyOf/oneOf errors: report the most specific sub-error
    while err.context:
        err = max(err.context, key=lambda e: len(e.absolute_path))
    return err


def _pattern_ok(err) -> set:
    import re

    pats = err.schema.get("patternProperties", {})
    return {k for k in err.instance for p in pats if re.search(p, k)}


def _dataset(path: Path, key: str, spec: dict) -> DatasetConfig:
    return DatasetConfig(key=key, **spec)


def _layered(
    defaults: dict | None, run_base: dict | None, run_scale: dict | None, scale: str
) -> dict:
    """Precedence, lowest first: defaults, the run's own values, the defaults' scale block,
    the run's scale block. So `train_defaults.demo.batch_size` shrinks every run at demo scale,
    while a run's `demo.train` block still has the last word."""
    defaults = defaults or {}
    base = {k: v for k, v in defaults.items() if k not in SCALES}
    run_base = {k: v for k, v in (run_base or {}).items() if k not in SCALES}
    return deep_merge(
        deep_merge(deep_merge(base, run_base), defaults.get(scale) or {}), run_scale or {}
    )


def _run(path: Path, key: str, spec: dict, datasets: dict, check_models: bool) -> RunConfig:
    where = f"{path}: runs.{key}"
    if spec.get("dataset") not in datasets:
        raise UserError(f"{where}.dataset: {spec.get('dataset')!r} is not a key of datasets")
    train, sample = spec["train"], spec["sample"]
    model = dict(spec["model"])
    name = model.pop("name")
    kind = spec.get("kind", "ar")
    if check_models and kind != "classifier":
        _check_model_kwargs(f"{where}.model", name, model)
    raw = dict(spec, train=train, sample=sample, key=key)
    return RunConfig(
        key=key,
        kind=kind,
        dataset=spec["dataset"],
        model_name=name,
        model=model,
        train=_dataclass(TrainConfig, train, f"{where}.train"),
        sample=_dataclass(SampleConfig, sample, f"{where}.sample"),
        compile=compiling.check(spec.get("compile", "auto"), f"{where}.compile"),
        table=spec.get("table"),
        label=spec.get("label"),
        raw=raw,
    )


def _dataclass(cls, values: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            raise UserError(f"{where}.{k}: unknown key (allowed: {', '.join(sorted(names))})")
    return cls(**values)


def _check_model_kwargs(where: str, name: str, kwargs: dict) -> None:
    from sashimi.models import MODELS

    if name not in MODELS:
        raise UserError(f"{where}.name: unknown model {name!r} (known: {', '.join(MODELS)})")
    try:
        cls = MODELS[name]
    except ImportError:  # model file not importable: skip the keyword check, building will say why
        return
    sig = inspect.signature(cls.__init__)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        allowed = None
    else:
        allowed = [p for p in sig.parameters if p != "self"]
    for k in kwargs:
        if allowed is not None and k not in allowed:
            raise UserError(
                f"{where}.{k}: unknown keyword for model {name!r} (allowed: {', '.join(allowed)})"
            )


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = ",".join(map(str, v))
        else:
            out[key] = v
    return out
