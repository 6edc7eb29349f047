"""`sashimi train --run RUN`: one trainer for every generative model in params.yaml.

    sashimi train --run sashimi-sc09 [--resume/--no-resume] [--max-steps N] [--max-minutes M]
                  [--device auto|cpu|cuda]
    torchrun --nproc_per_node 4 -m sashimi train --key sashimi-sc09      # DDP, same code path
    (under torchrun write --key: torchrun's own parser takes --run as its --run-path)

- Autoregressive runs (`kind: ar`): cross-entropy over non-padded targets, reported in nats
  and bits per sample (nats / ln 2). SampleRNN runs with `train.tbptt` do truncated BPTT:
  each batch is cut into `tbptt`-sample windows, the model's state is carried (detached)
  across them, and every window is one optimiser step.
- Diffusion runs (`kind: diffusion`): `model.training_loss(x0)` on fixed-length waveforms.
- Classifier runs are trained by `sashimi classifier train --run RUN` (delegated).

Optimisation (SPEC "Training"): AdamW (or Adam / SGD) with three parameter groups: S4
parameters (Lambda, P, B, dt) at `ssm_lr` without weight decay, other 0-/1-d parameters
(norms, biases, scalars) at `lr` without weight decay, the rest at `lr` / `weight_decay`.
Schedules: ReduceLROnPlateau on the validation loss, cosine with linear warm-up over
`max_steps`, or constant. Gradient clipping by norm or value; bf16 autocast and TF32 on CUDA.

Resumable and exact: the data order is a function of (seed, epoch) and the checkpoint stores
the position inside the epoch (and inside a batch for truncated BPTT, with the carried state),
the optimiser, scheduler and every RNG, so a killed run resumed from `last.pt` ends with the
same parameters as an uninterrupted one. Budgets (`max_steps`, `max_minutes`) count over
resumes. Checkpoints: `step-<n>.pt` (the last `keep_last`), `last.pt`, `best.pt` (lowest
validation loss), all written atomically.

Resume vs configuration changes (Snakemake / DVC rerun a job when its params change): by
default a run resumes from `last.pt` only if the checkpoint was trained with the same
configuration, ignoring budget and logging keys (RESUME_IGNORED: max_steps, max_minutes,
val_every, ... , and the sample / table / label blocks). Any other difference (model, dataset,
optimiser, lr, batch size, seed, ...) prints one line naming the first differing key and
starts a fresh run (old checkpoints of this run deleted, a new MLflow run). With an explicit
`--resume` a difference is an error naming the key.

DDP: under torchrun (WORLD_SIZE > 1) each rank takes an interleaved share of every global
batch of `batch_size` items; the loss is normalised by the GLOBAL number of targets, so
gradients equal those of one process on the whole batch. Rank 0 writes everything.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import inspect
import io
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sashimi.batching import IGNORE_INDEX, crop, length_multiple, pad_to_multiple
from sashimi.checkpoints import checkpoint_dir, load_checkpoint
from sashimi.distributed import Dist, init_distributed, pick_device, shard
from sashimi.errors import UserError
from sashimi.io import atomic_write
from sashimi.optim import build_optimizer, build_scheduler, is_plateau

LN2 = math.log(2.0)
CKPT_FORMAT = 1
LOG_FIELDS = ("step", "split", "loss", "bits_per_sample", "lr", "tokens_per_s", "elapsed_s")


# ============================================================================ distributed
# ============================================================================ data order
def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The global batches of one epoch: a permutation seeded by (seed, epoch), cut into
    `batch_size` pieces, the incomplete last one dropped (a split smaller than one batch is
    repeated to fill one)."""
    if n == 0:
        return []
    perm = np.random.default_rng([seed % 2**32, epoch]).permutation(n)  # (n,)
    if n < batch_size:
        perm = np.resize(perm, batch_size)
    return [perm[i * batch_size : (i + 1) * batch_size] for i in range(len(perm) // batch_size)]


# ============================================================================ RNG state
def rng_state() -> dict:
    """Every RNG the trainer touches, as plain tensors / tuples (loadable with weights_only)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ),
        "python": random.getstate(),
    }


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


# Budget and logging settings: changing them continues a run from last.pt (a longer budget
# extends it). Any other change of the run's configuration (model, data, optimisation, seed)
# makes the checkpoint stale: an automatic resume starts over, an explicit --resume refuses.
RESUME_IGNORED = frozenset(
    f"train.{k}"
    for k in (
        "max_steps",
        "max_minutes",
        "val_every",
        "val_batches",
        "log_every",
        "ckpt_every",
        "keep_last",
        "num_workers",
        "compile",
        "s4_compile",
        "amp",
    )
)
RESUME_IGNORED_BLOCKS = frozenset({"sample", "table", "label", "key"})
_UNSET = "<unset>"


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = _norm(v)
    return out


def _model_defaults(name: str) -> dict[str, Any]:
    """Keyword defaults of the model class `name` ({} when it cannot be imported)."""
    try:
        from sashimi.models import MODELS

        sig = inspect.signature(MODELS[name].__init__)
    except Exception:
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        k: p.default
        for k, p in sig.parameters.items()
        if k != "self" and p.kind in kinds and p.default is not inspect.Parameter.empty
    }


def training_config(raw: dict, dataset: dict | None = None) -> dict[str, Any]:
    """What a checkpoint's training depends on, as dotted keys in a fixed order: `kind`,
    `dataset`, `model.*` (the model's keyword defaults filled in), `train.*` (TrainConfig's
    defaults filled in), other run keys, and `datasets.<key>.*` when `dataset` (a
    DatasetConfig as a dict) is given. Budget/logging keys (RESUME_IGNORED) and the
    sample / table / label blocks are left out."""
    from sashimi.config import TrainConfig

    model = dict(raw.get("model") or {})
    name = model.get("name")
    out: dict[str, Any] = {"kind": raw.get("kind", "ar"), "dataset": raw.get("dataset")}
    if name is not None:
        model = {"name": name, **_model_defaults(name), **model}
    out.update(_flatten({"model": model}))
    out.update(
        _flatten({"train": {**dataclasses.asdict(TrainConfig()), **(raw.get("train") or {})}})
    )
    skip = RESUME_IGNORED_BLOCKS | {"kind", "dataset", "model", "train"}
    out.update(_flatten({k: v for k, v in raw.items() if k not in skip}))
    if dataset is not None:
        out.update(_flatten({"datasets": {raw.get("dataset"): dict(dataset)}}))
    return {k: v for k, v in out.items() if k not in RESUME_IGNORED}


def config_change(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first key (in `new`'s order, then `old`'s) whose value differs: (key, old, new)."""
    for k in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(k, _UNSET), new.get(k, _UNSET)
        if a != b:
            return k, a, b
    return None


def _fmt(v: Any) -> str:
    if isinstance(v, str) and v != _UNSET:
        return repr(v)
    return str(v)


def checkpoint_config_change(ckpt: dict, run, dataset: dict | None) -> tuple[str, Any, Any] | None:
    """How the run's configuration differs from the one `ckpt` was trained with (None: same).
    A checkpoint without a saved config (foreign / old) is compared on its model only."""
    new = training_config(dict(run.raw, model={"name": run.model_name, **run.model}), dataset)
    saved = ckpt.get("config")
    if isinstance(saved, dict) and saved:
        old_ds = ckpt.get("dataset_config")
        old = training_config(saved, old_ds if isinstance(old_ds, dict) else None)
        if not isinstance(old_ds, dict):  # saved before datasets were recorded: not compared
            new = {k: v for k, v in new.items() if not k.startswith("datasets.")}
        return config_change(old, new)
    model = {"name": ckpt.get("model_name"), **dict(ckpt.get("model_kwargs") or {})}
    old = {k: v for k, v in training_config({"model": model}).items() if k.startswith("model.")}
    old["kind"] = ckpt.get("kind", run.kind)
    new = {k: v for k, v in new.items() if k.startswith("model.") or k == "kind"}
    return config_change(old, new)


def _to(obj: Any, device: torch.device) -> Any:
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


# ============================================================================ the trainer
class NonFiniteLoss(UserError):
    pass


class Trainer:
    """Trains one run. `fit()` returns a summary dict. Everything on disk is written by rank 0."""

    def __init__(
        self,
        P,
        run,
        *,
        device: torch.device,
        dist: Dist,
        resume: bool | None = None,
        root: Path | None = None,
        progress: bool | None = None,
    ) -> None:
        from sashimi.models import build_model

        self.P, self.run, self.tc = P, run, run.train
        self.device, self.dist = device, dist
        self.root = root or Path.cwd()
        self.run_dir = Path(run.run_dir)
        self.ckpt_dir = checkpoint_dir(self.run_dir)
        self.ds = P.dataset_of(run.key)
        self.ds_config = dataclasses.asdict(self.ds)  # saved in checkpoints (resume check)
        self.kind = run.kind
        self.seed = int(self.tc.seed)

        seed_everything(self.seed)  # identical initial weights on every rank
        try:
            self.model = build_model(run.model_name, **run.model)
        except TypeError as e:
            raise UserError(f"runs.{run.key}.model: {e}") from None
        model_kind = getattr(self.model, "kind", None)
        if model_kind is not None and model_kind != self.kind:
            raise UserError(
                f"runs.{run.key}.kind is {self.kind!r} but model {run.model_name!r} is {model_kind!r}"
            )
        self.model.to(device)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.context = int(getattr(self.model, "context", 0)) if self.kind == "ar" else 0
        self.multiple = length_multiple(self.model)
        if self.tc.tbptt:
            if "state" not in inspect.signature(self.model.forward).parameters:
                raise UserError(
                    f"runs.{run.key}.train.tbptt: model {run.model_name!r} has no recurrent state"
                )
            if self.tc.tbptt % self.multiple:
                raise UserError(
                    f"runs.{run.key}.train.tbptt: {self.tc.tbptt} is not a multiple of "
                    f"the model's frame length {self.multiple}"
                )

        self.opt = build_optimizer(self.model, self.tc)
        self.sched = build_scheduler(self.opt, self.tc, f"runs.{run.key}.train")

        # what DDP / torch.compile wrap: the model itself (AR) or its training loss (diffusion)
        base: nn.Module = self.model if self.kind == "ar" else DiffusionLoss(self.model)
        if dist.enabled:
            ddp_kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
            self.net: nn.Module = nn.parallel.DistributedDataParallel(base, **ddp_kw)
        else:
            self.net = base
        self._fwd = self.net
        if self.tc.s4_compile != "auto":  # else $SASHIMI_COMPILE, or the kernel's own default
            from sashimi.ssm.kernels import set_compile_mode

            set_compile_mode(self.tc.s4_compile)
        self._compiled = bool(self.tc.compile)
        if self._compiled:
            self._fwd = torch.compile(self.net)
        self.use_amp = bool(self.tc.amp) and device.type == "cuda"
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # position and bookkeeping (restored by resume)
        self.step, self.epoch, self.batch_in_epoch, self.chunk = 0, 0, 0, 0
        self.best_val = math.inf
        self.elapsed_prev = 0.0
        self.carried: Any = None  # truncated-BPTT state carried between windows
        self.last_val_step = -1
        self.resume = resume
        self.progress = progress
        self.tracker = None

        self._setup_data()

    # ------------------------------------------------------------------ data
    def _setup_data(self) -> None:
        from sashimi.data.datasets import AutoregressiveDataset, WaveformDataset, load_split

        prepared = Path(self.ds.prepared_dir)
        if not (prepared / "train.offsets.npy").is_file():
            raise UserError(
                f"{prepared}: dataset {self.ds.key!r} is not prepared "
                f"(run `sashimi prepare --key {self.ds.key}`)"
            )
        splits = {
            s: load_split(prepared, s)
            for s in ("train", "validation")
            if s == "train" or (prepared / f"{s}.offsets.npy").is_file()
        }
        if self.kind == "ar":
            self.train_set = AutoregressiveDataset(
                splits["train"], self.ds.quantization, self.ds.chunk_length, context=self.context
            )
            self.val_set = (
                AutoregressiveDataset(
                    splits["validation"],
                    self.ds.quantization,
                    self.ds.chunk_length,
                    context=self.context,
                )
                if "validation" in splits
                else None
            )
        else:
            length = self.ds.clip_length or self.ds.chunk_length
            if not length:
                raise UserError(
                    f"datasets.{self.ds.key}: a diffusion run needs clip_length or chunk_length"
                )
            self.train_set = WaveformDataset(splits["train"], length)
            self.val_set = (
                WaveformDataset(splits["validation"], length) if "validation" in splits else None
            )
        if len(self.train_set) == 0:
            raise UserError(
                f"{prepared}: the train split has no items (chunk_length={self.ds.chunk_length})"
            )
        if self.val_set is not None and len(self.val_set) == 0:
            self.val_set = None
        if self.tc.batch_size < self.dist.world:
            raise UserError(
                f"runs.{self.run.key}.train.batch_size: {self.tc.batch_size} is smaller than "
                f"the number of processes ({self.dist.world})"
            )

    def _loader(self, dataset, batches: list[list[int]]) -> torch.utils.data.DataLoader:
        from sashimi.data.datasets import collate_autoregressive

        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=self.tc.num_workers,
            collate_fn=collate_autoregressive if self.kind == "ar" else None,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),  # never draw from the global RNG (exact resume)
        )

    # ------------------------------------------------------------------ forward / loss
    def _autocast(self):
        return torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp
        )

    def _forward(self, *args, **kwargs):
        if self._compiled:
            try:
                return self._fwd(*args, **kwargs)
            except Exception as e:  # compilation failed: eager from now on
                warnings.warn(
                    f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                    "training eagerly",
                    stacklevel=2,
                )
                self._compiled, self._fwd = False, self.net
        return self._fwd(*args, **kwargs)

    def _ar_batches(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The optimiser steps of one AR batch: the batch itself, or its truncated-BPTT windows."""
        x, y = pad_to_multiple(x, y, self.multiple)
        if not self.tc.tbptt:
            yield x, y
            return
        from sashimi.data.datasets import tbptt_chunks

        yield from tbptt_chunks(x, y, self.tc.tbptt, self.context)

    def _global(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.dist.all_reduce(t).tolist()

    def _train_step(
        self, x: torch.Tensor, y: torch.Tensor | None
    ) -> tuple[float, float, float] | None:
        """One optimiser step. Returns (global loss sum, global count, global samples) or None when
        the window has no targets. For AR the loss is the sum of nats over targets / global target count, times
        world (DDP averages gradients over ranks), so gradients match one process."""
        x = x.to(self.device, non_blocking=True)
        if self.kind == "ar":
            y = y.to(self.device, non_blocking=True)
            count = float((y != IGNORE_INDEX).sum())
        else:
            count = float(x.shape[0])
        (total,) = self._global(count)
        if total == 0:
            return None
        with self._autocast():
            if self.kind == "ar":
                if self.tc.tbptt:
                    logits, state = self._forward(x, state=self.carried, return_state=True)
                    self.carried = self.model.detach_state(state)
                else:
                    logits = self._forward(x)  # (B, L, 256)
                loss_sum = F.cross_entropy(
                    logits.float().flatten(0, 1),
                    y.flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            else:
                loss_sum = self._forward(x) * count  # training_loss: mean over this shard
        loss = loss_sum * (self.dist.world / total)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        g_sum, _ = self._global(float(loss_sum.detach()), count)
        if not math.isfinite(g_sum):
            self._non_finite("training loss", g_sum)
        if self.tc.clip_grad:
            if self.tc.clip_mode == "value":
                nn.utils.clip_grad_value_(self.model.parameters(), self.tc.clip_grad)
            else:
                gnorm = nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.clip_grad)
                if not torch.isfinite(gnorm):
                    self._non_finite("gradient norm", float(gnorm))
        self.opt.step()
        if not is_plateau(self.sched):
            self.sched.step()
        return g_sum, total, total if self.kind == "ar" else total * x.shape[-1]

    def _non_finite(self, what: str, value: float) -> None:
        last = self.ckpt_dir / "last.pt"
        kept = (
            f"last good checkpoint kept: {last}" if last.is_file() else "no checkpoint was written"
        )
        raise NonFiniteLoss(
            f"{self.run.key}: non-finite {what} ({value}) at step {self.step + 1}; "
            f"stopped without saving ({kept})"
        )

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean validation loss (nats per target for AR; the diffusion loss otherwise) over
        `val_batches` global batches; None without a validation split."""
        if self.val_set is None:
            return None
        self.model.eval()
        n = len(self.val_set)
        B = self.tc.batch_size
        order = [np.arange(i, min(i + B, n)) for i in range(0, n, B)]
        if self.tc.val_batches:
            order = order[: self.tc.val_batches]
        batches = [shard(b, self.dist) for b in order]
        loss_sum, count = 0.0, 0.0
        fork = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork):
            torch.manual_seed(self.seed + 12345)  # the same noise at every validation
            for batch in self._loader(self.val_set, [b for b in batches if b]):
                if self.kind == "ar":
                    x, y = batch
                    if self.tc.max_length:
                        x, y = crop(x, y, self.context, self.tc.max_length, None)
                    x, y = pad_to_multiple(x, y, self.multiple)
                    x, y = x.to(self.device), y.to(self.device)
                    with self._autocast():
                        logits = self.model(x)  # (B, L, 256)
                    loss_sum += float(
                        F.cross_entropy(
                            logits.float().flatten(0, 1),
                            y.flatten(),
                            ignore_index=IGNORE_INDEX,
                            reduction="sum",
                        )
                    )
                    count += float((y != IGNORE_INDEX).sum())
                else:
                    x = batch
                    if self.tc.max_length:
                        x, _ = crop(x, None, 0, self.tc.max_length, None)
                    x = x.to(self.device)
                    with self._autocast():
                        loss_sum += float(self.model.training_loss(x)) * x.shape[0]
                    count += x.shape[0]
        self.model.train()
        loss_sum, count = self._global(loss_sum, count)
        return loss_sum / count if count else None

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        per_rank = self.dist.gather(
            {"rng": rng_state(), "carried": _to(self.carried, torch.device("cpu"))}
        )
        return {
            "format": CKPT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": per_rank[0]["rng"],
            "rank_state": per_rank,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "chunk": self.chunk,
            "best_val": self.best_val,
            "last_val_step": self.last_val_step,
            "elapsed_s": self.elapsed(),
            "world_size": self.dist.world,
            "config": dict(self.run.raw, key=self.run.key),
            "model_name": self.run.model_name,
            "model_kwargs": dict(self.run.model),
            "dataset_config": self.ds_config,
            "kind": self.kind,
            "n_params": self.n_params,
        }

    def save(self, periodic: bool, best: bool) -> None:
        """Write step-<n>.pt + last.pt (periodic) and/or best.pt, atomically; prune old steps."""
        state = self._state()  # every rank takes part in the gather
        if not self.dist.is_main or not (periodic or best):
            return
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        targets = []
        if periodic:
            targets += [self.ckpt_dir / f"step-{self.step}.pt", self.ckpt_dir / "last.pt"]
        if best:
            targets.append(self.ckpt_dir / "best.pt")
        for path in targets:
            with atomic_write(path, "wb") as f:
                f.write(data)
        if periodic:
            steps = sorted(self.ckpt_dir.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
            for old in steps[: max(0, len(steps) - self.tc.keep_last)]:
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()
            if self.tracker is not None:
                self.tracker.log_checkpoint_path(self.ckpt_dir / "last.pt")

    def _restore(self) -> bool:
        """Load last.pt if resuming; False when starting fresh."""
        last = self.ckpt_dir / "last.pt"
        if self.resume is False or not last.is_file():
            if self.resume is True and not last.is_file() and self.dist.is_main:
                print(
                    f"note: {last} not found; starting {self.run.key} from scratch", file=sys.stderr
                )
            return False
        ckpt = load_checkpoint(last, "cpu")
        change = checkpoint_config_change(ckpt, self.run, self.ds_config)
        if change is not None:
            what = f"{change[0]} changed {_fmt(change[1])} -> {_fmt(change[2])}"
            if self.resume is True:
                raise UserError(
                    f"{last}: runs.{self.run.key}: {what} since this checkpoint; "
                    "use --no-resume to start over"
                )
            if self.dist.is_main:
                print(f"runs.{self.run.key}: {what}; starting a fresh run", file=sys.stderr)
            return False
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.step, self.epoch = int(ckpt["step"]), int(ckpt["epoch"])
        self.batch_in_epoch, self.chunk = (
            int(ckpt.get("batch_in_epoch", 0)),
            int(ckpt.get("chunk", 0)),
        )
        self.best_val = float(ckpt.get("best_val", math.inf))
        self.elapsed_prev = float(ckpt.get("elapsed_s", 0.0))
        ranks = ckpt.get("rank_state") or [{"rng": ckpt["rng"], "carried": None}]
        mine = ranks[self.dist.rank] if len(ranks) == self.dist.world else None
        if mine is not None:
            set_rng_state(mine["rng"])
            self.carried = _to(mine["carried"], self.device)
        else:  # resumed with another number of processes: same data order, fresh per-rank RNG
            set_rng_state(ckpt["rng"])
            torch.manual_seed(self.seed + 1000 * self.dist.rank + self.step)
            if self.chunk:  # the carried state belongs to other shards: restart the batch
                self.chunk, self.carried = 0, None
        self.last_val_step = self.step if ckpt.get("last_val_step") == self.step else -1
        return True

    # ------------------------------------------------------------------ logs
    def elapsed(self) -> float:
        return self.elapsed_prev + (time.monotonic() - self._t0)

    def _init_outputs(self, resumed: bool) -> None:
        if not self.dist.is_main:
            return
        import yaml

        self.run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.run_dir / "config.yaml", "w") as f:
            f.write(f"# resolved configuration of run {self.run.key} (scale {self.P.scale})\n")
            yaml.safe_dump(dict(self.run.raw, key=self.run.key), f, sort_keys=False)
        log = self.run_dir / "train_log.csv"
        rows: list[dict] = []
        if resumed and log.is_file():  # drop rows a killed run wrote after its last checkpoint
            with open(log, newline="") as f:
                rows = [
                    r
                    for r in csv.DictReader(f)
                    if r.get("step", "").isdigit() and int(r["step"]) <= self.step
                ]
        else:
            for old in self.ckpt_dir.glob("step-*.pt"):  # fresh start: no stale checkpoints
                old.unlink()
            for name in ("last.pt", "best.pt"):
                with contextlib.suppress(FileNotFoundError):
                    (self.ckpt_dir / name).unlink()
        with atomic_write(log, "w") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in LOG_FIELDS} for r in rows)

    def _log_row(self, split: str, loss: float, count_per_s: float | None) -> None:
        if not self.dist.is_main:
            return
        bits = loss / LN2 if self.kind == "ar" else None
        lr = self.opt.param_groups[0]["lr"]
        row = {
            "step": self.step,
            "split": split,
            "loss": f"{loss:.6f}",
            "bits_per_sample": "" if bits is None else f"{bits:.6f}",
            "lr": f"{lr:.6g}",
            "tokens_per_s": "" if count_per_s is None else f"{count_per_s:.1f}",
            "elapsed_s": f"{self.elapsed():.2f}",
        }
        with open(self.run_dir / "train_log.csv", "a", newline="") as f:
            csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow(row)
        if self.tracker is not None:
            m = {f"{split}/loss": loss, "lr": lr}
            if bits is not None:
                m[f"{split}/bits_per_sample"] = bits
            if count_per_s is not None:
                m["tokens_per_s"] = count_per_s
            self.tracker.log_metrics(m, step=self.step)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        from tqdm import tqdm

        tc = self.tc
        self._t0 = time.monotonic()
        resumed = self._restore()
        self._t0 = time.monotonic()
        self.dist.barrier()  # every rank has read last.pt before a fresh start deletes it
        self._init_outputs(resumed)
        self.dist.barrier()
        max_steps = tc.max_steps
        max_s = tc.max_minutes * 60 if tc.max_minutes else None
        if self.dist.is_main:
            from sashimi.tracking import Tracker

            self.tracker = Tracker(
                self.run.key,
                dict(self.P.flat(self.run.key), n_params=self.n_params),
                run_dir=self.run_dir,
                root=self.root,
                reuse=resumed,
                tags={"kind": self.kind, "model_name": self.run.model_name},
            ).start()

        show = self.progress
        if show is None:
            show = sys.stderr.isatty() and os.environ.get("SASHIMI_PROGRESS", "1") != "0"
        bar = tqdm(
            total=max_steps,
            initial=self.step,
            desc=self.run.key,
            unit="step",
            dynamic_ncols=True,
            disable=not (show and self.dist.is_main),
            leave=False,
        )
        if self.dist.is_main and resumed:
            print(
                f"resuming {self.run.key} from step {self.step} (epoch {self.epoch})",
                file=sys.stderr,
            )

        lines = (
            self.dist.is_main
            and bar.disable
            and self.progress is not False
            and os.environ.get("SASHIMI_PROGRESS", "1") != "0"
        )  # plain lines for logs
        win_sum, win_count, win_tokens, win_t0 = 0.0, 0.0, 0.0, time.monotonic()
        val = None
        stop = self._budget_reached(max_steps, max_s)
        status = "FINISHED"
        try:
            self.model.train()
            while not stop:
                batches = epoch_batches(len(self.train_set), tc.batch_size, self.seed, self.epoch)
                if self.batch_in_epoch >= len(batches):
                    self.epoch, self.batch_in_epoch, self.chunk = self.epoch + 1, 0, 0
                    continue
                start = self.batch_in_epoch
                loader = self._loader(
                    self.train_set, [shard(b, self.dist) for b in batches[start:]]
                )
                for bi, batch in enumerate(loader, start=start):
                    crop_rng = np.random.default_rng([self.seed, self.epoch, bi, 17])
                    if self.kind == "ar":
                        x, y = batch
                        if tc.max_length:
                            x, y = crop(x, y, self.context, tc.max_length, crop_rng)
                        windows = list(self._ar_batches(x, y))
                    else:
                        x = batch
                        if tc.max_length:
                            x, _ = crop(x, None, 0, tc.max_length, crop_rng)
                        windows = [(x, None)]
                    if self.chunk == 0:
                        self.carried = None
                    for ci in range(self.chunk, len(windows)):
                        out = self._train_step(*windows[ci])
                        last_window = ci + 1 == len(windows)
                        self.batch_in_epoch, self.chunk = (
                            (bi + 1, 0) if last_window else (bi, ci + 1)
                        )
                        if out is None:
                            continue
                        self.step += 1
                        win_sum += out[0]
                        win_count += out[1]
                        win_tokens += out[2]
                        bar.update(1)
                        stop = self._budget_reached(max_steps, max_s)
                        if self.step % tc.log_every == 0 or stop:
                            dt = max(time.monotonic() - win_t0, 1e-9)
                            loss = win_sum / max(win_count, 1)
                            self._log_row("train", loss, win_tokens / dt)
                            postfix = {"loss": f"{loss:.4f}"}
                            if self.kind == "ar":
                                postfix["bits"] = f"{loss / LN2:.3f}"
                            postfix["tok/s"] = f"{win_tokens / dt:.0f}"
                            if self.device.type == "cuda":
                                peak = torch.cuda.max_memory_allocated(self.device) / 2**30
                                postfix["gpu_mem"] = f"{peak:.2f}GB"
                                if self.tracker is not None:
                                    self.tracker.log_metrics({"gpu_peak_mem_gb": peak}, step=self.step)
                            bar.set_postfix(postfix)
                            if lines:
                                print(
                                    f"{self.run.key} step {self.step}: "
                                    + " ".join(f"{k} {v}" for k, v in postfix.items()),
                                    file=sys.stderr,
                                )
                            win_sum, win_count, win_tokens, win_t0 = 0.0, 0.0, 0.0, time.monotonic()
                        best = False
                        if self.step % tc.val_every == 0 or (
                            stop and self.last_val_step != self.step
                        ):
                            val = self.validate()
                            self.last_val_step = self.step
                            if val is not None:
                                if not math.isfinite(val):
                                    self._non_finite("validation loss", val)
                                self._log_row("validation", val, None)
                                if is_plateau(self.sched):
                                    self.sched.step(val)
                                if val < self.best_val:
                                    self.best_val, best = val, True
                        periodic = self.step % tc.ckpt_every == 0 or stop
                        if periodic or best:
                            self.save(periodic=periodic, best=best)
                        if stop:
                            break
                    if stop:
                        break
                    self.chunk, self.carried = 0, None
                else:
                    self.epoch, self.batch_in_epoch, self.chunk = self.epoch + 1, 0, 0
            if self.step and not (self.ckpt_dir / "last.pt").is_file():
                self.save(periodic=True, best=False)
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            bar.close()
            if self.tracker is not None:
                self.tracker.close(status)
        summary = {
            "run": self.run.key,
            "step": self.step,
            "epoch": self.epoch,
            "best_val": None if math.isinf(self.best_val) else self.best_val,
            "elapsed_s": round(self.elapsed(), 2),
            "checkpoint": str(self.ckpt_dir / "last.pt"),
            "n_params": self.n_params,
        }
        if self.device.type == "cuda":
            summary["gpu_peak_mem_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
        if self.kind == "ar" and summary["best_val"] is not None:
            summary["best_val_bits"] = summary["best_val"] / LN2
        return summary

    def _budget_reached(self, max_steps: int | None, max_s: float | None) -> bool:
        """Step or time budget used up; ranks agree (rank 0's clock decides)."""
        done = bool(max_steps is not None and self.step >= max_steps)
        if max_s is not None and not done:
            flag = torch.tensor([1.0 if self.elapsed() >= max_s else 0.0], device=self.device)
            if self.dist.enabled:  # rank 0 decides
                if not self.dist.is_main:
                    flag.zero_()
                self.dist.all_reduce(flag, "max")
            done = bool(flag.item() > 0)
        return done


class DiffusionLoss(nn.Module):
    """forward(x0) = model.training_loss(x0), so DDP (which syncs gradients only through
    forward) and torch.compile can wrap a diffusion model's loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x0: torch.Tensor) -> torch.Tensor:  # (B, L) -> scalar
        return self.model.training_loss(x0)


# ============================================================================ CLI
def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run",
        "--key",
        dest="run",
        required=True,
        help="run key in params.yaml (e.g. sashimi-sc09); spell it --key under torchrun, "
        "whose own parser claims --run",
    )
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="continue from checkpoints/last.pt (default: when it exists and was trained with "
        "the same configuration, budget and logging keys aside; else start over)",
    )
    p.add_argument("--max-steps", type=int, help="override train.max_steps (total, over resumes)")
    p.add_argument(
        "--max-minutes", type=float, help="override train.max_minutes (total, over resumes)"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")


def run(args: argparse.Namespace) -> int:
    from sashimi.config import load_params

    P = load_params(args.params)
    run_cfg = P.run(args.run)
    if run_cfg.kind == "classifier":
        return _delegate_classifier(args)
    overrides = {}
    if args.max_steps is not None:
        if args.max_steps < 0:
            raise UserError(f"--max-steps: {args.max_steps} is negative")
        overrides["max_steps"] = args.max_steps
    if args.max_minutes is not None:
        overrides["max_minutes"] = args.max_minutes
    if overrides:
        run_cfg = dataclasses.replace(
            run_cfg, train=dataclasses.replace(run_cfg.train, **overrides)
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(args.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist = init_distributed(device)
    try:
        trainer = Trainer(
            P,
            run_cfg,
            device=device,
            dist=dist,
            resume=args.resume,
            root=Path(args.params).resolve().parent,
            progress=False if args.no_progress else None,
        )
        summary = trainer.fit()
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if dist.is_main:
        import json

        print(json.dumps(summary))
    return 0


def _delegate_classifier(args: argparse.Namespace) -> int:
    """`sashimi train --run classifier-sc09` == `sashimi classifier train --run classifier-sc09`."""
    from sashimi import classifier

    p = argparse.ArgumentParser(prog="sashimi classifier")
    classifier.configure_parser(p)
    argv = ["train", "--run", args.run]
    if args.max_steps is not None:
        argv += ["--max-steps", str(args.max_steps)]
    if args.max_minutes is not None:
        argv += ["--max-minutes", str(args.max_minutes)]
    ns = p.parse_args(argv)
    ns.params = args.params
    if args.device != "auto" and hasattr(ns, "device"):
        ns.device = args.device
    return int(classifier.run(ns) or 0)
