"""MLflow mirror of a run: params, metrics, git commit, checkpoint path, a few audio clips.

The pipeline never reads from MLflow; `train_log.csv` and `metrics.json` are the record.
So tracking must never cost a run: every MLflow call is guarded, retried a few times
(SQLite "database is locked"), and after a persistent failure the tracker warns ONCE and
turns itself off for the rest of the job.

- Store: `$MLFLOW_TRACKING_URI` if set, else `sqlite:///<root>/mlflow.db` where `root` is
  the folder holding params.yaml (the repository root). SQLite URIs get a 60 s busy timeout,
  and the first-time schema creation is serialised with a file lock, so several jobs can
  log to one store at once.
- Experiment: `$SASHIMI_MLFLOW_EXPERIMENT` (default "sashimi"); artifacts under
  `<root>/mlruns` for a store created here.
- Run name = run key. The MLflow run id is remembered in `<run_dir>/mlflow_run.json`, so a
  resumed training job, `sashimi sample` and `sashimi evaluate` add to the same MLflow run
  (`reuse=False`, a fresh training run, starts a new one).
- `SASHIMI_TRACKING=0` disables tracking entirely; `SASHIMI_TRACKING=inprocess` makes the MLflow
  calls in the job's own process instead of a worker process (tests, debugging).
- Cost: importing MLflow and opening an SQLite store takes about 2.5 s of CPU per job. So
  by default MLflow runs in a worker process (`python -c ...tracking._serve`) that the
  job feeds through a pipe: the job never imports mlflow, its own work overlaps the
  worker's (on another core when one is free), metrics are buffered and sent in batches,
  and `close()` waits for the worker to finish.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EXPERIMENT = "sashimi"
_SQLITE_TIMEOUT_S = 60
_RETRIES = (0.2, 0.5, 1.0)  # seconds between attempts of one MLflow call
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


def tracking_enabled() -> bool:
    return os.environ.get("SASHIMI_TRACKING", "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )


def _background_default() -> bool:
    """SASHIMI_TRACKING=inprocess: MLflow in the job's own process (no worker process)."""
    return os.environ.get("SASHIMI_TRACKING", "1").strip().lower() != "inprocess"


