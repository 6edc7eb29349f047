"""Exact resume: a killed (SIGKILL) training job, resumed, ends with the same parameters as an
uninterrupted one; so does a run stopped in the middle of a truncated-BPTT batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train import (
    cli,
    launcher,
    make_prepared,
    read_log,
    register_tiny_models,
    tiny_run,
    write_params,
)


def _params_equal(a: Path, b: Path) -> None:
    sa = torch.load(a, weights_only=True)
    sb = torch.load(b, weights_only=True)
    assert sa["step"] == sb["step"]
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    # the optimiser moments too
    for s1, s2 in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        for k in s1:
            assert torch.equal(torch.as_tensor(s1[k]), torch.as_tensor(s2[k])), k


def _env() -> dict:
    env = dict(os.environ, SASHIMI_TRACKING="0", SASHIMI_PROGRESS="0", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    # plateau scheduler + weight decay + validation: every piece of state must survive the kill
    run = tiny_run(
        model={"sleep": 0.05},
        train={
            "max_steps": 40,
            "ckpt_every": 4,
            "val_every": 6,
            "log_every": 2,
            "scheduler": "plateau",
            "patience": 1,
            "factor": 0.5,
        },
    )
    dirs = {}
    for name in ("killed", "straight"):
        d = tmp_path / name
        d.mkdir()
        make_prepared(d)
        write_params(d, {"tiny": run})
        dirs[name] = d
    script = launcher(tmp_path)
    cmd = [sys.executable, str(script), "train", "--run", "tiny", "--device", "cpu"]

    # 1) start, wait for a checkpoint past step 8, kill -9 in the middle of training
    d = dirs["killed"]
    proc = subprocess.Popen(cmd, cwd=d, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ck = d / "results/runs/tiny/checkpoints"
    t0 = time.monotonic()
    while not any(int(p.stem[5:]) >= 12 for p in ck.glob("step-*.pt")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < 120, "training did not reach step 12"
        time.sleep(0.02)
    time.sleep(0.1)  # a few steps past the checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(ck / "last.pt", weights_only=True)["step"]
    assert 8 <= killed_at < 40

    # 2) resume to the end (default: resume when last.pt exists)
    out = subprocess.run(cmd, cwd=d, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"resuming tiny from step {killed_at}" in out.stderr

    # 3) the same run, uninterrupted (in-process)
    register_tiny_models(monkeypatch)
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(dirs["straight"])
    torch.set_num_threads(1)  # as in the subprocess (OMP_NUM_THREADS=1): same float reductions
    try:
        os.environ["SASHIMI_TRACKING"] = "0"
        assert cli("train", "--run", "tiny", "--device", "cpu", "--no-progress") == 0
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
        os.environ.pop("SASHIMI_TRACKING", None)

    _params_equal(ck / "last.pt", dirs["straight"] / "results/runs/tiny/checkpoints/last.pt")
    # the log has no duplicated steps from the killed job and matches the straight run's losses
    a = [(r["step"], r["split"], r["loss"]) for r in read_log(d / "results/runs/tiny")]
    b = [
        (r["step"], r["split"], r["loss"]) for r in read_log(dirs["straight"] / "results/runs/tiny")
    ]
    assert a == b


def test_resume_mid_tbptt_batch_is_exact(tmp_path, monkeypatch):
    """Stop in the middle of a batch's truncated-BPTT windows (carried state saved), resume."""
    register_tiny_models(monkeypatch)
    monkeypatch.setenv("SASHIMI_TRACKING", "0")
    monkeypatch.setenv("SASHIMI_PROGRESS", "0")
    run = tiny_run(
        model={"name": "tiny-rnn"}, train={"tbptt": 96, "max_steps": 14, "ckpt_every": 100}
    )
    dirs = []
    for name in ("stopped", "straight"):
        d = tmp_path / name
        d.mkdir()
        make_prepared(d)
        write_params(d, {"tiny": run})
        dirs.append(d)
    monkeypatch.chdir(dirs[0])
    assert cli("train", "--run", "tiny", "--max-steps", "6") == 0  # 4 or 5 windows per batch
    ck = torch.load(dirs[0] / "results/runs/tiny/checkpoints/last.pt", weights_only=True)
    assert ck["chunk"] > 0 and ck["rank_state"][0]["carried"] is not None
    assert cli("train", "--run", "tiny") == 0
    monkeypatch.chdir(dirs[1])
    assert cli("train", "--run", "tiny") == 0
    _params_equal(
        dirs[0] / "results/runs/tiny/checkpoints/last.pt",
        dirs[1] / "results/runs/tiny/checkpoints/last.pt",
    )
