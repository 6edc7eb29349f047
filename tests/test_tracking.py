"""MLflow tracking: parallel writers share one SQLite store, failures never stop training,
the import stays lazy, and a training run mirrors its params, metrics, commit and checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_train import cli, make_prepared, register_tiny_models, tiny_run, write_params

WRITER = textwrap.dedent("""
    import sys
    from sashimi.tracking import Tracker
    key, root = sys.argv[1], sys.argv[2]
    with Tracker(key, {"train.lr": 0.001, "who": key}, root=root, flush_every_s=0.0) as tr:
        assert tr.run_id, "tracker did not start"
        for step in range(1, 11):
            tr.log_metrics({"train/loss": 1.0 / step, "lr": 0.001}, step=step)
    print("ok", key)
""")


@pytest.mark.slow
def test_parallel_writers_one_sqlite_store(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", SASHIMI_TRACKING="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    keys = [f"job-{i}" for i in range(3)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), k, str(tmp_path)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in keys
    ]
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
        assert "warning: MLflow" not in err, err[-2000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sashimi")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == keys
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.params["who"] == r.info.run_name
        hist = client.get_metric_history(r.info.run_id, "train/loss")
        assert sorted(m.step for m in hist) == list(range(1, 11))


def test_broken_store_warns_once_and_never_raises(tmp_path, capsys, monkeypatch):
    from sashimi.tracking import Tracker

    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.setenv(
        "MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'afile' / 'sub' / 'mlflow.db'}"
    )
    monkeypatch.setenv("SASHIMI_TRACKING", "1")
    monkeypatch.setattr("sashimi.tracking._RETRIES", (0.01,))
    with Tracker("x", {"a": 1}, root=tmp_path) as tr:
        tr.log_metrics({"loss": 1.0}, step=1)
        tr.log_artifact(tmp_path / "afile")
        tr.flush()
        assert not tr.active
    err = capsys.readouterr().err
    assert err.count("warning: MLflow tracking off for x") == 1


def test_training_survives_a_broken_tracking_uri(tmp_path, monkeypatch, capsys):
    register_tiny_models(monkeypatch)
    monkeypatch.chdir(tmp_path)
    make_prepared(tmp_path)
    write_params(tmp_path, {"tiny": tiny_run(train={"max_steps": 6})})
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'afile' / 'mlflow.db'}")
    monkeypatch.setenv("SASHIMI_TRACKING", "1")
    monkeypatch.setenv("SASHIMI_PROGRESS", "0")
    monkeypatch.setattr("sashimi.tracking._RETRIES", (0.01,))
    assert cli("train", "--run", "tiny") == 0
    assert "warning: MLflow tracking off" in capsys.readouterr().err
    assert (tmp_path / "results/runs/tiny/checkpoints/last.pt").is_file()


BACKGROUND = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from sashimi.tracking import Tracker
    root, mode = Path(sys.argv[1]), sys.argv[2]
    tr = Tracker("bg-" + mode, {"p": 1}, root=root, flush_every_s=0.0).start()
    for step in range(1, 6):
        tr.log_metrics({"loss": 1.0 / step}, step=step)
    tr.set_tag("checkpoint", "x")
    tr.log_artifact(root / "a.txt", "files")
    if mode == "killed":  # the job dies without closing: the worker ends the run as KILLED
        tr.flush()
        os._exit(0)
    tr.close()
    assert "mlflow" not in sys.modules, "the job imported mlflow itself"
    print(tr.run_id)
""")


def test_mlflow_runs_in_a_worker_process_in_order(tmp_path):
    """The job never imports mlflow: a worker process does the MLflow calls, in order; close()
    waits for it; a job that dies without closing leaves its run KILLED, not RUNNING."""
    import time

    env = dict(os.environ, SASHIMI_TRACKING="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    (tmp_path / "a.txt").write_text("hi")
    script = tmp_path / "bg.py"
    script.write_text(BACKGROUND)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "closed"],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    run_id = out.stdout.strip().splitlines()[-1]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED" and r.data.tags["checkpoint"] == "x"
    assert r.data.params["p"] == "1"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4, 5]
    assert [a.path for a in client.list_artifacts(run_id, "files")] == ["files/a.txt"]

    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "killed"],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    exp = client.get_experiment_by_name("sashimi").experiment_id
    t0 = time.monotonic()
    while True:  # the orphaned worker finishes on its own
        runs = client.search_runs([exp], "attributes.run_name = 'bg-killed'")
        if runs and runs[0].info.status == "KILLED":
            break
        assert time.monotonic() - t0 < 120, [x.info.status for x in runs]
        time.sleep(0.2)
    hist = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted(m.step for m in hist) == [1, 2, 3, 4, 5]


