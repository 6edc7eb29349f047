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

from test_train import TRAIN, cli, make_prepared, register_tiny_models, tiny_run, write_params

WRITER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from sashimi.tracking import Tracker
    key, root = sys.argv[1], Path(sys.argv[2])
    tr = Tracker(key, {"train.lr": 0.001, "who": key}, root=root, flush_every_s=0.0).start()
    for step in range(1, 11):
        tr.log_metrics({"train/loss": 1.0 / step, "lr": 0.001}, step=step)
    tr.set_tag("checkpoint", key)
    tr.log_artifact(root / "a.txt", "files")
    if key == "killed":  # the job dies without closing: the worker ends the run as KILLED
        tr.flush()
        os._exit(0)
    tr.close()
    assert tr.run_id, "tracker did not start"
    assert "mlflow" not in sys.modules, "the job imported mlflow itself (not its worker)"
    print("ok", key, tr.worker_pid, os.getpid())
""")


@pytest.mark.slow
def test_parallel_writers_one_sqlite_store(tmp_path):
    """Jobs logging at once (each through its own MLflow worker process) share one SQLite
    store; the workers log everything in order; a job killed before closing leaves its run
    KILLED."""
    env = dict(os.environ, OMP_NUM_THREADS="1", SASHIMI_TRACKING="worker")
    env.pop("MLFLOW_TRACKING_URI", None)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    (tmp_path / "a.txt").write_text("hi")
    keys = ["job-0", "job-1", "killed"]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), k, str(tmp_path)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,  # shared with the job's worker: EOF once both are done
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
    assert sorted(r.info.run_name for r in runs) == sorted(keys)
    for r in runs:
        name = r.info.run_name
        assert r.info.status == ("KILLED" if name == "killed" else "FINISHED")
        assert r.data.params["who"] == name and r.data.tags["checkpoint"] == name
        hist = client.get_metric_history(r.info.run_id, "train/loss")
        assert sorted(m.step for m in hist) == list(range(1, 11))
        assert [a.path for a in client.list_artifacts(r.info.run_id, "files")] == ["files/a.txt"]


def test_shared_daemon_serves_every_job_then_exits(tmp_path):
    """By default jobs hand their MLflow calls to one shared daemon (mlflow imported once),
    which logs each job's run in order and exits when idle, removing its socket."""
    import time

    from sashimi.tracking import daemon_address

    env = dict(os.environ, OMP_NUM_THREADS="1", SASHIMI_TRACKING="1", SASHIMI_TRACKING_IDLE_S="15")
    env.pop("MLFLOW_TRACKING_URI", None)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    (tmp_path / "a.txt").write_text("hi")
    pids = {}
    for key in ("first", "second", "killed"):
        out = subprocess.run(
            [sys.executable, str(script), key, str(tmp_path)],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        assert "warning: MLflow" not in out.stderr, out.stderr[-2000:]
        if key != "killed":
            _, _, worker, job = out.stdout.split()
            pids[key] = (int(worker), int(job))
    (w1, j1), (w2, j2) = pids["first"], pids["second"]
    assert w1 == w2 and w1 not in (j1, j2)  # one daemon, not the jobs

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sashimi").experiment_id
    address = daemon_address(f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    t0 = time.monotonic()
    while True:  # the killed job's run is ended by the daemon, which then idles out
        runs = {r.info.run_name: r for r in client.search_runs([exp])}
        if runs.get("killed") and runs["killed"].info.status == "KILLED":
            if not os.path.exists(address):
                break
        assert time.monotonic() - t0 < 60, ({k: r.info.status for k, r in runs.items()}, address)
        time.sleep(0.1)
    assert runs["first"].info.status == runs["second"].info.status == "FINISHED"
    for r in runs.values():
        hist = client.get_metric_history(r.info.run_id, "train/loss")
        assert sorted(m.step for m in hist) == list(range(1, 11))


def test_broken_store_warns_once_and_never_raises(tmp_path, capsys, monkeypatch):
    from sashimi.tracking import Tracker

    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.setenv(
        "MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'afile' / 'sub' / 'mlflow.db'}"
    )
    monkeypatch.setenv("SASHIMI_TRACKING", "inprocess")
    monkeypatch.setattr("sashimi.tracking_worker._RETRIES", (0.01,))
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
    monkeypatch.setenv("SASHIMI_TRACKING", "1")  # the shared daemon reports the failure
    monkeypatch.setenv("SASHIMI_TRACKING_IDLE_S", "1")
    monkeypatch.setenv("SASHIMI_PROGRESS", "0")
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
    train = {"max_steps": 10, "log_every": 2}
    write_params(tmp_path, {"tiny": tiny_run(train=train, sample={"n": 2, "seconds": 0.01})})
    # in-process MLflow: one import for the five jobs (the worker process has its own test)
    monkeypatch.setenv("SASHIMI_TRACKING", "inprocess")
    monkeypatch.setenv("SASHIMI_PROGRESS", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli("train", "--run", "tiny") == 0
    assert cli("train", "--run", "tiny", "--max-steps", "12") == 0  # resumed: the same MLflow run
    assert cli("sample", "--run", "tiny") == 0  # clips go there too
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


def test_classifier_training_run_is_mirrored(tmp_path, monkeypatch):
    """`sashimi train` of a classifier run mirrors it like any run: params, per-epoch train and
    validation metrics at the optimiser step, checkpoints; a resume adds to the same MLflow
    run, and an interrupted one ends it KILLED."""
    import csv

    import sashimi.classifier_train as CT

    monkeypatch.chdir(tmp_path)
    make_prepared(tmp_path)  # 12 train clips (3 steps of 4 per epoch), 4 validation clips
    train = {"optimizer": "sgd", "scheduler": "plateau", "max_epochs": 2, "batch_size": 4}
    clf = {"kind": "classifier", "dataset": "tiny", "train": train,
           "model": {"name": "resnext", "width": 0.0625, "depth": 11}}  # fmt: skip
    write_params(tmp_path, {"clf": clf})
    monkeypatch.setenv("SASHIMI_TRACKING", "inprocess")
    monkeypatch.setenv("SASHIMI_PROGRESS", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli("train", "--run", "clf", "--device", "cpu", "--max-steps", "3") == 0
    assert cli("train", "--run", "clf", "--device", "cpu") == 0  # resumed: epoch 2

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sashimi").experiment_id
    runs = client.search_runs([exp])
    assert len(runs) == 1
    r = runs[0]
    assert r.info.run_name == "clf" and r.info.status == "FINISHED"
    assert r.data.params["train.lr"] == str(TRAIN["lr"])  # from train_defaults
    assert r.data.params["model.width"] == "0.0625"
    assert r.data.params["train.optimizer"] == "sgd" and int(r.data.params["n_params"]) > 0
    assert r.data.tags["kind"] == "classifier"
    ckpts = tmp_path / "results/runs/clf/checkpoints"
    assert r.data.tags["checkpoint"] == str((ckpts / "last.pt").resolve())
    assert r.data.tags["best_checkpoint"] == str((ckpts / "best.pt").resolve())
    with open(tmp_path / "results/runs/clf/train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for split in ("train", "validation"):
        logged = {int(x["step"]): x for x in rows if x["split"] == split}
        assert sorted(logged) == [3, 6]
        for name in ("loss", "accuracy"):
            hist = client.get_metric_history(r.info.run_id, f"{split}/{name}")
            got = {m.step: m.value for m in hist}
            assert got.keys() == logged.keys()
            for step, value in got.items():
                assert value == pytest.approx(float(logged[step][name]))
    lrs = client.get_metric_history(r.info.run_id, "lr")
    assert sorted(m.step for m in lrs) == [3, 6] and all(m.value > 0 for m in lrs)
    assert sorted(m.value for m in client.get_metric_history(r.info.run_id, "epoch")) == [1, 2]

    # a longer budget resumes the same MLflow run; an interrupt ends it KILLED
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(CT, "evaluate_accuracy", interrupted)
    write_params(tmp_path, {"clf": dict(clf, train=dict(train, max_epochs=3))})
    assert cli("train", "--run", "clf", "--device", "cpu") == 130
    runs = client.search_runs([exp])
    assert [x.info.run_id for x in runs] == [r.info.run_id]
    assert runs[0].info.status == "KILLED"
