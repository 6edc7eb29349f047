"""MLflow mirror of a run: params, metrics, git commit, checkpoint path, a few audio clips.

The pipeline never reads from MLflow; `train_log.csv` and `metrics.json` are the record. So
tracking must never cost a run: every call is failure-safe, and after a persistent failure
the tracker warns once and turns itself off for the rest of the job.

Store `$MLFLOW_TRACKING_URI`, else `sqlite:///<root>/mlflow.db` beside params.yaml; experiment
`$SASHIMI_MLFLOW_EXPERIMENT` (default "sashimi"); run name = run key. The run id is kept in
`<run_dir>/mlflow_run.json`, so resumed training, sampling and evaluation add to one MLflow
run. The MLflow calls, and the processes that make them, live in `sashimi.tracking_worker`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from sashimi.tracking_worker import (
    _WAIT_S,
    EXPERIMENT,
    _Channel,
    _Session,
    daemon_address,
    default_tracking_uri,
    git_commit,
)

__all__ = [
    "EXPERIMENT",
    "MODES",
    "Tracker",
    "daemon_address",
    "default_tracking_uri",
    "git_commit",
    "tracking_enabled",
    "tracking_mode",
    "training_tracker",
]


def tracking_enabled() -> bool:
    return os.environ.get("SASHIMI_TRACKING", "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )


MODES = ("shared", "worker", "inprocess")


def tracking_mode() -> str:
    """Where MLflow calls run: SASHIMI_TRACKING=worker / inprocess, else "shared"."""
    mode = os.environ.get("SASHIMI_TRACKING", "1").strip().lower()
    return mode if mode in MODES else "shared"


class Tracker:
    """One MLflow run for one run key. Use as a context manager; every method is failure-safe.

    >>> with Tracker("sashimi-sc09", P.flat("sashimi-sc09"), run_dir=run.run_dir) as tr:
    ...     tr.log_metrics({"train/loss": 1.2}, step=10)

    `mode` (default from SASHIMI_TRACKING) says where the MLflow calls run: "shared" (default),
    a daemon shared by the jobs of this store (`tracking_worker._daemon`, falling back to
    "worker"), so MLflow is imported once per DAG (docs/performance.md); "worker", a process
    of this job's own; "inprocess", synchronously here. Out of process, the calls return at
    once and `close()` waits until everything is logged. Logging before `start()`, after
    `close()` or after a failure is dropped.
    """

    def __init__(
        self,
        run_key: str,
        params: dict[str, Any] | None = None,
        *,
        run_dir: str | os.PathLike | None = None,
        root: str | os.PathLike | None = None,
        enabled: bool | None = None,
        tags: dict[str, str] | None = None,
        reuse: bool = True,
        flush_every_s: float = 10.0,
        flush_size: int = 200,
        mode: str | None = None,
    ) -> None:
        self.run_key = run_key
        self.params = dict(params or {})
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.root = Path(root) if root is not None else Path.cwd()
        self.enabled = tracking_enabled() if enabled is None else enabled
        self.tags = dict(tags or {})
        self.reuse = reuse
        self.flush_every_s = flush_every_s
        self.flush_size = flush_size
        self.mode = tracking_mode() if mode is None else mode
        if self.mode not in MODES:
            raise ValueError(f"Tracker mode {self.mode!r}: expected one of {', '.join(MODES)}")
        self.uri = default_tracking_uri(self.root)
        self._buffer: list[tuple[str, float, int, int]] = []  # (key, value, time ms, step)
        self._last_flush = time.monotonic()
        self._begun = self._closed = self._failed = False
        self._session: _Session | None = None  # "inprocess"
        self._chan: _Channel | None = None  # "shared" / "worker": the line to the worker
        self._pending = b""  # worker reports not yet parsed
        self._started = False  # the worker reported its start
        self._run_id: str | None = None
        self.worker_pid: int | None = None  # the process doing the MLflow calls

    # ------------------------------------------------------------------ state
    @property
    def run_id(self) -> str | None:
        """The MLflow run id (waits for a background start); None when off or failed."""
        if self._session is not None:
            return self._session.run_id
        if self._chan is not None and not self._started:
            self._read(until=lambda: self._started)
        return self._run_id

    @property
    def active(self) -> bool:
        """Logging reaches MLflow (waits for a background start)."""
        if self._session is not None:
            return self._session.ready
        return self.enabled and self.run_id is not None and not self._failed

    def _usable(self) -> bool:
        """Worth sending an operation (never blocks)."""
        if not (self.enabled and self._begun) or self._closed or self._failed:
            return False
        return self._session is None or not self._session.failed

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Tracker:
        if not self.enabled or self._begun:
            return self
        self._begun = True
        cfg = {
            "run_key": self.run_key,
            "params": self.params,
            "run_dir": None if self.run_dir is None else str(self.run_dir.resolve()),
            "root": str(self.root.resolve()),
            "tags": self.tags,
            "reuse": self.reuse,
            "uri": self.uri,
        }
        if self.mode == "inprocess":
            self._session = _Session(**cfg)
            self._session.start()
            self.worker_pid = os.getpid()
            return self
        if self.mode == "shared":
            self._chan = _Channel.to_daemon(daemon_address(self.uri))
        if self._chan is None:
            try:
                self._chan = _Channel.to_worker()
            except OSError as e:
                self._fail(f"start failed: {e}")
                return self
        self._send({"op": "start", **cfg})
        return self

    def close(self, status: str = "FINISHED") -> None:
        """Send what is buffered, end the MLflow run with `status`, wait until it is all logged."""
        if not self.enabled or not self._begun or self._closed:
            return
        self.flush()
        self._closed = True
        if self._session is not None:
            self._session.end(status)
            return
        if self._chan is None:
            return
        self._send({"op": "end", "status": status})
        self._send({"op": "exit"})
        self._chan.finish()
        self._read(until=lambda: False)  # every report, up to the end of the line
        rc = self._chan.wait()
        if rc:
            self._fail(f"the tracking worker exited with status {rc}")
        self._chan = None

    def __enter__(self) -> Tracker:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        self.close(status)

    # ------------------------------------------------------------------ the worker line
    def _send(self, msg: dict) -> None:
        if self._chan is None or self._failed:
            return
        try:
            self._chan.send(json.dumps(msg, default=str).encode() + b"\n")
        except OSError:  # the worker is gone
            self._read(until=lambda: False)
            self._fail("the tracking worker exited")

    def _read(self, until, block: bool = True) -> None:
        """Handle the worker's reports (JSON lines) until `until()` holds or the line ends;
        with block=False only what is already there. A worker silent for _WAIT_S is given up."""
        import select

        if self._chan is None:
            return
        fd = self._chan.rfd
        while not until():
            if not select.select([fd], [], [], _WAIT_S if block else 0)[0]:
                if block:
                    self._fail(f"the tracking worker did not answer for {_WAIT_S:.0f} s")
                    self._started = True
                return
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # reset by a dying worker
                chunk = b""
            if not chunk:  # the worker is gone (or done)
                if not self._started:
                    self._fail("the tracking worker exited before starting")
                self._started = True
                return
            self._pending += chunk
            *lines, self._pending = self._pending.split(b"\n")
            for line in lines:
                self._report(json.loads(line))

    def _report(self, msg: dict) -> None:
        if "warning" in msg:
            self._fail(msg["warning"])
        if "started" in msg:
            self._started, self._run_id = True, msg["started"]
            self.worker_pid = msg.get("pid")

    def _fail(self, text: str) -> None:
        if self._failed:
            return
        self._failed = True
        if not text.startswith("warning: "):
            text = f"warning: MLflow tracking off for {self.run_key} ({text}); training continues"
        print(text, file=sys.stderr)

    # ------------------------------------------------------------------ logging
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer metrics; they are sent in batches (every `flush_every_s` or `flush_size`,
        and at `close()`)."""
        if not self._usable():
            return
        now = int(time.time() * 1000)
        for k, v in metrics.items():
            if v is None:
                continue
            self._buffer.append((str(k), float(v), now, int(step)))
        if (
            len(self._buffer) >= self.flush_size
            or time.monotonic() - self._last_flush > self.flush_every_s
        ):
            self.flush()

    def flush(self) -> None:
        """Send the buffered metrics (logged in the background unless in-process)."""
        batch, self._buffer = self._buffer, []
        self._last_flush = time.monotonic()
        if self._chan is not None:
            self._read(until=lambda: False, block=False)  # surface a failure early
        if not batch or not self._usable():
            return
        if self._session is not None:
            self._session.log_metrics(batch)
        else:
            self._send({"op": "metrics", "batch": batch})

    def set_tag(self, key: str, value: Any) -> None:
        if not self._usable():
            return
        if self._session is not None:
            self._session.set_tag(str(key), str(value))
        else:
            self._send({"op": "tag", "key": str(key), "value": str(value)})

    def log_checkpoint_path(self, path: str | os.PathLike) -> None:
        self.set_tag("checkpoint", str(Path(path).resolve()))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if not self._usable():
            return
        path = str(Path(path).resolve())
        if self._session is not None:
            self._session.log_artifact(path, artifact_path)
        else:
            self._send({"op": "artifact", "path": path, "artifact_path": artifact_path})


def training_tracker(P, run, *, root: str | os.PathLike, resumed: bool, n_params: int) -> Tracker:
    """The started MLflow mirror of training run `run` of params `P`: its flattened params and
    size, tagged with its kind and model; a resumed run adds to its previous MLflow run."""
    return Tracker(
        run.key,
        dict(P.flat(run.key), n_params=n_params),
        run_dir=run.run_dir,
        root=root,
        reuse=resumed,
        tags={"kind": run.kind, "model_name": run.model_name},
    ).start()