def test_in_process_mode(tmp_path, monkeypatch):
    from sashimi.tracking import Tracker

    monkeypatch.setenv("SASHIMI_TRACKING", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with Tracker("sync", root=tmp_path, background=False) as tr:
        assert tr._proc is None and tr.active
        tr.log_metrics({"loss": 2.0}, step=1)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(tr.run_id).info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(tr.run_id, "loss")] == [2.0]


def test_disabled_tracking_touches_nothing(tmp_path, monkeypatch):
    from sashimi.tracking import Tracker

    monkeypatch.setenv("SASHIMI_TRACKING", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with Tracker("x", {"a": 1}, root=tmp_path) as tr:
        tr.log_metrics({"loss": 1.0}, step=1)
    assert not (tmp_path / "mlflow.db").exists()


def test_mlflow_import_is_lazy():
    code = (
        "import sys, sashimi.tracking, sashimi.train, sashimi.sample, sashimi.evaluate; "
        "sys.exit('mlflow' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_training_run_is_mirrored(tmp_path, monkeypatch):
    register_tiny_models(monkeypatch)
    monkeypatch.chdir(tmp_path)
    make_prepared(tmp_path)
    write_params(tmp_path, {"tiny": tiny_run(train={"max_steps": 10, "log_every": 2})})
    # in-process MLflow: one import for the five jobs (the worker process has its own test)
    monkeypatch.setenv("SASHIMI_TRACKING", "inprocess")
    monkeypatch.setenv("SASHIMI_PROGRESS", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli("train", "--run", "tiny") == 0
    assert cli("train", "--run", "tiny", "--max-steps", "12") == 0  # resumed: the same MLflow run
    assert (
        cli("sample", "--run", "tiny", "--n", "2", "--seconds", "0.01") == 0
    )  # clips go there too
    assert cli("evaluate", "--run", "tiny") == 0  # and the test NLL

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sashimi").experiment_id])
    assert len(runs) == 1
    r = runs[0]
    assert r.info.run_name == "tiny" and r.info.status == "FINISHED"
    assert r.data.params["train.lr"] == "0.003" and r.data.params["model.d_model"] == "8"
    assert r.data.tags["checkpoint"].endswith("results/runs/tiny/checkpoints/last.pt")
    if (Path(__file__).parents[1] / ".git").exists():
        assert len(r.data.tags["mlflow.source.git.commit"]) == 40
    steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "train/loss"))
    assert steps == [2, 4, 6, 8, 10, 12]
    assert client.get_metric_history(r.info.run_id, "validation/bits_per_sample")
    names = {a.path for a in client.list_artifacts(r.info.run_id, "samples")}
    assert {"samples/00000.wav", "samples/00001.wav", "samples/loglik.csv"} <= names
    assert "samples/summary.json" in names
    assert client.get_metric_history(r.info.run_id, "samples/realtime_factor")
    assert client.get_metric_history(r.info.run_id, "eval/nll_bits")
    assert client.get_metric_history(r.info.run_id, "eval/params")

    # a changed configuration retrains from scratch: a new MLflow run, the old one kept
    write_params(tmp_path, {"tiny": tiny_run(model={"d_model": 16}, train={"max_steps": 2})})
    assert cli("train", "--run", "tiny") == 0
    runs = client.search_runs([client.get_experiment_by_name("sashimi").experiment_id])
    assert len(runs) == 2 and {x.info.status for x in runs} == {"FINISHED"}
    new = next(x for x in runs if x.info.run_id != r.info.run_id)
    assert new.data.params["model.d_model"] == "16"
    assert json.loads((tmp_path / "results/runs/tiny/mlflow_run.json").read_text())["run_id"] == (
        new.info.run_id
    )
