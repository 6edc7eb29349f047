"""What a training run reports while it runs: `train_log.csv` rows, MLflow metrics, and a
progress bar (or plain lines when stderr is not a terminal)."""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path

import torch

from sashimi.ar_loss import LN2
from sashimi.io import atomic_write

LOG_FIELDS = ("step", "split", "loss", "bits_per_sample", "lr", "tokens_per_s", "elapsed_s")


def start_log(path: Path, resumed: bool, step: int) -> None:
    """(Re)write the CSV header; on resume keep the rows up to `step` (a killed run may have
    logged past its last checkpoint)."""
    rows: list[dict] = []
    if resumed and path.is_file():
        with open(path, newline="") as f:
            rows = [
                r
                for r in csv.DictReader(f)
                if r.get("step", "").isdigit() and int(r["step"]) <= step
            ]
    with atomic_write(path, "w") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in LOG_FIELDS} for r in rows)


def append_row(path: Path, row: dict) -> None:
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow(row)


def progress_wanted(progress: bool | None) -> bool:
    """False when the caller or $SASHIMI_PROGRESS=0 turns progress output off."""
    return progress is not False and os.environ.get("SASHIMI_PROGRESS", "1") != "0"


class Progress:
    """A tqdm bar on a terminal, else one plain line per logged window (for log files)."""

    def __init__(self, key: str, total: int | None, initial: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.key = key
        tty = sys.stderr.isatty()
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=key,
            unit="step",
            dynamic_ncols=True,
            disable=not (enabled and tty),
            leave=False,
        )
        self.lines = enabled and not tty

    def update(self) -> None:
        self.bar.update(1)

    def show(self, step: int, postfix: dict[str, str]) -> None:
        self.bar.set_postfix(postfix)
        if self.lines:
            text = " ".join(f"{k} {v}" for k, v in postfix.items())
            print(f"{self.key} step {step}: {text}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


class RunLog:
    """The rows, metrics and progress of one run; a no-op off rank 0 (`enabled` False).
    Training rows report the mean loss and throughput since the previous training row."""

    def __init__(self, path: Path, kind: str, tracker, bar: Progress, enabled: bool) -> None:
        self.path, self.kind, self.tracker, self.bar, self.enabled = (
            path,
            kind,
            tracker,
            bar,
            enabled,
        )
        self._reset()

    def _reset(self) -> None:
        self.loss_sum, self.count, self.tokens, self.t0 = 0.0, 0.0, 0.0, time.monotonic()

    def add(self, loss_sum: float, count: float, tokens: float) -> None:
        """One optimiser step's global loss sum, loss count and samples."""
        self.loss_sum, self.count, self.tokens = (
            self.loss_sum + loss_sum,
            self.count + count,
            self.tokens + tokens,
        )
        self.bar.update()

    def row(
        self, step: int, split: str, loss: float, lr: float, elapsed: float, per_s: float | None
    ) -> None:
        """A train_log.csv row (bits per sample for AR runs) and the same MLflow metrics."""
        if not self.enabled:
            return
        bits = loss / LN2 if self.kind == "ar" else None
        row = {
            "step": step,
            "split": split,
            "loss": f"{loss:.6f}",
            "bits_per_sample": "" if bits is None else f"{bits:.6f}",
            "lr": f"{lr:.6g}",
            "tokens_per_s": "" if per_s is None else f"{per_s:.1f}",
            "elapsed_s": f"{elapsed:.2f}",
        }
        append_row(self.path, row)
        if self.tracker is not None:
            m = {f"{split}/loss": loss, "lr": lr}
            if bits is not None:
                m[f"{split}/bits_per_sample"] = bits
            if per_s is not None:
                m["tokens_per_s"] = per_s
            self.tracker.log_metrics(m, step=step)

    def report(self, step: int, lr: float, elapsed: float, device: torch.device) -> None:
        """The training row of the steps since the last report, and the progress display."""
        dt = max(time.monotonic() - self.t0, 1e-9)
        loss = self.loss_sum / max(self.count, 1)
        self.row(step, "train", loss, lr, elapsed, self.tokens / dt)
        postfix = {"loss": f"{loss:.4f}"}
        if self.kind == "ar":
            postfix["bits"] = f"{loss / LN2:.3f}"
        postfix["tok/s"] = f"{self.tokens / dt:.0f}"
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            postfix["gpu_mem"] = f"{peak:.2f}GB"
            if self.tracker is not None:
                self.tracker.log_metrics({"gpu_peak_mem_gb": peak}, step=step)
        self.bar.show(step, postfix)
        self._reset()
