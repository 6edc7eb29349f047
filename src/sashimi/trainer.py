"""The generative trainer: autoregressive and diffusion runs, one process or DDP.

- `kind: ar`: cross-entropy over non-padded targets, in nats and bits per sample; with
  `train.tbptt` (SampleRNN) each window of a batch is one optimiser step, state carried.
- `kind: diffusion`: `model.training_loss(x0)` on fixed-length waveforms.

`fit`: start (resume or fresh), then epochs of batches of windows, each window one optimiser
step and its bookkeeping (budget, log, validation, checkpoints). Budgets count over resumes.
Resumable and exact: the data order is a function of (seed, epoch) and checkpoints hold the
position, optimiser, scheduler and every RNG. Under DDP each rank takes a share of every
global batch and the loss is normalised by the global target count, as one process would be.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sashimi import compiling
from sashimi.ar_loss import LN2, ar_window, n_targets, nll_sum
from sashimi.batching import crop, length_multiple
from sashimi.checkpoints import checkpoint_dir
from sashimi.distributed import Dist, shard
from sashimi.errors import UserError
from sashimi.optim import build_optimizer, build_scheduler, is_plateau
from sashimi.resume import clear_checkpoints, open_last, prune_steps, write_checkpoint
from sashimi.rng import rng_state, seed_everything, set_rng_state
from sashimi.train_data import batches_per_epoch, epoch_batches, loader, train_val_sets
from sashimi.train_log import Progress, RunLog, progress_wanted, start_log

CKPT_FORMAT = 1
CLASSIFIER_ONLY = ("augment", "precise_bn_batches", "noise_dir")  # TrainConfig keys


def _to(obj: Any, device: torch.device) -> Any:
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class NonFiniteLoss(UserError):
    pass


class DiffusionLoss(nn.Module):
    """forward(x0) = model.training_loss(x0), so DDP (which syncs gradients only through
    forward) and torch.compile can wrap a diffusion model's loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x0: torch.Tensor) -> torch.Tensor:  # (B, L) -> scalar
        return self.model.training_loss(x0)


