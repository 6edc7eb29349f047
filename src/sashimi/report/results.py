"""What one run left in `results/runs/<run>/`: metrics.json, bench.json, train_log.csv and
its samples, with the fallbacks the tables use (e.g. training speed from the train log)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sashimi.config import RunConfig
from sashimi.errors import UserError
from sashimi.report.cells import num


@dataclass
class RunResult:
    run: RunConfig
    metrics: dict
    bench: dict
    log: list[dict]  # train_log.csv rows
    samples: list[Path]
    sample_summary: dict = field(default_factory=dict)  # samples/summary.json, if written

    @property
    def finished(self) -> bool:
        return bool(self.metrics)

    def get(self, key: str) -> float | None:
        """A number from metrics.json, else bench.json, else samples/summary.json; else None.
        Training speed falls back to what the trainer measured in train_log.csv."""
        for source in (self.metrics, self.bench, self.sample_summary):
            v = num(source.get(key))
            if v is not None:
                return v
        if key == "tokens_per_s":
            return self._median([num(r.get("tokens_per_s")) for r in self._train_rows()])
        if key == "train_seconds_per_step":
            return self.seconds_per_step()
        return None

    def _train_rows(self) -> list[dict]:
        return [r for r in self.log if r.get("split") == "train"]

    @staticmethod
    def _median(values: list[float | None]) -> float | None:
        v = [x for x in values if x is not None]
        return float(np.median(v)) if v else None

    def seconds_per_step(self) -> float | None:
        """Median wall seconds per optimiser step between consecutive train log rows with no
        validation in between (train_log.csv `elapsed_s`)."""
        rates, prev = [], None
        for r in self.log:
            if r.get("split") != "train":
                prev = None
                continue
            step, t = num(r.get("step")), num(r.get("elapsed_s"))
            if prev is not None and step is not None and t is not None and step > prev[0]:
                rates.append((t - prev[1]) / (step - prev[0]))
            prev = (step, t) if step is not None and t is not None else None
        return self._median(rates)

    @property
    def steps(self) -> int | None:
        steps = [num(r.get("step")) for r in self.log]
        steps = [s for s in steps if s is not None]
        return int(max(steps)) if steps else None

    @property
    def minutes(self) -> float | None:
        t = [num(r.get("elapsed_s")) for r in self.log]
        t = [s for s in t if s is not None]
        return max(t) / 60 if t else None

    def best_val(self) -> float | None:
        v = [
            num(r.get("bits_per_sample"))
            for r in self.log
            if r.get("split") in ("val", "validation")
        ]
        v = [x for x in v if x is not None]
        return min(v) if v else None

    def params_m(self) -> float | None:
        p = self.get("params")
        return p / 1e6 if p is not None else None


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    return obj if isinstance(obj, dict) else {}


def read_log(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def collect(run: RunConfig) -> RunResult:
    d = run.run_dir
    return RunResult(
        run=run,
        metrics=read_json(d / "metrics.json"),
        bench=read_json(d / "bench.json"),
        log=read_log(d / "train_log.csv"),
        samples=sorted((d / "samples").glob("*.wav")),
        sample_summary=read_json(d / "samples" / "summary.json"),
    )
