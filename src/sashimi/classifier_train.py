"""Training the SC09 digit classifier: `sashimi train --run classifier-sc09`.

The recipe (SPEC "SC09 evaluation protocol"; every number in the run's params.yaml block): SGD
with momentum and weight decay, ReduceLROnPlateau on the validation loss, class-balanced
sampling, waveform augmentation (`train.augment`). It validates once per epoch, after
re-estimating the BatchNorm statistics on `train.precise_bn_batches` clean training batches
("precise BN", `recalibrate_bn`; 0 keeps the running averages, as the official recipe does).
best.pt is the best validation accuracy (ties by loss). Budgets `max_epochs`, `max_steps` and
`max_minutes` count over resumes; a budget that stops an epoch early still validates and saves
it, and a resumed run starts the next epoch.

Its loop is its own (labelled clips, augmentation, one validation per epoch); the run
configuration, RNG state, atomic checkpoints, the resume rule (`resume.open_last`) and the
MLflow mirror (`tracking.training_tracker`) are the generative trainer's.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from sashimi.checkpoints import checkpoint_dir
from sashimi.classifier import (
    MODEL_NAME,
    N_CLASSES,
    SAMPLE_RATE,
    DigitClassifier,
    count_parameters,
    load_classifier,
)
from sashimi.classifier_accuracy import evaluate_accuracy
from sashimi.classifier_data import LabelledWaves, labelled_split, split_exists
from sashimi.data.datasets import load_split
from sashimi.errors import UserError
from sashimi.io import atomic_write, read_audio
from sashimi.resume import clear_checkpoints, open_last, write_checkpoint
from sashimi.rng import rng_state, seed_everything, set_rng_state

if TYPE_CHECKING:
    from sashimi.tracking import Tracker

LOG_COLUMNS = ["step", "epoch", "split", "loss", "accuracy", "lr", "elapsed_s"]


# ============================================================================ augmentation
class Augment:
    """Waveform augmentations (SPEC: amplitude, speed/pitch, time shift, background noise).

    Each is applied to a random half of the batch (probability `p`), per example:
    - amplitude: gain ~ U[gain_range];
    - speed and pitch together, by resampling: y(t) = x(s t), s ~ U[1 - max_speed, 1 + max_speed]
      (linear interpolation, zero outside the clip);
    - time shift by ~ U[-max_shift_s, max_shift_s] seconds (zero fill);
    - background noise at SNR ~ U[snr_db]: from `noise_bank` clips (e.g. Speech Commands'
      _background_noise_), random 1 s segments, or else synthetic coloured noise with power
      spectrum ~ f^-beta, beta ~ U[0, 2] (white to brown).
    Random draws use a CPU generator (seeded, checkpointed); the maths runs on wav's device.
    """

    def __init__(
        self,
        seed: int = 0,
        p: float = 0.5,
        gain_range: tuple[float, float] = (0.7, 1.1),
        max_speed: float = 0.2,
        max_shift_s: float = 0.2,
        snr_db: tuple[float, float] = (0.0, 30.0),
        noise_bank: np.ndarray | None = None,
        sample_rate: int = SAMPLE_RATE,
    ):
        self.p, self.gain_range, self.max_speed = p, gain_range, max_speed
        self.max_shift = max_shift_s * sample_rate
        self.snr_db, self.noise_bank = snr_db, noise_bank
        self.generator = torch.Generator().manual_seed(seed)

    def _u(self, B: int, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(B, generator=self.generator, dtype=torch.float64)

    def _on(self, B: int) -> torch.Tensor:
        return torch.rand(B, generator=self.generator) < self.p

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        B, L = wav.shape
        dev = wav.device
        gain = torch.where(
            self._on(B), self._u(B, *self.gain_range), torch.ones(B, dtype=torch.float64)
        )
        speed = torch.where(
            self._on(B),
            self._u(B, 1 - self.max_speed, 1 + self.max_speed),
            torch.ones(B, dtype=torch.float64),
        )
        shift = torch.where(
            self._on(B),
            self._u(B, -self.max_shift, self.max_shift),
            torch.zeros(B, dtype=torch.float64),
        )
        # y(t) = x(s (t - shift)): one linear-interpolation gather for speed/pitch and shift
        t = torch.arange(L, dtype=torch.float64)
        pos = (speed[:, None] * (t[None, :] - shift[:, None])).to(dev)  # (B, L)
        i0 = torch.floor(pos)
        frac = (pos - i0).to(wav.dtype)
        i0 = i0.long()
        x0 = wav.gather(1, i0.clamp(0, L - 1)) * ((i0 >= 0) & (i0 < L))  # (B, L)
        x1 = wav.gather(1, (i0 + 1).clamp(0, L - 1)) * ((i0 + 1 >= 0) & (i0 + 1 < L))
        y = (1 - frac) * x0 + frac * x1
        y = y * gain.to(dev, wav.dtype)[:, None]
        noisy = self._on(B)
        if noisy.any():
            idx = noisy.nonzero().squeeze(1)
            noise = self._noise(len(idx), L).to(dev, wav.dtype)  # (b, L)
            snr = self._u(len(idx), *self.snr_db).to(dev, wav.dtype)
            p_sig = y[idx].pow(2).mean(1).clamp_min(1e-8)  # (b,)
            p_noise = noise.pow(2).mean(1).clamp_min(1e-12)
            scale = torch.sqrt(p_sig / (p_noise * 10 ** (snr / 10)))
            y = y.index_add(0, idx, noise * scale[:, None])
        return y.clamp(-1.0, 1.0)

    def _noise(self, b: int, L: int) -> torch.Tensor:
        if self.noise_bank is not None and len(self.noise_bank):
            out = torch.zeros(b, L)
            for k in range(b):
                clip = self.noise_bank[
                    int(torch.randint(len(self.noise_bank), (1,), generator=self.generator))
                ]
                start = int(
                    torch.randint(max(1, len(clip) - L + 1), (1,), generator=self.generator)
                )
                seg = torch.as_tensor(np.asarray(clip[start : start + L], dtype=np.float32))
                out[k, : len(seg)] = seg
            return out
        white = torch.randn(b, L, generator=self.generator)  # (b, L)
        beta = self._u(b, 0.0, 2.0).float()
        f = torch.fft.rfftfreq(L).clamp_min(1.0 / L)  # (L//2+1,)
        shaped = torch.fft.rfft(white) * f[None, :] ** (-beta[:, None] / 2)
        return torch.fft.irfft(shaped, n=L)  # (b, L)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, s: torch.Tensor) -> None:
        self.generator.set_state(s)


def load_noise_dir(noise_dir: str | Path) -> list[np.ndarray]:
    """Every .wav under `noise_dir`, at 16 kHz (for the background-noise augmentation)."""
    files = sorted(Path(noise_dir).rglob("*.wav"))
    if not files:
        raise UserError(f"{noise_dir}: no .wav files for background noise")
    out = []
    for f in files:
        x, sr = read_audio(f)
        t = torch.from_numpy(x)
        if sr != SAMPLE_RATE:
            t = torchaudio.functional.resample(t, sr, SAMPLE_RATE)
        out.append(t.numpy())
    return out


def recalibrate_bn(
    model: nn.Module,
    data: torch.utils.data.Dataset,
    n_batches: int,
    batch_size: int,
    seed: int,
    device: str | torch.device = "cpu",
) -> None:
    """Re-estimate every BatchNorm's running mean/var as the plain average over `n_batches`
    random clean batches of `data` with the current weights ("precise BN").

    The exponential running averages lag the weights while the learning rate is high, and on
    small data eval-mode accuracy can then fall far below train-mode accuracy (seen on FSDD:
    53% vs 95% on validation; 93% after recalibration). Only BN buffers change."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or n_batches <= 0:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    subset = torch.utils.data.Subset(data, idx[: n_batches * batch_size].tolist())
    was_training = model.training
    model.train()
    with torch.no_grad():
        for x, _ in torch.utils.data.DataLoader(subset, batch_size=batch_size):
            model(x.to(device))
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    model.train(was_training)


