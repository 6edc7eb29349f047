"""DDP: two gloo processes on CPU (torchrun) follow the same loss curve as one process with
the same global batch, including batches of clips of different lengths (the loss is
normalised by the GLOBAL number of targets)."""

from __future__ import annotations

import os
import subprocess
import sys

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


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)
@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path, monkeypatch):
    # plateau schedule, clipping and validation all exercise cross-rank reductions
    run = tiny_run(
        train={
            "batch_size": 4,
            "max_steps": 12,
            "log_every": 1,
            "val_every": 4,
            "ckpt_every": 6,
            "scheduler": "plateau",
            "patience": 0,
            "factor": 0.5,
            "clip_grad": 0.5,
        }
    )
    dirs = {}
    for name in ("ddp", "single"):
        d = tmp_path / name
        d.mkdir()
        make_prepared(d, lengths=(200, 400))  # padded batches: ranks see different target counts
        write_params(d, {"tiny": run})
        dirs[name] = d
    env = dict(os.environ, SASHIMI_TRACKING="0", SASHIMI_PROGRESS="0", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(launcher(tmp_path)),
        "train",
        "--key",
        "tiny",
        "--device",
        "cpu",
    ]
    out = subprocess.run(cmd, cwd=dirs["ddp"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]

    register_tiny_models(monkeypatch)
    cwd = os.getcwd()
    os.chdir(dirs["single"])
    os.environ["SASHIMI_TRACKING"] = "0"
    try:
        assert cli("train", "--run", "tiny", "--device", "cpu", "--no-progress") == 0
    finally:
        os.chdir(cwd)
        os.environ.pop("SASHIMI_TRACKING", None)

    a, b = (
        read_log(dirs["ddp"] / "results/runs/tiny"),
        read_log(dirs["single"] / "results/runs/tiny"),
    )
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    assert len([r for r in a if r["split"] == "validation"]) == 3
    for ra, rb in zip(a, b):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-5, abs=1e-5), (ra, rb)
        assert float(ra["lr"]) == pytest.approx(float(rb["lr"]), rel=1e-6)
    ca = torch.load(dirs["ddp"] / "results/runs/tiny/checkpoints/last.pt", weights_only=True)
    cb = torch.load(dirs["single"] / "results/runs/tiny/checkpoints/last.pt", weights_only=True)
    assert ca["world_size"] == 2 and len(ca["rank_state"]) == 2
    for k in cb["model"]:
        torch.testing.assert_close(ca["model"][k], cb["model"][k], rtol=1e-4, atol=1e-5)
