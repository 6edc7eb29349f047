"""DVC as a team uses it, in temporary git + DVC copies of the repository (no network):

* the default remote (.dvc/config) is a folder beside the repository;
* prepared data, a checkpoint and a raw archive (the `workflow/raw/dvc.yaml` download stage, served
  from 127.0.0.1) go up with `dvc push` from one clone and come down with `dvc pull` in another;
* `dvc exp run -S runs.<run>.train.lr=...` changes params.yaml for one experiment, and
  `dvc exp show` lists it with the run's metrics.json (slow: a tiny demo run for real).
"""

from __future__ import annotations

import http.server
import io
import json
import shutil
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT  # tests/ is on sys.path
from test_workflow import _copy_repo, _run  # tests/ is on sys.path

BIN = Path(sys.executable).parent
RAW = "workflow/raw/dvc.yaml"
RUN = "sashimi-sc09"

pytestmark = pytest.mark.timeout(1200)


GIT_ENV = dict(OMP_NUM_THREADS="2", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")  # fmt: skip


def _sh(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    return _run(cmd, cwd, {**GIT_ENV, **(env or {})}, timeout=600)


def dvc(cwd: Path, *args: str, env: dict | None = None) -> str:
    return _sh([str(BIN / "dvc"), *args], cwd, env)


def git(cwd: Path, *args: str) -> str:
    return _sh(["git", *args], cwd)


def _new_repo(path: Path) -> Path:
    """A git + DVC repository holding the workflow files and this repo's .dvc/config."""
    _copy_repo(path)
    (path / ".gitignore").write_text("__pycache__/\n*.egg-info/\n")
    git(path, "init", "-q")
    dvc(path, "init", "-q")
    shutil.copy2(ROOT / ".dvc" / "config", path / ".dvc" / "config")
    return path


@pytest.fixture(scope="module")
def archive_server():
    """A 127.0.0.1 HTTP server with a small beethoven.zip (the raw archive's file name)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("beethoven/0.wav", b"RIFF-not-really-audio-0")
        z.writestr("beethoven/1.wav", b"RIFF-not-really-audio-1")
    blob = buf.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path.rstrip("/").endswith("/beethoven.zip"):
                self.send_response(200)
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                self.wfile.write(blob)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/mirror"
    server.shutdown()


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, archive_server) -> tuple[Path, dict[str, bytes]]:
    """Clone A: prepared data and a checkpoint committed as their stages' outputs, the raw beethoven archive fetched by
    its DVC stage, all committed to git and pushed to the default remote. Returns (A, files)."""
    a = _new_repo(tmp_path_factory.mktemp("team") / "a")
    prepared = a / "data/prepared/sc09"
    prepared.mkdir(parents=True)
    (prepared / "manifest.json").write_text(json.dumps({"splits": {"train": 3}}))
    (prepared / "train.u8").write_bytes(bytes(range(256)) * 3)
    ckpt = a / f"results/runs/{RUN}/checkpoints/last.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 7}, ckpt)
    (ckpt.parents[1] / "train_log.csv").write_text("step,split,loss\n1,train,5.5\n")
    # made elsewhere (another machine, a cluster job): record them as the stages' outputs
    dvc(a, "commit", "-f", "prepare@sc09", f"train@{RUN}")
    dvc(a, "repro", f"{RAW}:download@beethoven", env={"SASHIMI_DOWNLOAD_BASE_URL": archive_server})
    git(a, "add", "-A")
    git(a, "commit", "-q", "-m", "data")
    dvc(a, "push")
    files = {
        str(p.relative_to(a)): p.read_bytes()
        for d in ("data/prepared/sc09", "data/raw/beethoven", f"results/runs/{RUN}/checkpoints")
        for p in sorted((a / d).rglob("*"))
        if p.is_file()
    }
    return a, files


def test_default_remote_is_a_folder_beside_the_repository(pushed):
    a, _ = pushed
    name = dvc(a, "remote", "default").strip()
    url = dvc(a, "config", f"remote.{name}.url").strip()
    remote = (a / ".dvc" / url).resolve()
    assert remote == a.parent / "sashimi-dvc-remote"
    assert a not in remote.parents  # outside the git tree
    assert any(p.is_file() for p in remote.rglob("*")), "dvc push wrote nothing to the remote"


def test_push_then_pull_in_a_fresh_clone(pushed):
    """What a teammate does: clone the git repo, `dvc pull`, get the same bytes."""
    a, files = pushed
    assert {"data/raw/beethoven/0.wav", "data/prepared/sc09/manifest.json"} <= set(files)
    b = a.parent / "b"
    git(a.parent, "clone", "-q", str(a), str(b))
    assert not any((b / rel).exists() for rel in files)  # git carries only dvc.lock's hashes
    dvc(b, "pull", "--allow-missing")  # everything pushed; stages never run have nothing to pull
    for rel, blob in files.items():
        assert (b / rel).read_bytes() == blob, rel
    state = torch.load(b / f"results/runs/{RUN}/checkpoints/last.pt", weights_only=True)
    assert state["step"] == 7 and torch.equal(state["model"]["w"], torch.arange(6.0).reshape(2, 3))
    # the pulled archive satisfies its download stage: nothing to fetch again
    assert "up to date" in dvc(b, "status", f"{RAW}:download@beethoven")


# ----------------------------------------------------------------------------- experiments


EXP_RUN = "sashimi-beethoven"  # the smallest demo data: 24 synthetic piano clips


def _tiny_demo(repo: Path) -> None:
    """params.yaml at demo scale, shrunk to the test's budget (not the demo's): 1,024-sample
    Beethoven chunks, 2 training steps, 20 ms samples, 60 clips and 1 epoch for the digit
    classifier (every DVC evaluation depends on it)."""
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["scale"] = "demo"
    raw["datasets"]["beethoven"]["demo"]["chunk_length"] = 1024
    raw["datasets"]["sc09-v1"]["demo"]["options"]["n_clips"] = 60
    raw["train_defaults"]["demo"].update(max_steps=2, val_every=2, ckpt_every=2, log_every=1)
    raw["train_defaults"]["demo"].update(val_batches=1)
    raw["sample_defaults"]["demo"].update(n=2, batch_size=2, seconds=0.05)
    raw["runs"][EXP_RUN]["demo"]["sample"] = {"n": 2, "seconds": 0.02}  # 320 steps
    classifier = raw["runs"]["classifier-sc09"]["demo"]["train"]
    classifier.update(max_epochs=1, precise_bn_batches=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.slow
def test_exp_run_sets_a_nested_param_and_exp_show_lists_metrics(tmp_path):
    repo = _new_repo(tmp_path / "repo")
    _tiny_demo(repo)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "tiny demo")
    # a nested key of params.yaml: dots between the levels, hyphens in a run key are fine
    dvc(
        repo,
        "exp",
        "run",
        "-n",
        "lr2e-3",
        "-S",
        f"runs.{EXP_RUN}.train.lr=0.002",
        f"evaluate@{EXP_RUN}",
    )
    log = (repo / f"results/runs/{EXP_RUN}/train_log.csv").read_text().splitlines()
    assert log[0].startswith("step,") and all(",0.002," in row for row in log[1:]), log
    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    exps = [e for rev in shown for x in (rev.get("experiments") or []) for e in x.get("revs", [])]
    exp = next(e for e in exps if e.get("name") == "lr2e-3")
    data = exp["data"]
    assert data["params"]["params.yaml"]["data"]["runs"][EXP_RUN]["train"]["lr"] == 0.002
    metrics = data["metrics"][f"results/runs/{EXP_RUN}/metrics.json"]["data"]
    assert any(isinstance(v, int | float) for v in _leaves(metrics)), metrics
    # the training curve is a DVC plot
    plots = dvc(repo, "plots", "show", "--json", f"results/runs/{EXP_RUN}/train_log.csv")
    assert "train_log.csv" in plots and "step" in plots


def _leaves(d) -> list:
    if isinstance(d, dict):
        return [x for v in d.values() for x in _leaves(v)]
    return [d]
