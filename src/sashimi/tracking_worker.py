"""The process side of MLflow tracking: the MLflow calls of one run (`_Session`), the line a
job uses to reach them (`_Channel`), a job's own worker (`_serve`) and the daemon shared by
all jobs of one store on this machine (`_daemon`).

Every MLflow call is retried a few times (SQLite "database is locked"); after a persistent
failure the session warns once and turns itself off. SQLite stores get a 60 s busy timeout,
and the first-time schema creation is serialised with a file lock. The job side is
`sashimi.tracking.Tracker`; this module never imports it.
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

EXPERIMENT = "sashimi"  # default MLflow experiment ($SASHIMI_MLFLOW_EXPERIMENT)
_SQLITE_TIMEOUT_S = 60
_RETRIES = (0.2, 0.5, 1.0)  # seconds between attempts of one MLflow call
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
_WAIT_S = 600.0  # a job gives up on a tracking worker silent for this long (never hangs)


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
    """The MLflow calls of one run, synchronous and failure-safe (runs in a tracking worker
    or the daemon, or in the job with `Tracker(mode="inprocess")`)."""

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


class _Channel:
    """A job's line to the process doing its MLflow calls: JSON lines out (`send`), reports
    back on `rfd`. Either a worker process of its own (pipes) or the shared daemon (socket)."""

    def __init__(self, wfd: int, rfd: int, proc=None, sock=None) -> None:
        self.wfd, self.rfd, self.proc, self.sock = wfd, rfd, proc, sock

    @classmethod
    def to_worker(cls) -> _Channel:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from sashimi.tracking_worker import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        return cls(proc.stdin.fileno(), proc.stdout.fileno(), proc=proc)

    @classmethod
    def to_daemon(cls, address: str) -> _Channel | None:
        """Connect to the shared daemon at `address`, starting it if needed; None on failure."""
        import socket

        try:
            for attempt in range(2):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(address)
                    return cls(sock.fileno(), sock.fileno(), sock=sock)
                except (FileNotFoundError, ConnectionRefusedError):
                    sock.close()
                    if attempt == 0:
                        _spawn_daemon(address)
        except OSError:
            pass
        return None

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.wfd, view) :]

    def finish(self) -> None:
        """No more operations (the worker ends the session and closes its side)."""
        with contextlib.suppress(OSError):
            if self.proc is not None:
                self.proc.stdin.close()
            else:
                import socket

                self.sock.shutdown(socket.SHUT_WR)

    def wait(self, timeout: float = _WAIT_S) -> int:
        if self.proc is not None:
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:  # a stuck worker of this job: end it
                self.proc.kill()
                rc = self.proc.wait()
            self.proc.stdout.close()
            return rc
        self.sock.close()
        return 0


def _serve_ops(lines: Iterator[bytes | None], emit) -> None:
    """Carry out one job's operations (JSON lines) with one `_Session`; `emit(**report)` sends
    {"started": run_id | None, "pid": ...} and {"warning": text} back. A line that ends
    without an "end" operation (the job was killed) ends the run as KILLED."""
    session, ended = None, False
    for line in lines:
        if line is None:
            break
        msg = json.loads(line)
        op = msg.pop("op")
        if op == "exit":
            break
        if op == "start":
            session = _Session(**msg, warn=lambda text: emit(warning=text))
            session.start()
            emit(started=session.run_id, pid=os.getpid())
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


def _quiet_worker() -> None:
    """Settings of a tracking worker process: Ctrl-C is the job's to handle, no telemetry."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _serve() -> None:
    """A job's own tracking worker: operations on stdin, reports on stdout."""
    _quiet_worker()
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

    _serve_ops(iter(ops.get, None), emit)
    with contextlib.suppress(OSError, ValueError):
        out.close()