# ============================================================================ the loop
class ClassifierTrainer:
    """Trains a DigitClassifier(**model_kwargs) with the TrainConfig `tc`. With `ckpt_dir`,
    writes last.pt (every epoch; resumed from) and best.pt there, and train_log.csv beside
    them. `config` is the run configuration saved in checkpoints and compared on resume (by
    default the model and `tc`). `tracking(resumed, n_params)`, when given, opens the run's
    MLflow mirror (a started `sashimi.tracking.Tracker`) once the trainer knows whether it
    resumed; every epoch's metrics and checkpoints go there, and it is closed with the run's
    status."""

    def __init__(
        self,
        train_set: LabelledWaves,
        val_set: LabelledWaves,
        tc,
        model_kwargs: dict,
        *,
        ckpt_dir: str | Path | None = None,
        config: dict | None = None,
        dataset: dict | None = None,
        key: str = "classifier",
        resume: bool | None = None,
        noise_bank: Sequence[np.ndarray] | None = None,
        device: str | torch.device | None = None,
        log: Callable[[str], None] | None = print,
        tracking: Callable[[bool, int], Tracker] | None = None,
    ) -> None:
        where = f"runs.{key}.train"
        if tc.optimizer != "sgd":
            raise UserError(f"{where}.optimizer: the classifier trains with 'sgd'")
        if tc.scheduler != "plateau":
            raise UserError(f"{where}.scheduler: the classifier trains with 'plateau'")
        if tc.max_epochs is None and tc.max_steps is None and not tc.max_minutes:
            raise UserError(f"{where}: give a budget (max_epochs, max_steps or max_minutes)")
        self.tc, self.train_set, self.val_set = tc, train_set, val_set
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.log = log or (lambda s: None)
        self.key, self.dataset, self.resume = key, dataset, resume
        self.config = config or {
            "kind": "classifier",
            "model": {"name": MODEL_NAME, **model_kwargs},
            "train": dataclasses.asdict(tc),
        }
        seed_everything(tc.seed)
        try:
            self.model = DigitClassifier(**model_kwargs).to(self.device)
        except TypeError as e:
            raise UserError(f"runs.{key}.model: {e}") from None
        self.opt = torch.optim.SGD(
            self.model.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay
        )
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.opt, mode="min", factor=tc.factor, patience=tc.patience
        )
        self.loader = self._balanced_loader()
        self.aug = Augment(seed=tc.seed + 1, noise_bank=noise_bank) if tc.augment else None
        self.ckpt_dir = None if ckpt_dir is None else Path(ckpt_dir)
        self.epoch, self.step, self.elapsed_prev = 0, 0, 0.0
        self.best_val, self.rows = (-1.0, math.inf), []
        self.best_state: dict | None = None
        self.tracking, self.tracker = tracking, None

    def _balanced_loader(self) -> torch.utils.data.DataLoader:
        """Class-balanced sampling with replacement, one epoch = len(train_set) draws."""
        targets = self.train_set.targets()
        if np.any((targets < 0) | (targets >= N_CLASSES)):
            raise UserError(
                f"training labels must be digits 0-9, got {sorted(set(targets.tolist()))[:5]}..."
            )
        counts = np.bincount(targets, minlength=N_CLASSES).astype(np.float64)
        weights = 1.0 / np.maximum(counts[targets], 1.0)  # (N,)
        self.sampler_gen = torch.Generator().manual_seed(self.tc.seed)
        sampler = torch.utils.data.WeightedRandomSampler(
            torch.as_tensor(weights), len(targets), replacement=True, generator=self.sampler_gen
        )
        return torch.utils.data.DataLoader(
            self.train_set,
            batch_size=self.tc.batch_size,
            sampler=sampler,
            num_workers=self.tc.num_workers,
            drop_last=len(targets) > self.tc.batch_size,
        )

    @property
    def log_path(self) -> Path:
        d = self.ckpt_dir
        return (d.parent if d.name == "checkpoints" else d) / "train_log.csv"

    def _restore(self) -> bool:
        """Load last.pt if resuming; False when starting fresh."""
        if self.ckpt_dir is None:
            return False
        last = self.ckpt_dir / "last.pt"
        ck = open_last(last, self.resume, self.config, self.dataset, self.key)
        if ck is None:  # a fresh start leaves no stale best.pt behind
            clear_checkpoints(self.ckpt_dir)
            return False
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.epoch, self.step, self.elapsed_prev = ck["epoch"], ck["step"], ck["elapsed_s"]
        self.best_val, self.rows = tuple(ck["best_val"]), list(ck.get("log", []))
        set_rng_state(ck["rng"]["global"])
        self.sampler_gen.set_state(ck["rng"]["sampler"])
        if self.aug is not None and ck["rng"].get("augment") is not None:
            self.aug.set_state(ck["rng"]["augment"])
        self.log(f"resumed from {last} at epoch {self.epoch}, step {self.step}")
        return True

    def _budget_left(self) -> bool:
        tc = self.tc
        if tc.max_minutes and self.elapsed() >= 60 * tc.max_minutes:
            return False
        return tc.max_steps is None or self.step < tc.max_steps

    def elapsed(self) -> float:
        return self.elapsed_prev + time.monotonic() - self._t0

    def fit(self) -> DigitClassifier:
        """Train until a budget is used up; returns the best model (eval mode)."""
        resumed = self._restore()
        self._t0 = time.monotonic()
        if self.tracking is not None:
            self.tracker = self.tracking(resumed, count_parameters(self.model))
        status = "FAILED"
        try:
            while self._budget_left() and (
                self.tc.max_epochs is None or self.epoch < self.tc.max_epochs
            ):
                stats = self._train_epoch()
                self.epoch += 1
                self._end_epoch(*stats)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if self.tracker is not None:
                self.tracker.close(status)
        if self.ckpt_dir is not None and (self.ckpt_dir / "best.pt").is_file():
            return load_classifier(self.ckpt_dir / "best.pt", map_location=self.device)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return self.model.eval()

    def _train_epoch(self) -> tuple[float, int, int]:
        """One pass over the balanced sampler (or less, at a budget): (loss sum, clips, correct)."""
        self.model.train()
        tot, n_seen, correct = 0.0, 0, 0
        for x, y in self.loader:
            x, y = x.to(self.device), y.to(self.device)
            if self.aug is not None:
                x = self.aug(x)  # (B, 16000)
            logits = self.model(x)  # (B, 10)
            loss = F.cross_entropy(logits, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.step += 1
            tot += loss.item() * len(y)
            n_seen += len(y)
            correct += int((logits.argmax(-1) == y).sum())
            if not self._budget_left():
                break
        return tot, n_seen, correct

    def _end_epoch(self, tot: float, n_seen: int, correct: int) -> None:
        """Precise BN, validation, plateau step, log rows, checkpoints."""
        tc = self.tc
        recalibrate_bn(
            self.model, self.train_set, tc.precise_bn_batches, tc.batch_size,
            tc.seed + self.epoch, self.device,
        )  # fmt: skip
        val_loss, val_acc, _, _ = evaluate_accuracy(self.model, self.val_set, device=self.device)
        self.sched.step(val_loss)
        now, lr = self.elapsed(), self.opt.param_groups[0]["lr"]
        train_loss, train_acc = tot / max(n_seen, 1), correct / max(n_seen, 1)
        common = dict(step=self.step, epoch=self.epoch)
        self.rows += [
            dict(common, split="train", loss=train_loss, accuracy=train_acc, lr=lr, elapsed_s=now),
            dict(common, split="validation", loss=val_loss, accuracy=val_acc, lr=lr, elapsed_s=now),
        ]
        self.log(
            f"epoch {self.epoch} step {self.step}: train loss {train_loss:.4f} "
            f"acc {train_acc:.4f} | val loss {val_loss:.4f} acc {val_acc:.4f} "
            f"| lr {lr:.2e} | {now:.0f}s"
        )
        improved = (val_acc, -val_loss) > (self.best_val[0], -self.best_val[1])
        if improved:
            self.best_val = (val_acc, val_loss)
        if self.ckpt_dir is None:
            if improved:
                self.best_state = {
                    k: v.detach().clone() for k, v in self.model.state_dict().items()
                }
            return
        paths = [self.ckpt_dir / "best.pt"] if improved else []
        write_checkpoint(self._state(now, val_acc, val_loss), [*paths, self.ckpt_dir / "last.pt"])
        _write_log(self.log_path, self.rows)
        self._mirror(self.rows[-2:], improved)

    def _mirror(self, rows: list[dict], improved: bool) -> None:
        """The epoch's train and validation rows as MLflow metrics (step = optimiser step), and
        the checkpoints just written: `checkpoint` (last.pt), `best_checkpoint` (best.pt)."""
        if self.tracker is None:
            return
        metrics = {"epoch": self.epoch, "lr": rows[-1]["lr"]}
        for r in rows:  # split: train, validation
            metrics[f"{r['split']}/loss"] = r["loss"]
            metrics[f"{r['split']}/accuracy"] = r["accuracy"]
        self.tracker.log_metrics(metrics, step=self.step)
        self.tracker.log_checkpoint_path(self.ckpt_dir / "last.pt")
        if improved:
            self.tracker.set_tag("best_checkpoint", (self.ckpt_dir / "best.pt").resolve())

    def _state(self, now: float, val_acc: float, val_loss: float) -> dict:
        return dict(
            model=self.model.state_dict(),
            optimizer=self.opt.state_dict(),
            scheduler=self.sched.state_dict(),
            rng=dict(
                {"global": rng_state(), "sampler": self.sampler_gen.get_state()},
                augment=self.aug.state() if self.aug else None,
            ),
            step=self.step,
            epoch=self.epoch,
            best_val=list(self.best_val),
            elapsed_s=now,
            config=self.config,
            dataset_config=self.dataset,
            model_name=MODEL_NAME,
            model_kwargs=dict(self.model.config),
            kind="classifier",
            val_accuracy=val_acc,
            val_loss=val_loss,
            log=self.rows,
        )


def train_classifier(
    train_set: LabelledWaves, val_set: LabelledWaves, tc, model_kwargs: dict, **kwargs
) -> DigitClassifier:
    """`ClassifierTrainer(...).fit()`: the best model, in eval mode."""
    return ClassifierTrainer(train_set, val_set, tc, model_kwargs, **kwargs).fit()


def _write_log(path: Path, rows: list[dict]) -> None:
    with atomic_write(path, "w") as f:
        w = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def train_val_split(
    prepared_dir: Path, seed: int, log: Callable[[str], None]
) -> tuple[LabelledWaves, LabelledWaves]:
    """The prepared train and validation splits (without a validation split: a seeded 10%
    of train held out)."""
    train = labelled_split(prepared_dir, "train")
    if len(train) == 0:
        raise UserError(f"{prepared_dir}: the train split is empty")
    if split_exists(prepared_dir, "validation") and len(load_split(prepared_dir, "validation")):
        return train, labelled_split(prepared_dir, "validation")
    perm = np.random.RandomState(seed).permutation(len(train))
    n_val = max(1, len(train) // 10)
    log(f"{prepared_dir}: no validation split; holding out {n_val} train clips for validation")
    return (
        LabelledWaves(train.source, train.labels, indices=np.sort(perm[n_val:])),
        LabelledWaves(train.source, train.labels, indices=np.sort(perm[:n_val])),
    )


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_classifier_run(P, run, *, device: torch.device, resume: bool | None = None) -> dict:
    """Train the classifier run `run` of params `P` (mirrored to MLflow like every training
    run); returns a summary dict."""
    from sashimi.tracking import training_tracker

    ds = P.dataset(run.dataset)
    prepared = Path(ds.prepared_dir)
    if not (prepared / "train.offsets.npy").is_file():
        raise UserError(
            f"{prepared}: dataset {ds.key!r} is not prepared (run `sashimi prepare --key {ds.key}`)"
        )
    train_set, val_set = train_val_split(prepared, run.train.seed, _log)
    noise = load_noise_dir(run.train.noise_dir) if run.train.noise_dir else None
    ckpt_dir = checkpoint_dir(run.run_dir)
    root = Path(P.path).resolve().parent  # the store beside params.yaml, as for every run
    trainer = ClassifierTrainer(
        train_set,
        val_set,
        run.train,
        dict(run.model),
        ckpt_dir=ckpt_dir,
        config=dict(run.raw, key=run.key),
        dataset=dataclasses.asdict(ds),
        key=run.key,
        resume=resume,
        noise_bank=noise,
        device=device,
        log=_log,
        tracking=lambda resumed, n_params: training_tracker(
            P, run, root=root, resumed=resumed, n_params=n_params
        ),
    )
    model = trainer.fit()
    _log(f"best checkpoint: {ckpt_dir / 'best.pt'} ({count_parameters(model):,} parameters)")
    return {
        "run": run.key,
        "step": trainer.step,
        "epoch": trainer.epoch,
        "best_val_accuracy": trainer.best_val[0],
        "best_val_loss": trainer.best_val[1],
        "checkpoint": str(ckpt_dir / "best.pt"),
        "n_params": count_parameters(model),
    }
