"""MLflow tracking: parallel writers share one SQLite store, failures never stop training,
the import stays lazy, and a training run mirrors its params, metrics, commit and checkpoint."""

from __future__ import annotations

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
    monkeypatch.setenv("SASHIMI_TRACKING", "1")
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
    assert client.get_metric_history(r.info.run_id, "eval/nll_bits")