# ---------------------------------------------------------------------------- shared daemon
def daemon_address(uri: str) -> str:
    """The shared daemon's socket for this store, user, interpreter, checkout and MLflow env."""
    import hashlib
    import tempfile

    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("MLFLOW_"))
    key = json.dumps(
        [uri, os.environ.get("SASHIMI_MLFLOW_EXPERIMENT", EXPERIMENT), sys.executable,
         str(_code_root()), env]
    )  # fmt: skip
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(tempfile.gettempdir(), f"sashimi-mlflow-{uid}-{digest}.sock")


def _daemon_lock() -> Path:
    """One lock file per user guards every daemon's bind and unlink (held for milliseconds)."""
    import tempfile

    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"sashimi-mlflow-{uid}.lock"


def _spawn_daemon(address: str, wait_s: float = 10.0) -> None:
    """Start the daemon for `address` detached from this job (its own session, no stdio),
    and wait until it listens (or `wait_s` passes)."""
    code = f"from sashimi.tracking_worker import _daemon; _daemon({address!r})"
    # a launcher that exits at once: the daemon is nobody's child (no zombie, no wait)
    launcher = (
        "import subprocess, sys; subprocess.Popen([sys.executable, '-c', sys.argv[1]], "
        "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, "
        "start_new_session=True)"
    )
    subprocess.run([sys.executable, "-c", launcher, code], check=True, timeout=60)
    t0 = time.monotonic()
    while not os.path.exists(address) and time.monotonic() - t0 < wait_s:
        time.sleep(0.01)


def _daemon(address: str) -> None:
    """The shared tracking daemon: serves each connected job (one thread and `_Session` each)
    and exits after SASHIMI_TRACKING_IDLE_S seconds without a job. Only one daemon binds an
    address (a file lock guards the stale-socket check)."""
    _quiet_worker()
    idle_s = float(os.environ.get("SASHIMI_TRACKING_IDLE_S", "30"))
    srv = _bind(address)
    if srv is None:
        return  # another daemon serves this address
    inode = os.stat(address).st_ino
    _preload_mlflow()
    jobs = _Jobs()
    srv.settimeout(idle_s)
    while True:
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            if jobs.idle():
                break
            continue
        jobs.serve(conn)
    # idle: take no new jobs (remove the address), serve those already queued, then exit
    with _file_lock(_daemon_lock()):
        with contextlib.suppress(OSError):
            if os.stat(address).st_ino == inode:
                os.unlink(address)
    srv.setblocking(False)
    while True:
        try:
            conn, _ = srv.accept()
        except (BlockingIOError, OSError):
            break
        jobs.serve(conn)
    srv.close()
    jobs.join()


def _bind(address: str):
    """A listening socket at `address`, or None if another daemon already serves it."""
    import socket

    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with _file_lock(_daemon_lock()):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(address)
            srv.close()
            return None
        except OSError:
            pass
        finally:
            probe.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)
        old = os.umask(0o177)  # the socket is this user's only
        try:
            srv.bind(address)
        finally:
            os.umask(old)
        srv.listen(64)
    return srv


def _preload_mlflow() -> None:
    """Import MLflow once, before serving (jobs queued meanwhile wait)."""
    with contextlib.suppress(Exception):
        import mlflow.tracking  # noqa: F401

        if default_tracking_uri().startswith("sqlite"):
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


class _Jobs:
    """The jobs a daemon serves, one thread each, and how many are still connected."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._threads: list[threading.Thread] = []

    def serve(self, conn) -> None:
        with self._lock:
            self._active += 1
        t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
        t.start()
        self._threads.append(t)

    def _handle(self, conn) -> None:
        try:
            conn.setblocking(True)
            rfile = conn.makefile("rb")

            def emit(**msg) -> None:
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(msg).encode() + b"\n")

            _serve_ops(iter(rfile.readline, b""), emit)
        except Exception:  # one job's trouble must not stop the others
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            with self._lock:
                self._active -= 1

    def idle(self) -> bool:
        with self._lock:
            return self._active == 0

    def join(self) -> None:
        for t in self._threads:
            t.join()


def _retryable(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}".lower()
    return any(s in text for s in ("locked", "busy", "operationalerror", "timeout", "temporarily"))
