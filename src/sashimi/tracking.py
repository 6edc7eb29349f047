"""MLflow mirror of a run: params, metrics, git commit, checkpoint path, a few audio clips.

The pipeline never reads from MLflow; `train_log.csv` and `metrics.json` are the record.
So tracking must never cost a run: every MLflow call is guarded, retried a few times
(SQLite "database is locked"), and after a persistent failure the tracker warns ONCE and
turns itself off for the rest of the process.

- Store: `$MLFLOW_TRACKING_URI` if set, else `sqlite:///<root>/mlflow.db` where `root` is
  the folder holding params.yaml (the repository root). SQLite URIs get a 60 s busy timeout,
  and the first-time schema creation is serialised with a file lock, so several jobs can
  log to one store at once.
- Experiment: `$SASHIMI_MLFLOW_EXPERIMENT` (default "sashimi"); artifacts under
  `<root>/mlruns` for a store created here.
- Run name = run key. The MLflow run id is remembered in `<run_dir>/mlflow_run.json`, so a
  resumed training job, `sashimi sample` and `sashimi evaluate` add to the same MLflow run
  (`reuse=False`, a fresh training run, starts a new one).
- `SASHIMI_TRACKING=0` disables tracking entirely.
- Cost: importing MLflow and opening an SQLite store takes about 2.5 s of CPU per process.
  `mlflow` is imported lazily, and by default every MLflow call (the import included) runs
  in a background worker thread, so a job's own work overlaps it; metrics are buffered and
  sent in batches; `close()` waits for the worker.
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


class Tracker:
    """One MLflow run for one run key. Use as a context manager; every method is failure-safe.

    >>> with Tracker("sashimi-sc09", P.flat("sashimi-sc09"), run_dir=run.run_dir) as tr:
    ...     tr.log_metrics({"train/loss": 1.2}, step=10)

    With `background=True` (the default) every MLflow call, the `import mlflow` included, runs
    in one daemon worker thread, in submission order: `start()` and the logging methods return
    at once and `close()` waits for the worker to finish. Logging before `start()` or after a
    failure is dropped. `run_id` and `active` wait for the start to complete.
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
        background: bool = True,
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
        self.background = background
        self.uri = default_tracking_uri(self.root)
        self._run_id: str | None = None
        self._client = None
        self._buffer: list[tuple[str, float, int, int]] = []  # (key, value, time ms, step)
        self._last_flush = time.monotonic()
        self._failed = False
        self._begun = False  # start() was called
        self._closed = False
        self._started = threading.Event()  # the start op has run (successfully or not)
        self._queue: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ state
    @property
    def run_id(self) -> str | None:
        """The MLflow run id; waits for a background start. None when off or failed."""
        if self._begun and self.enabled:
            self._started.wait()
        return self._run_id

    @property
    def active(self) -> bool:
        """Logging reaches MLflow (waits for a background start)."""
        return self.enabled and not self._failed and self.run_id is not None

    def _usable(self) -> bool:
        """Worth queueing an operation (never blocks)."""
        return self.enabled and self._begun and not self._failed and not self._closed

    # ------------------------------------------------------------------ guard
    def _call(self, what: str, fn, *args, **kwargs):
        """Run an MLflow call with retries; on persistent failure warn once and switch off."""
        if not self.enabled or self._failed:
            return None
        for attempt in range(len(_RETRIES) + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # MLflow raises many types (MlflowException, OSError, ...)
                if attempt < len(_RETRIES) and _retryable(e):
                    time.sleep(_RETRIES[attempt])
                    continue
                self._fail(what, e)
                return None
        return None

    def _fail(self, what: str, e: BaseException) -> None:
        if self._failed:
            return
        self._failed = True
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(
            f"warning: MLflow tracking off for {self.run_key} ({what} failed: {msg[:300]}); "
            f"training continues",
            file=sys.stderr,
        )

    # ------------------------------------------------------------------ the worker
    def _submit(self, op: tuple) -> None:
        if self._queue is not None:
            self._queue.put(op)
        else:
            self._do(op)

    def _work(self) -> None:
        assert self._queue is not None
        while (op := self._queue.get()) is not None:
            self._do(op)

    def _do(self, op: tuple) -> None:
        """Carry out one queued operation; never raises."""
        kind = op[0]
        try:
            if kind == "call":  # a marker (wait())
                op[1]()
            elif kind == "start":
                try:
                    self._call("start", self._start)
                finally:
                    self._started.set()
            elif self._failed or self._run_id is None:
                return  # not started or switched off: drop
            elif kind == "metrics":
                self._send_metrics(op[1])
            elif kind == "tag":
                self._call("set tag", self._client.set_tag, self._run_id, op[1], op[2])
            elif kind == "artifact":
                self._call("log artifact", self._client.log_artifact, self._run_id, op[1], op[2])
            elif kind == "end":
                self._call("end run", self._client.set_terminated, self._run_id, status=op[1])
        except Exception as e:  # a bug here must not kill the worker (close() joins it)
            self._fail(kind, e)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Tracker:
        if not self.enabled or self._begun:
            return self
        self._begun = True
        if self.background:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(
                target=self._work, name=f"mlflow-{self.run_key}", daemon=True
            )
            self._thread.start()
        self._submit(("start",))
        return self

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
        self._run_id = run_id
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
                self._client.log_batch(self._run_id, params=items[i : i + 100])
            except Exception as e:
                # re-logging a changed value on a resumed run is refused: keep the first values
                if "INVALID_PARAMETER_VALUE" in str(e) or "Changing param values" in str(e):
                    continue
                raise

    def wait(self) -> None:
        """Block until every operation submitted so far has been carried out."""
        if self._thread is None or self._closed:
            return
        done = threading.Event()
        self._submit(("call", done.set))
        done.wait()

    def close(self, status: str = "FINISHED") -> None:
        """Send what is buffered, end the MLflow run with `status`, stop the worker (waits)."""
        if not self.enabled or not self._begun or self._closed:
            return
        self.flush()
        self._submit(("end", status))
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

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
        """Hand the buffered metrics to the worker (sent in the background)."""
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        self._last_flush = time.monotonic()
        if self._usable():
            self._submit(("metrics", batch))

    def _send_metrics(self, batch: list[tuple[str, float, int, int]]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, t, s) for k, v, t, s in batch]
        for i in range(0, len(metrics), 1000):  # MLflow: at most 1000 metrics per batch
            self._call(
                "log metrics", self._client.log_batch, self._run_id, metrics=metrics[i : i + 1000]
            )

    def set_tag(self, key: str, value: Any) -> None:
        if self._usable():
            self._submit(("tag", str(key), str(value)))

    def log_checkpoint_path(self, path: str | os.PathLike) -> None:
        self.set_tag("checkpoint", str(Path(path).resolve()))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self._usable():
            self._submit(("artifact", str(path), artifact_path))


def _retryable(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}".lower()
    return any(s in text for s in ("locked", "busy", "operationalerror", "timeout", "temporarily"))