def default_tracking_uri(root: str | os.PathLike | None = None) -> str:
    """`$MLFLOW_TRACKING_URI`, else an SQLite file `mlflow.db` in `root` (default: the cwd)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = "sqlite:///" + str(Path(root or ".").resolve() / "mlflow.db")
    return uri


def _with_sqlite_timeout(uri: str) -> str:
    if uri.startswith("sqlite:") and "timeout=" not in uri:
        uri += ("&" if "?" in uri else "?") + f"timeout={_SQLITE_TIMEOUT_S}"
    return uri


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


@contextlib.contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    """Exclusive advisory lock (POSIX flock) on `path`; no-op when path is None or locking fails."""
    if path is None:
        yield
        return
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")  # noqa: SIM115
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


def _code_root() -> Path:
    """The source checkout this package runs from (its commit is the code's version)."""
    return Path(__file__).resolve().parents[2]


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """HEAD's commit hash, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


class _Session:
    """The MLflow calls of one run, synchronous and failure-safe (runs in the tracking worker
    process, or in-process with `Tracker(background=False)`)."""

    def __init__(
        self,
        run_key: str,
        params: dict[str, Any],
        run_dir: str | None,
        root: str,
        tags: dict[str, str],
        reuse: bool,
        uri: str,
        warn=None,
    ) -> None:
        self.run_key, self.params, self.tags, self.reuse, self.uri = (
            run_key,
            params,
            tags,
            reuse,
            uri,
        )
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.root = Path(root)
        self.warn = warn or (lambda text: print(text, file=sys.stderr))
        self.run_id: str | None = None
        self.failed = False
        self._client = None

    def _call(self, what: str, fn, *args, **kwargs):
        """Run an MLflow call with retries; on persistent failure warn once and switch off."""
        if self.failed:
            return None
        for attempt in range(len(_RETRIES) + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # MLflow raises many types (MlflowException, OSError, ...)
                if attempt < len(_RETRIES) and _retryable(e):
                    time.sleep(_RETRIES[attempt])
                    continue
                self.fail(what, e)
                return None
        return None

    def fail(self, what: str, e: BaseException | str) -> None:
        if self.failed:
            return
        self.failed = True
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        self.warn(
            f"warning: MLflow tracking off for {self.run_key} ({what} failed: {msg[:300]}); "
            f"training continues"
        )

    @property
    def ready(self) -> bool:
        return not self.failed and self.run_id is not None

    def start(self) -> None:
        self._call("start", self._start)

    def _start(self) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        import logging

        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        uri = _with_sqlite_timeout(self.uri)
        db = _sqlite_path(uri)
        # creating the schema (alembic migrations) races between processes: serialise it
        with _file_lock(db.with_name(db.name + ".lock") if db else None):
            client = MlflowClient(tracking_uri=uri)
            exp_name = os.environ.get("SASHIMI_MLFLOW_EXPERIMENT", EXPERIMENT)
            exp = client.get_experiment_by_name(exp_name)
            if exp is None:
                try:
                    exp_id = client.create_experiment(
                        exp_name, artifact_location=(self.root.resolve() / "mlruns").as_uri()
                    )
                except Exception:  # created meanwhile by another process (non-SQLite store)
                    exp = client.get_experiment_by_name(exp_name)
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
            else:
                exp_id = exp.experiment_id
        self._client = client
        run_id = self._previous_run_id(client) if self.reuse else None
        tags = {"run_key": self.run_key, **self.tags}
        commit = git_commit(_code_root())
        if commit:
            tags.update({"mlflow.source.git.commit": commit, "git_commit": commit})
        if run_id is None:
            run = client.create_run(exp_id, run_name=self.run_key, tags=tags)
            run_id = run.info.run_id
            self._remember(run_id)
        else:
            client.update_run(run_id, status="RUNNING")
            for k, v in tags.items():
                client.set_tag(run_id, k, v)
        self.run_id = run_id
        self._log_params(self.params)

    def _previous_run_id(self, client) -> str | None:
        """The MLflow run this run dir used before (same store), if it still exists."""
        if self.run_dir is None:
            return None
        f = self.run_dir / "mlflow_run.json"
        try:
            info = json.loads(f.read_text())
            if info.get("tracking_uri") != self.uri:
                return None
            run = client.get_run(info["run_id"])
            return run.info.run_id if run.info.lifecycle_stage == "active" else None
        except Exception:
            return None

    def _remember(self, run_id: str) -> None:
        if self.run_dir is None:
            return
        from sashimi.io import write_json

        with contextlib.suppress(OSError):
            write_json(
                self.run_dir / "mlflow_run.json", {"tracking_uri": self.uri, "run_id": run_id}
            )

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow: at most 100 params per batch
            try:
                self._client.log_batch(self.run_id, params=items[i : i + 100])
            except Exception as e:
                # re-logging a changed value on a resumed run is refused: keep the first values
                if "INVALID_PARAMETER_VALUE" in str(e) or "Changing param values" in str(e):
                    continue
                raise

    def log_metrics(self, batch: list) -> None:
        """batch: (key, value, time ms, step) tuples."""
        if not self.ready:
            return
        from mlflow.entities import Metric

        metrics = [Metric(str(k), float(v), int(t), int(s)) for k, v, t, s in batch]
        for i in range(0, len(metrics), 1000):  # MLflow: at most 1000 metrics per batch
            self._call(
                "log metrics", self._client.log_batch, self.run_id, metrics=metrics[i : i + 1000]
            )

    def set_tag(self, key: str, value: str) -> None:
        if self.ready:
            self._call("set tag", self._client.set_tag, self.run_id, key, value)

    def log_artifact(self, path: str, artifact_path: str | None) -> None:
        if self.ready:
            self._call("log artifact", self._client.log_artifact, self.run_id, path, artifact_path)

    def end(self, status: str) -> None:
        if self.ready:
            self._call("end run", self._client.set_terminated, self.run_id, status=status)


class Tracker:
    """One MLflow run for one run key. Use as a context manager; every method is failure-safe.

    >>> with Tracker("sashimi-sc09", P.flat("sashimi-sc09"), run_dir=run.run_dir) as tr:
    ...     tr.log_metrics({"train/loss": 1.2}, step=10)

    With `background=True` (the default unless SASHIMI_TRACKING=inprocess) MLflow lives in a worker process (`_serve`) fed
    through a pipe: `start()` and the logging methods return at once, the worker imports
    MLflow and logs while the job computes (a thread would not do: its imports hold the GIL
    and stall a Python-heavy job, such as step-by-step sampling, several-fold), and
    `close()` waits for it to finish. `background=False` makes every call in-process.
    Logging before `start()`, after `close()` or after a failure is dropped; `run_id` and
    `active` wait for the start to complete.
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
        background: bool | None = None,
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
        self.background = _background_default() if background is None else background
        self.uri = default_tracking_uri(self.root)
        self._buffer: list[tuple[str, float, int, int]] = []  # (key, value, time ms, step)
        self._last_flush = time.monotonic()
        self._begun = self._closed = self._failed = False
        self._session: _Session | None = None  # in-process mode
        self._proc: subprocess.Popen | None = None  # background mode: the worker
        self._pending = b""  # worker output not yet parsed
        self._started = False  # the worker reported its start
        self._run_id: str | None = None

    # ------------------------------------------------------------------ state
    @property
    def run_id(self) -> str | None:
        """The MLflow run id (waits for a background start); None when off or failed."""
        if self._session is not None:
            return self._session.run_id
        if self._proc is not None and not self._started:
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
        if not self.background:
            self._session = _Session(**cfg)
            self._session.start()
            return self
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from sashimi.tracking import _serve; _serve()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        except OSError as e:
            self._fail(f"start failed: {e}")
            return self
        self._send({"op": "start", **cfg})
        return self

    def close(self, status: str = "FINISHED") -> None:
        """Send what is buffered, end the MLflow run with `status`, wait for the worker."""
        if not self.enabled or not self._begun or self._closed:
            return
        self.flush()
        self._closed = True
        if self._session is not None:
            self._session.end(status)
            return
        if self._proc is None:
            return
        self._send({"op": "end", "status": status})
        self._send({"op": "exit"})
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        self._read(until=lambda: False)  # every report, up to the worker's exit
        if self._proc.wait() != 0:
            self._fail(f"the tracking worker exited with status {self._proc.returncode}")
        self._proc = None

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

    # ------------------------------------------------------------------ the worker pipe
    def _send(self, msg: dict) -> None:
        if self._proc is None or self._failed:
            return
        try:
            self._proc.stdin.write(json.dumps(msg, default=str).encode() + b"\n")
            self._proc.stdin.flush()
        except (OSError, ValueError):  # the worker died
            self._read(until=lambda: False)
            self._fail("the tracking worker exited")

    def _read(self, until, block: bool = True) -> None:
        """Handle the worker's reports (JSON lines) until `until()` holds or it exits; with
        block=False only what is already there."""
        import select

        if self._proc is None or self._proc.stdout is None:
            return
        fd = self._proc.stdout.fileno()
        while not until():
            if not block and not select.select([fd], [], [], 0)[0]:
                return
            chunk = os.read(fd, 65536)
            if not chunk:  # EOF: the worker is gone
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
        """Send the buffered metrics (to the worker, which logs them in the background)."""
        batch, self._buffer = self._buffer, []
        self._last_flush = time.monotonic()
        if self._proc is not None:
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


def _serve() -> None:
    """The tracking worker process: JSON operations on stdin, one `_Session`, JSON reports on
    stdout ({"started": run_id | null}, {"warning": text}). Without an "end" before stdin
    closes (the job was killed) the run ends as KILLED."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the job decides the status
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints go to stderr, not into the report channel
    ops: queue.SimpleQueue = queue.SimpleQueue()

    def reader() -> None:  # keep the pipe drained while MLflow imports
        for line in sys.stdin.buffer:
            ops.put(line)
        ops.put(None)

    threading.Thread(target=reader, daemon=True).start()

    def emit(**msg) -> None:
        with contextlib.suppress(OSError, ValueError):  # the job may be gone already
            out.write(json.dumps(msg) + "\n")

    session, ended = None, False
    while (line := ops.get()) is not None:
        msg = json.loads(line)
        op = msg.pop("op")
        if op == "exit":
            break
        if op == "start":
            session = _Session(**msg, warn=lambda text: emit(warning=text))
            session.start()
            emit(started=session.run_id)
        elif session is None:
            continue
        elif op == "metrics":
            session.log_metrics(msg["batch"])
        elif op == "tag":
            session.set_tag(msg["key"], msg["value"])
        elif op == "artifact":
            session.log_artifact(msg["path"], msg["artifact_path"])
        elif op == "end":
            session.end(msg["status"])
            ended = True
    if session is not None and not ended:
        session.end("KILLED")
    with contextlib.suppress(OSError, ValueError):
        out.close()


def _retryable(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}".lower()
    return any(s in text for s in ("locked", "busy", "operationalerror", "timeout", "temporarily"))