class Trainer:
    """Trains one generative run. `fit()` returns a summary dict. Rank 0 writes everything."""

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
        self.P, self.run, self.tc = P, run, run.train
        self.device, self.dist = device, dist
        self.root = root or Path.cwd()
        self.run_dir = Path(run.run_dir)
        self.ckpt_dir = checkpoint_dir(self.run_dir)
        self.ds = P.dataset_of(run.key)
        self.ds_config = dataclasses.asdict(self.ds)  # saved in checkpoints (resume check)
        self.kind = run.kind
        self.seed = int(self.tc.seed)
        self._check_settings()

        seed_everything(self.seed)  # identical initial weights on every rank
        self.model = self._build_model()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.context = int(getattr(self.model, "context", 0)) if self.kind == "ar" else 0
        self.multiple = length_multiple(self.model)
        self._check_tbptt()
        self.opt = build_optimizer(self.model, self.tc)
        self.sched = build_scheduler(self.opt, self.tc, f"runs.{run.key}.train")
        self._wrap()

        # position and bookkeeping (restored by resume)
        self.step, self.epoch, self.batch_in_epoch, self.chunk = 0, 0, 0, 0
        self.best_val = math.inf
        self.elapsed_prev = 0.0
        self.carried: Any = None  # truncated-BPTT state carried between windows
        self.last_val_step = -1
        self.resume = resume
        self.progress = progress
        self.tracker = None
        self._stop = False
        self._setup_data()

    # ------------------------------------------------------------------ setup
    def _check_settings(self) -> None:
        where = f"runs.{self.run.key}.train"
        for k in CLASSIFIER_ONLY:
            if getattr(self.tc, k):
                raise UserError(f"{where}.{k}: only classifier runs use it")

    def _build_model(self) -> nn.Module:
        from sashimi.models import build_model

        try:
            model = build_model(self.run.model_name, **self.run.model)
        except TypeError as e:
            raise UserError(f"runs.{self.run.key}.model: {e}") from None
        model_kind = getattr(model, "kind", None)
        if model_kind is not None and model_kind != self.kind:
            raise UserError(
                f"runs.{self.run.key}.kind is {self.kind!r} but model "
                f"{self.run.model_name!r} is {model_kind!r}"
            )
        return model.to(self.device)

    def _check_tbptt(self) -> None:
        if not self.tc.tbptt:
            return
        where = f"runs.{self.run.key}.train.tbptt"
        if "state" not in inspect.signature(self.model.forward).parameters:
            raise UserError(f"{where}: model {self.run.model_name!r} has no recurrent state")
        if self.tc.tbptt % self.multiple:
            raise UserError(
                f"{where}: {self.tc.tbptt} is not a multiple of the model's frame length "
                f"{self.multiple}"
            )

    def _wrap(self) -> None:
        """What DDP / torch.compile wrap: the model itself (AR) or its training loss."""
        base: nn.Module = self.model if self.kind == "ar" else DiffusionLoss(self.model)
        if self.dist.enabled:
            ddp_kw = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.net: nn.Module = nn.parallel.DistributedDataParallel(base, **ddp_kw)
        else:
            self.net = base
        self._fwd = self.net
        compiling.apply_to_model(self.model, self.run.compile)  # the S4 layers' compiled paths
        self._compiled = compiling.compile_whole(self.model, self.run.compile)
        if self._compiled:
            self._fwd = torch.compile(self.net)
        self.use_amp = bool(self.tc.amp) and self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _setup_data(self) -> None:
        self.train_set, self.val_set = train_val_sets(self.ds, self.kind, self.context)
        if self.tc.batch_size < self.dist.world:
            raise UserError(
                f"runs.{self.run.key}.train.batch_size: {self.tc.batch_size} is smaller than "
                f"the number of processes ({self.dist.world})"
            )
        self.n_batches = batches_per_epoch(len(self.train_set), self.tc.batch_size)

    def _loader(self, dataset, batches: list[list[int]]) -> torch.utils.data.DataLoader:
        return loader(dataset, batches, self.kind, self.tc.num_workers, self.device)

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

    def _windows(self, batch, bi: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The optimiser steps of one batch: the (randomly cropped) batch itself, or its
        truncated-BPTT windows."""
        rng = np.random.default_rng([self.seed, self.epoch, bi, 17])
        if self.kind != "ar":
            x = batch
            if self.tc.max_length:
                x, _ = crop(x, None, 0, self.tc.max_length, rng)
            return [(x, None)]
        x, y = ar_window(*batch, self.context, self.tc.max_length, self.multiple, rng)
        if not self.tc.tbptt:
            return [(x, y)]
        from sashimi.data.datasets import tbptt_chunks

        return list(tbptt_chunks(x, y, self.tc.tbptt, self.context))

    def _global(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.dist.all_reduce(t).tolist()

    def _loss_sum(self, x: torch.Tensor, y: torch.Tensor | None, count: float) -> torch.Tensor:
        """This shard's summed loss: nats over targets (AR), or the mean loss times clips."""
        if self.kind != "ar":
            return self._forward(x) * count  # training_loss: mean over this shard
        if self.tc.tbptt:
            logits, state = self._forward(x, state=self.carried, return_state=True)
            self.carried = self.model.detach_state(state)
        else:
            logits = self._forward(x)  # (B, L, 256)
        return nll_sum(logits, y)

    def _train_step(
        self, x: torch.Tensor, y: torch.Tensor | None
    ) -> tuple[float, float, float] | None:
        """One optimiser step. Returns (global loss sum, global count, global samples), or None
        when the window has no targets. The loss is the summed loss / GLOBAL count, times world
        (DDP averages gradients over ranks), so gradients match one process."""
        x = x.to(self.device, non_blocking=True)
        if self.kind == "ar":
            y = y.to(self.device, non_blocking=True)
            count = float(n_targets(y))
        else:
            count = float(x.shape[0])
        (total,) = self._global(count)
        if total == 0:
            return None
        with self._autocast():
            loss_sum = self._loss_sum(x, y, count)
        self.opt.zero_grad(set_to_none=True)
        (loss_sum * (self.dist.world / total)).backward()
        g_sum, _ = self._global(float(loss_sum.detach()), count)
        if not math.isfinite(g_sum):
            self._non_finite("training loss", g_sum)
        self._clip_gradients()
        self.opt.step()
        if not is_plateau(self.sched):
            self.sched.step()
        return g_sum, total, total if self.kind == "ar" else total * x.shape[-1]

    def _clip_gradients(self) -> None:
        if not self.tc.clip_grad:
            return
        if self.tc.clip_mode == "value":
            nn.utils.clip_grad_value_(self.model.parameters(), self.tc.clip_grad)
            return
        gnorm = nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.clip_grad)
        if not torch.isfinite(gnorm):
            self._non_finite("gradient norm", float(gnorm))

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
        n, B = len(self.val_set), self.tc.batch_size
        order = [np.arange(i, min(i + B, n)) for i in range(0, n, B)]
        if self.tc.val_batches:
            order = order[: self.tc.val_batches]
        batches = [b for b in (shard(o, self.dist) for o in order) if b]
        loss_sum, count = 0.0, 0.0
        fork = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork):
            torch.manual_seed(self.seed + 12345)  # the same noise at every validation
            for batch in self._loader(self.val_set, batches):
                s, c = self._val_batch(batch)
                loss_sum, count = loss_sum + s, count + c
        self.model.train()
        loss_sum, count = self._global(loss_sum, count)
        return loss_sum / count if count else None

    def _val_batch(self, batch) -> tuple[float, float]:
        """(summed loss, count) of one validation batch, uncropped start, no carried state."""
        if self.kind == "ar":
            x, y = ar_window(*batch, self.context, self.tc.max_length, self.multiple)
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = self.model(x)  # (B, L, 256)
            return float(nll_sum(logits, y)), float(n_targets(y))
        x = batch
        if self.tc.max_length:
            x, _ = crop(x, None, 0, self.tc.max_length, None)
        x = x.to(self.device)
        with self._autocast():
            return float(self.model.training_loss(x)) * x.shape[0], float(x.shape[0])

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
        targets = []
        if periodic:
            targets += [self.ckpt_dir / f"step-{self.step}.pt", self.ckpt_dir / "last.pt"]
        if best:
            targets.append(self.ckpt_dir / "best.pt")
        write_checkpoint(state, targets)
        if periodic:
            prune_steps(self.ckpt_dir, self.tc.keep_last)
            if self.tracker is not None:
                self.tracker.log_checkpoint_path(self.ckpt_dir / "last.pt")

    def _restore(self) -> bool:
        """Load last.pt if resuming; False when starting fresh."""
        raw = dict(self.run.raw, model={"name": self.run.model_name, **self.run.model})
        ckpt = open_last(
            self.ckpt_dir / "last.pt",
            self.resume,
            raw,
            self.ds_config,
            self.run.key,
            self.dist.is_main,
        )
        if ckpt is None:
            return False
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.step, self.epoch = int(ckpt["step"]), int(ckpt["epoch"])
        self.batch_in_epoch = int(ckpt.get("batch_in_epoch", 0))
        self.chunk = int(ckpt.get("chunk", 0))
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

    def _lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def _init_outputs(self, resumed: bool) -> None:
        if not self.dist.is_main:
            return
        import yaml

        from sashimi.io import atomic_write

        self.run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.run_dir / "config.yaml", "w") as f:
            f.write(f"# resolved configuration of run {self.run.key} (scale {self.P.scale})\n")
            yaml.safe_dump(dict(self.run.raw, key=self.run.key), f, sort_keys=False)
        if not resumed:
            clear_checkpoints(self.ckpt_dir)
        start_log(self.run_dir / "train_log.csv", resumed, self.step)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train until a budget is used up (counted over resumes); returns a summary."""
        self._start()
        status = "FAILED"
        try:
            self.model.train()
            while not self._stop:
                self._train_epoch()
            if self.step and not (self.ckpt_dir / "last.pt").is_file():
                self.save(periodic=True, best=False)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.bar.close()
            if self.tracker is not None:
                self.tracker.close(status)
        return self._summary()

    def _start(self) -> None:
        """Resume or start fresh, open the outputs, the tracker and the progress display."""
        self._t0 = time.monotonic()
        resumed = self._restore()
        self._t0 = time.monotonic()
        self.dist.barrier()  # every rank has read last.pt before a fresh start deletes it
        self._init_outputs(resumed)
        self.dist.barrier()
        if self.dist.is_main:
            from sashimi.tracking import training_tracker

            self.tracker = training_tracker(
                self.P, self.run, root=self.root, resumed=resumed, n_params=self.n_params
            )
        total = self.tc.max_steps
        if total is None and self.tc.max_epochs:
            total = self.tc.max_epochs * self.n_batches
        enabled = self.dist.is_main and progress_wanted(self.progress)
        self.bar = Progress(self.run.key, total, self.step, enabled)
        log_path = self.run_dir / "train_log.csv"
        self.log = RunLog(log_path, self.kind, self.tracker, self.bar, self.dist.is_main)
        if self.dist.is_main and resumed:
            print(
                f"resuming {self.run.key} from step {self.step} (epoch {self.epoch})",
                file=sys.stderr,
            )
        self._stop = self._budget_reached()

    def _train_epoch(self) -> None:
        """The rest of the current epoch, from `batch_in_epoch` (and `chunk`) on."""
        batches = epoch_batches(len(self.train_set), self.tc.batch_size, self.seed, self.epoch)
        start = self.batch_in_epoch
        if start < len(batches):
            rest = [shard(b, self.dist) for b in batches[start:]]
            for bi, batch in enumerate(self._loader(self.train_set, rest), start=start):
                self._train_batch(bi, batch, last_batch=bi + 1 == len(batches))
                if self._stop:
                    return
                self.chunk, self.carried = 0, None
        self.epoch, self.batch_in_epoch, self.chunk = self.epoch + 1, 0, 0

    def _train_batch(self, bi: int, batch, last_batch: bool) -> None:
        """Every remaining window of batch `bi`: one optimiser step each."""
        windows = self._windows(batch, bi)
        if self.chunk == 0:
            self.carried = None
        for ci in range(self.chunk, len(windows)):
            out = self._train_step(*windows[ci])
            last_window = ci + 1 == len(windows)
            self.batch_in_epoch, self.chunk = (bi + 1, 0) if last_window else (bi, ci + 1)
            if out is None:
                continue
            self._after_step(out, end_of_epoch=last_batch and last_window)
            if self._stop:
                return

    def _after_step(self, out: tuple[float, float, float], end_of_epoch: bool) -> None:
        """Bookkeeping after an optimiser step: budget, log, validation, checkpoints."""
        self.step += 1
        self.log.add(*out)
        self._stop = self._budget_reached()
        if self.step % self.tc.log_every == 0 or self._stop:
            self.log.report(self.step, self._lr(), self.elapsed(), self.device)
        best = self._maybe_validate(end_of_epoch)
        periodic = self.step % self.tc.ckpt_every == 0 or self._stop
        if periodic or best:
            self.save(periodic=periodic, best=best)

    def _maybe_validate(self, end_of_epoch: bool) -> bool:
        """Validate when scheduled (every `val_every` steps, or at the end of each epoch with
        `val_every: epoch`) or when the run stops; True when this is the best loss so far.
        Only scheduled validations step the plateau schedule, so a run stopped by a budget and
        extended later follows the same schedule as one that ran straight through."""
        every = self.tc.val_every
        scheduled = end_of_epoch if every == "epoch" else self.step % every == 0
        if not scheduled and not (self._stop and self.last_val_step != self.step):
            return False
        val = self.validate()
        self.last_val_step = self.step
        if val is None:
            return False
        if not math.isfinite(val):
            self._non_finite("validation loss", val)
        self.log.row(self.step, "validation", val, self._lr(), self.elapsed(), None)
        if scheduled and is_plateau(self.sched):
            self.sched.step(val)
        if val < self.best_val:
            self.best_val = val
            return True
        return False

    def _epochs_done(self) -> int:
        return self.epoch + (1 if self.batch_in_epoch >= self.n_batches else 0)

    def _budget_reached(self) -> bool:
        """Step, epoch or time budget used up; ranks agree (rank 0's clock decides)."""
        tc = self.tc
        done = tc.max_steps is not None and self.step >= tc.max_steps
        done = done or (tc.max_epochs is not None and self._epochs_done() >= tc.max_epochs)
        if tc.max_minutes and not done:
            late = self.elapsed() >= tc.max_minutes * 60
            flag = torch.tensor([1.0 if late else 0.0], device=self.device)
            if self.dist.enabled:  # rank 0 decides
                if not self.dist.is_main:
                    flag.zero_()
                self.dist.all_reduce(flag, "max")
            done = bool(flag.item() > 0)
        return bool(done)

    def _summary(self) -> dict:
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
