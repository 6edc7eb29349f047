"""The trainer: optimisation settings, outputs, NaN stop, checkpoints, every real model trains.

Also home of the tiny models and data helpers the trainer / sample / evaluate tests share
(`TinyAR`, `TinyRNN`, `make_prepared`, `write_params`, `register_tiny_models`, `launcher`).
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from sashimi.errors import UserError

TESTS = Path(__file__).resolve().parent


# ============================================================================ tiny models
class TinyAR(nn.Module):
    """A causal conv language model over 8-bit tokens with the AR interface.

    context = kernel - 1; a `kernel.log_dt` parameter, declared in `ssm_parameter_names`, stands
    in for an S4 kernel parameter. `nan_after` makes training logits NaN after that
    many training forwards; `sleep` slows each training forward (kill tests).
    """

    kind = "ar"

    def __init__(self, d_model: int = 8, kernel: int = 4, nan_after: int = 0, sleep: float = 0.0):
        super().__init__()
        self.context = kernel - 1
        self.embedding = nn.Embedding(256, d_model)
        self.conv = nn.Conv1d(d_model, d_model, kernel)
        self.kernel = nn.Module()
        self.kernel.log_dt = nn.Parameter(torch.zeros(d_model))
        self.kernel.ssm_parameter_names = ("log_dt",)
        self.gain = nn.Parameter(torch.ones(1))
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, 256)
        self.nan_after, self.sleep, self.calls = nan_after, sleep, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, context + L) -> (B, L, 256)
        h = self.embedding(x).transpose(1, 2)  # (B, H, context + L)
        h = torch.tanh(self.conv(h) * self.kernel.log_dt.exp()[:, None]).transpose(
            1, 2
        )  # (B, L, H)
        logits = self.out(self.norm(h)) * self.gain  # (B, L, 256)
        if self.training:
            self.calls += 1
            if self.sleep:
                time.sleep(self.sleep)
            if self.nan_after and self.calls > self.nan_after:
                logits = logits * float("nan")
        return logits

    def setup_step(self) -> None:
        pass

    def default_state(self, batch: int, device=None) -> torch.Tensor:
        return torch.full(
            (batch, self.context), 128, dtype=torch.long, device=device
        )  # (B, context)

    def step(self, token: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        window = torch.cat([state, token[:, None]], 1)  # (B, context + 1)
        return self.forward(window)[:, -1], window[:, 1:]


class TinyRNN(nn.Module):
    """A GRU language model with the stateful AR interface (truncated-BPTT tests)."""

    kind = "ar"
    context = 0

    def __init__(self, d_model: int = 8):
        super().__init__()
        self.embedding = nn.Embedding(256, d_model)
        self.rnn = nn.GRU(d_model, d_model, batch_first=True)
        self.out = nn.Linear(d_model, 256)

    def forward(self, x, state=None, return_state=False):  # (B, L) -> (B, L, 256)
        h, s = self.rnn(self.embedding(x), state)  # (B, L, H), (1, B, H)
        logits = self.out(h)
        return (logits, s) if return_state else logits

    def detach_state(self, state):
        return state.detach()

    def setup_step(self) -> None:
        pass

    def default_state(self, batch: int, device=None):
        return None

    def step(self, token, state):
        logits, s = self.forward(token[:, None], state, return_state=True)
        return logits[:, 0], s


def register_tiny_models(monkeypatch=None) -> None:
    """Make `tiny-ar` / `tiny-rnn` buildable through sashimi.models (also in subprocesses).
    With `monkeypatch` the registration is undone after the test."""
    from sashimi import models

    sys.modules.setdefault("test_train", sys.modules[__name__])
    for name, cls in (("tiny-ar", "TinyAR"), ("tiny-rnn", "TinyRNN")):
        if monkeypatch is not None:
            monkeypatch.setitem(models._REGISTRY, name, ("test_train", cls))
        else:
            models._REGISTRY.setdefault(name, ("test_train", cls))


# ============================================================================ data and params
def make_prepared(
    root: Path,
    key: str = "tiny",
    splits: dict | None = None,
    seed: int = 0,
    lengths: tuple[int, int] = (300, 400),
) -> Path:
    """A prepared folder in the contract layout: clips of noisy sines of random lengths."""
    splits = splits or {"train": 12, "validation": 4, "test": 5}
    d = root / "data" / "prepared" / key
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    manifest = {
        "dataset": key,
        "source": "test",
        "sample_rate": 16000,
        "splits": {},
        "inputs_sha256": "0" * 64,
        "skipped": [],
    }
    for split, n in splits.items():
        clips = []
        for _ in range(n):
            L = int(rng.integers(lengths[0], lengths[1] + 1))
            t = np.arange(L) / 16000
            f = rng.uniform(200, 800)
            clips.append(
                (0.6 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(L)).astype(np.float32)
            )
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in clips])]).astype(np.int64)
        np.save(
            d / f"{split}.audio.npy", np.concatenate(clips) if clips else np.zeros(0, np.float32)
        )
        np.save(d / f"{split}.offsets.npy", offsets)
        np.save(d / f"{split}.labels.npy", rng.integers(0, 10, n).astype(np.int64))
        manifest["splits"][split] = {"clips": n, "samples": int(offsets[-1])}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


TRAIN = dict(
    batch_size=4,
    lr=3e-3,
    ssm_lr=1e-3,
    weight_decay=0.01,
    scheduler="constant",
    max_steps=20,
    val_every=10,
    val_batches=2,
    log_every=5,
    ckpt_every=5,
    keep_last=2,
    num_workers=0,
    amp=False,
    seed=0,
)


def write_params(root: Path, runs: dict, datasets: dict | None = None) -> Path:
    """A minimal params.yaml in `root` (demo scale) with the given runs."""
    datasets = datasets or {
        "tiny": {"format": "folder", "download": None, "quantization": "mu-law"}
    }
    raw = {
        "scale": "demo",
        "seed": 0,
        "train_defaults": dict(TRAIN),
        "sample_defaults": {"n": 4, "seconds": 0.01, "batch_size": 2},
        "datasets": datasets,
        "runs": runs,
    }
    p = root / "params.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def tiny_run(
    model: dict | None = None, train: dict | None = None, dataset: str = "tiny", **kw
) -> dict:
    return dict(
        {
            "dataset": dataset,
            "model": dict({"name": "tiny-ar", "d_model": 8}, **(model or {})),
            "train": dict(train or {}),
        },
        **kw,
    )


def launcher(tmp: Path) -> Path:
    """A script running `sashimi` with the tiny models registered (for subprocesses/torchrun)."""
    f = tmp / "launch_sashimi.py"
    f.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "import test_train\n"
        "test_train.register_tiny_models()\n"
        "from sashimi.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    return f


def read_log(run_dir: Path) -> list[dict]:
    with open(run_dir / "train_log.csv", newline="") as f:
        return list(csv.DictReader(f))


def cli(*argv: str) -> int:
    from sashimi.cli import main

    return main(list(argv))


def setup_workdir(tmp_path: Path, monkeypatch) -> Path:
    """A temporary project root (cwd) with tiny data; tracking off unless a test turns it on."""
    register_tiny_models(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SASHIMI_TRACKING", "0")
    monkeypatch.setenv("SASHIMI_PROGRESS", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    make_prepared(tmp_path)
    return tmp_path


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    return setup_workdir(tmp_path, monkeypatch)


# ============================================================================ optimisation
def test_param_groups_ssm_lr_and_no_decay():
    from sashimi.optim import build_optimizer, param_groups

    model = TinyAR()
    groups = {g["name"]: g for g in param_groups(model, lr=3e-3, weight_decay=0.1, ssm_lr=1e-3)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["ssm"] == {id(model.kernel.log_dt)}
    assert groups["ssm"]["lr"] == 1e-3 and groups["ssm"]["weight_decay"] == 0.0
    assert {id(model.conv.weight), id(model.out.weight), id(model.embedding.weight)} == ids["decay"]
    assert groups["decay"]["weight_decay"] == 0.1 and groups["decay"]["lr"] == 3e-3
    for p in (model.conv.bias, model.norm.weight, model.norm.bias, model.out.bias, model.gain):
        assert id(p) in ids["no_decay"]
    assert groups["no_decay"]["weight_decay"] == 0.0
    n_params = sum(len(g["params"]) for g in groups.values())
    assert n_params == len(list(model.parameters()))

    class TC:  # the optimiser keeps the groups' own lr / weight decay
        optimizer, lr, ssm_lr, weight_decay, momentum = "adamw", 3e-3, 1e-3, 0.1, 0.9

    opt = build_optimizer(model, TC)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["ssm"]["lr"] == 1e-3 and by_name["ssm"]["weight_decay"] == 0.0
    assert isinstance(opt, torch.optim.AdamW)


def test_ssm_parameters_are_the_declared_ones_only():
    from sashimi.optim import ssm_parameters

    model = TinyAR()
    assert ssm_parameters(model) == {id(model.kernel.log_dt)}
    del model.kernel.ssm_parameter_names  # same name, undeclared: an ordinary parameter
    assert ssm_parameters(model) == set()


def test_schedulers_plateau_cosine_constant():
    from sashimi.config import TrainConfig
    from sashimi.optim import build_scheduler

    def opt():
        return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0)

    o = opt()
    s = build_scheduler(o, TrainConfig(scheduler="plateau", patience=2, factor=0.5))
    lrs = []
    for _ in range(6):
        s.step(1.0)  # no improvement after the first
        lrs.append(o.param_groups[0]["lr"])
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]

    o = opt()
    s = build_scheduler(o, TrainConfig(scheduler="cosine", warmup_steps=4, max_steps=14))
    lrs = [o.param_groups[0]["lr"]]
    for _ in range(14):
        o.step()
        s.step()
        lrs.append(o.param_groups[0]["lr"])
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[9] == pytest.approx(0.5)  # half-way through the 10 decay steps
    assert lrs[14] == pytest.approx(0.0, abs=1e-12) and all(
        a >= b for a, b in zip(lrs[3:], lrs[4:])
    )

    o = opt()
    s = build_scheduler(o, TrainConfig(scheduler="constant"))
    for _ in range(3):
        o.step()
        s.step()
    assert o.param_groups[0]["lr"] == 1.0
    with pytest.raises(UserError, match="max_steps"):
        build_scheduler(opt(), TrainConfig(scheduler="cosine", max_steps=None))


def test_epoch_batches_are_a_function_of_seed_and_epoch():
    from sashimi.distributed import Dist, shard
    from sashimi.train_data import epoch_batches

    a, b = epoch_batches(10, 4, 0, 3), epoch_batches(10, 4, 0, 3)
    assert len(a) == 2 and all((x == y).all() for x, y in zip(a, b))
    assert not all((x == y).all() for x, y in zip(a, epoch_batches(10, 4, 0, 4)))
    assert len(epoch_batches(3, 4, 0, 0)) == 1 and len(epoch_batches(3, 4, 0, 0)[0]) == 4
    g = epoch_batches(10, 4, 0, 0)[0]
    assert shard(g, Dist(0, 2)) + shard(g, Dist(1, 2)) == g[0::2].tolist() + g[1::2].tolist()


# ============================================================================ training runs
def test_train_writes_log_config_and_checkpoints(workdir):
    from sashimi.checkpoints import load_model

    write_params(workdir, {"tiny": tiny_run(train={"max_steps": 30, "val_every": 10})})
    assert cli("train", "--run", "tiny") == 0
    run_dir = workdir / "results" / "runs" / "tiny"
    rows = read_log(run_dir)
    assert list(rows[0]) == [
        "step",
        "split",
        "loss",
        "bits_per_sample",
        "lr",
        "tokens_per_s",
        "elapsed_s",
    ]
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "validation"]
    assert [int(r["step"]) for r in train] == [5, 10, 15, 20, 25, 30]
    assert [int(r["step"]) for r in val] == [10, 20, 30]
    assert float(train[-1]["loss"]) < float(train[0]["loss"])  # it learns
    r = train[-1]
    assert float(r["bits_per_sample"]) == pytest.approx(float(r["loss"]) / math.log(2), rel=1e-5)
    assert float(r["tokens_per_s"]) > 0
    ck = run_dir / "checkpoints"
    assert sorted(p.name for p in ck.glob("*.pt")) == [
        "best.pt",
        "last.pt",
        "step-25.pt",
        "step-30.pt",
    ]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["key"] == "tiny" and cfg["model"]["name"] == "tiny-ar"
    model, ckpt = load_model(run_dir)
    assert Path(ckpt["path"]).name == "best.pt" and not model.training
    for k in (
        "model",
        "optimizer",
        "scheduler",
        "rng",
        "step",
        "epoch",
        "best_val",
        "config",
        "model_name",
        "model_kwargs",
        "kind",
    ):
        assert k in ckpt
    assert ckpt["kind"] == "ar" and ckpt["model_kwargs"] == {"d_model": 8}
    assert set(ckpt["rng"]) == {"torch", "cuda", "numpy", "python"}
    last = torch.load(ck / "last.pt", weights_only=True)
    assert last["step"] == 30 and last["best_val"] == pytest.approx(
        min(float(v["loss"]) for v in val)
    )
    # finished: running again does nothing (budget counted over resumes)
    assert cli("train", "--run", "tiny") == 0
    assert torch.load(ck / "last.pt", weights_only=True)["step"] == 30


def test_nan_loss_stops_and_keeps_last_good_checkpoint(workdir, capsys):
    write_params(workdir, {"tiny": tiny_run(model={"nan_after": 12}, train={"max_steps": 30})})
    assert cli("train", "--run", "tiny") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: tiny: non-finite training loss (nan) at step 13")
    assert "last.pt" in err
    last = torch.load(workdir / "results/runs/tiny/checkpoints/last.pt", weights_only=True)
    assert last["step"] == 10
    assert all(torch.isfinite(v).all() for v in last["model"].values())


def _ckpt(workdir, run="tiny", name="last.pt") -> dict:
    return torch.load(workdir / f"results/runs/{run}/checkpoints/{name}", weights_only=True)


def test_resume_follows_config_changes(workdir, capsys):
    """Budget / logging changes resume; any other change starts that run over (default) or is
    refused (explicit --resume), naming the first differing key."""
    base = {"max_steps": 6, "ckpt_every": 3}
    write_params(workdir, {"tiny": tiny_run(train=base), "other": tiny_run(train=base)})
    assert cli("train", "--run", "tiny") == 0 and cli("train", "--run", "other") == 0
    other = sorted(p.name for p in (workdir / "results/runs/other/checkpoints").glob("*.pt"))

    # budget / logging keys, sample / table / label, and defaults spelled out: resumed
    more = dict(base, max_steps=9, log_every=1, val_every=2, keep_last=3, amp=True, momentum=0.9)
    run = tiny_run(model={"kernel": 4}, train=more, table="sc09", label="x", sample={"n": 3})
    write_params(workdir, {"tiny": run, "other": tiny_run(train=base)})
    capsys.readouterr()
    assert cli("train", "--run", "tiny") == 0
    assert "resuming tiny from step 6" in capsys.readouterr().err
    assert _ckpt(workdir)["step"] == 9
    assert cli("train", "--run", "tiny", "--resume", "--max-steps", "10") == 0
    assert _ckpt(workdir)["step"] == 10

    # another model size: a fresh run, this run's old checkpoints gone, other runs untouched
    write_params(
        workdir,
        {"tiny": tiny_run(model={"d_model": 16}, train=base), "other": tiny_run(train=base)},
    )
    capsys.readouterr()
    assert cli("train", "--run", "tiny", "--max-steps", "4") == 0
    err = capsys.readouterr().err
    assert "runs.tiny: model.d_model changed 8 -> 16; starting a fresh run" in err
    assert "resuming" not in err
    ck = workdir / "results/runs/tiny/checkpoints"
    assert sorted(p.name for p in ck.glob("*.pt")) == [
        "best.pt",
        "last.pt",
        "step-3.pt",
        "step-4.pt",
    ]
    assert _ckpt(workdir)["model_kwargs"] == {"d_model": 16} and _ckpt(workdir)["step"] == 4
    assert _ckpt(workdir, name="best.pt")["model_kwargs"] == {"d_model": 16}
    assert [int(r["step"]) for r in read_log(workdir / "results/runs/tiny")][0] <= 4
    assert (
        sorted(p.name for p in (workdir / "results/runs/other/checkpoints").glob("*.pt")) == other
    )

    # explicit --resume and a changed optimiser setting: one line naming the key
    write_params(
        workdir,
        {"tiny": tiny_run(model={"d_model": 16}, train=dict(base, lr=0.01)), "other": tiny_run()},
    )
    capsys.readouterr()
    assert cli("train", "--run", "tiny", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert "train.lr changed 0.003 -> 0.01" in err and "last.pt" in err
    assert _ckpt(workdir)["step"] == 4  # untouched
    # ... and the same change by default: fresh
    assert cli("train", "--run", "tiny", "--max-steps", "2") == 0
    assert (
        "runs.tiny: train.lr changed 0.003 -> 0.01; starting a fresh run" in capsys.readouterr().err
    )
    assert _ckpt(workdir)["step"] == 2

    # the dataset's configuration counts too
    ds = {"tiny": {"format": "folder", "download": None, "quantization": "linear"}}
    write_params(workdir, {"tiny": tiny_run(model={"d_model": 16}, train=dict(base, lr=0.01))}, ds)
    assert cli("train", "--run", "tiny", "--max-steps", "3") == 0
    err = capsys.readouterr().err
    assert "runs.tiny: datasets.tiny.quantization changed 'mu-law' -> 'linear'; starting" in err
    # --no-resume always starts over
    assert cli("train", "--run", "tiny", "--no-resume", "--max-steps", "1") == 0
    assert _ckpt(workdir)["step"] == 1


def test_config_change_helpers():
    from sashimi.resume import config_change, training_config

    raw = {"dataset": "d", "model": {"name": "x", "d": 1}, "train": {"lr": 1e-3, "max_steps": 5}}
    a = training_config(raw)
    assert a["train.lr"] == 1e-3 and a["train.weight_decay"] == 0.0  # TrainConfig defaults
    assert "train.max_steps" not in a and "sample.n" not in a
    b = training_config(dict(raw, train={"lr": 1e-3, "max_steps": 50}, sample={"n": 2}))
    assert config_change(a, b) is None
    c = training_config(dict(raw, model={"name": "x", "d": 2}, train={"lr": 2e-3}))
    assert config_change(a, c) == ("model.d", 1, 2)  # the first one, in config order
    d = training_config(dict(raw, model={"name": "x", "d": 1, "e": [1, 2]}))
    assert config_change(a, d) == ("model.e", "<unset>", [1, 2])


def test_max_steps_and_minutes_overrides(workdir):
    write_params(workdir, {"tiny": tiny_run(train={"max_steps": 1000, "ckpt_every": 1000})})
    assert cli("train", "--run", "tiny", "--max-steps", "7") == 0
    assert (
        torch.load(workdir / "results/runs/tiny/checkpoints/last.pt", weights_only=True)["step"]
        == 7
    )
    t = time.monotonic()
    assert cli("train", "--run", "tiny", "--max-minutes", "0.02") == 0  # 1.2 s in total
    assert time.monotonic() - t < 30
    step = torch.load(workdir / "results/runs/tiny/checkpoints/last.pt", weights_only=True)["step"]
    assert 7 <= step < 1000


def test_max_steps_override_refused_for_a_cosine_schedule(workdir, capsys):
    """Under a cosine schedule train.max_steps shapes the lr: a command line may not change it."""
    cosine = {"scheduler": "cosine", "max_steps": 6, "warmup_steps": 1}
    write_params(workdir, {"tiny": tiny_run(train=cosine)})
    assert cli("train", "--run", "tiny", "--max-steps", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --max-steps: runs.tiny decays its lr over train.max_steps")
    assert not (workdir / "results/runs/tiny/checkpoints/last.pt").exists()


def test_tbptt_steps_per_window_and_carried_state(workdir, monkeypatch):
    from sashimi import train as T

    seen = []
    orig = T.Trainer._train_step

    def spy(self, x, y):
        seen.append((x.shape[1], self.carried is None))
        return orig(self, x, y)

    monkeypatch.setattr(T.Trainer, "_train_step", spy)
    write_params(
        workdir, {"rnn": tiny_run(model={"name": "tiny-rnn"}, train={"tbptt": 128, "max_steps": 6})}
    )
    assert cli("train", "--run", "rnn") == 0
    # clips of 300..400 samples -> 3 or 4 windows of <= 128 per batch; state None only at batch starts
    assert seen[0] == (128, True) and seen[1] == (128, False) and seen[2][1] is False
    starts = [i for i, (_, fresh) in enumerate(seen) if fresh]
    assert (
        starts[0] == 0
        and len(starts) >= 2
        and all(b - a in (3, 4) for a, b in zip(starts, starts[1:]))
    )


def test_missing_checkpoint_error_names_the_path(workdir, capsys):
    from sashimi.checkpoints import load_model

    with pytest.raises(UserError, match=r"nope\.pt: checkpoint not found"):
        load_model(workdir / "nope.pt")
    with pytest.raises(UserError, match=r"results/runs/tiny/checkpoints: no checkpoint found"):
        (workdir / "results/runs/tiny/checkpoints").mkdir(parents=True)
        load_model(workdir / "results/runs/tiny")


def test_imported_checkpoint_is_accepted(workdir):
    from sashimi.checkpoints import load_model

    m = TinyAR(d_model=8)
    d = workdir / "results/runs/imp/checkpoints"
    d.mkdir(parents=True)
    torch.save(
        {
            "model": m.state_dict(),
            "model_name": "tiny-ar",
            "model_kwargs": {"d_model": 8},
            "kind": "ar",
            "step": 0,
        },
        d / "imported.pt",
    )
    model, ckpt = load_model(workdir / "results/runs/imp")
    assert Path(ckpt["path"]).name == "imported.pt"
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), m.state_dict().values())
    )


def test_classifier_runs_take_the_same_path(workdir, monkeypatch):
    """`sashimi train --run` trains classifier runs too, with the run's own TrainConfig (no
    argument namespace in between); budget overrides apply to it like to any run."""
    import sashimi.classifier_train as CT

    got = {}

    def fake_run(P, run, *, device, resume):
        got.update(run=run, device=device, resume=resume)
        return {"run": run.key}

    monkeypatch.setattr(CT, "train_classifier_run", fake_run)
    write_params(
        workdir,
        {
            "clf": {
                "kind": "classifier",
                "dataset": "tiny",
                "model": {"name": "resnext", "width": 0.0625, "depth": 11},
                "train": {"optimizer": "sgd", "max_epochs": 2, "augment": True},
            }
        },
    )
    assert cli("train", "--run", "clf", "--max-steps", "3", "--resume") == 0
    run = got["run"]
    assert run.kind == "classifier" and run.model == {"width": 0.0625, "depth": 11}
    assert run.train.max_steps == 3 and run.train.max_epochs == 2 and run.train.augment is True
    assert run.train.optimizer == "sgd" and got["resume"] is True
    assert got["device"].type in ("cpu", "cuda")


def test_classifier_only_settings_are_refused_elsewhere(workdir, capsys):
    write_params(workdir, {"tiny": tiny_run(train={"augment": True})})
    assert cli("train", "--run", "tiny") == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: runs.tiny.train.augment: only classifier runs use it"


def test_val_every_epoch_validates_and_steps_plateau_once_per_epoch(workdir):
    """12 clips in batches of 4: 3 steps per epoch. Validation (and the plateau step) at the end
    of each epoch; best.pt is the lowest of those validations."""
    train = {
        "max_steps": None,
        "max_epochs": 3,
        "val_every": "epoch",
        "scheduler": "plateau",
        "patience": 0,
        "factor": 0.5,
        "ckpt_every": 100,
    }
    write_params(workdir, {"tiny": tiny_run(train=train)})
    assert cli("train", "--run", "tiny") == 0
    rows = read_log(workdir / "results/runs/tiny")
    val = [r for r in rows if r["split"] == "validation"]
    assert [int(r["step"]) for r in val] == [3, 6, 9]
    last, best = _ckpt(workdir), _ckpt(workdir, name="best.pt")
    assert last["step"] == 9 and last["epoch"] == 2 and last["batch_in_epoch"] == 3
    assert last["scheduler"]["last_epoch"] == 3  # three plateau steps, one per epoch
    losses = [float(r["loss"]) for r in val]
    assert best["step"] == [3, 6, 9][int(np.argmin(losses))]
    assert best["best_val"] == pytest.approx(min(losses), rel=1e-5)


def test_max_epochs_counts_over_resumes_and_a_budget_stop_keeps_the_schedule(workdir, capsys):
    """max_epochs is a budget: raising it continues the run. A run stopped mid-epoch (extra
    validation, no plateau step) and resumed ends where an uninterrupted one does."""
    train = {
        "max_steps": None,
        "max_epochs": 2,
        "val_every": "epoch",
        "scheduler": "plateau",
        "patience": 0,
        "factor": 0.5,
        "ckpt_every": 100,
    }
    write_params(workdir, {"a": tiny_run(train=train), "b": tiny_run(train=train)})
    assert cli("train", "--run", "a", "--max-steps", "4") == 0
    assert _ckpt(workdir, "a")["step"] == 4
    assert cli("train", "--run", "a") == 0 and cli("train", "--run", "b") == 0
    a, b = _ckpt(workdir, "a"), _ckpt(workdir, "b")
    assert a["step"] == b["step"] == 6
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 2
    steps = [int(r["step"]) for r in read_log(workdir / "results/runs/a") if r["split"] != "train"]
    assert steps == [3, 4, 6]  # the stop at step 4 validated too

    write_params(workdir, {"a": tiny_run(train=dict(train, max_epochs=3))})
    capsys.readouterr()
    assert cli("train", "--run", "a") == 0
    assert "resuming a from step 6" in capsys.readouterr().err
    assert _ckpt(workdir, "a")["step"] == 9


# ============================================================================ the real models
REAL = {
    "sashimi": (
        "ar",
        {
            "name": "sashimi",
            "d_model": 8,
            "n_layers": 1,
            "pool": [4, 4],
            "expand": 2,
            "ff": 2,
            "d_state": 8,
        },
        {},
    ),
    "wavenet": (
        "ar",
        {
            "name": "wavenet",
            "layers": 4,
            "blocks": 1,
            "residual_channels": 8,
            "dilation_channels": 8,
            "skip_channels": 16,
            "end_channels": 16,
        },
        {},
    ),
    "samplernn": (
        "ar",
        {"name": "samplernn", "frame_sizes": [4, 2], "n_rnn": 1, "d_hidden": 16, "d_model": 8},
        {"tbptt": 128, "clip_grad": 1.0, "clip_mode": "value"},
    ),
    "diffwave": (
        "diffusion",
        {
            "name": "diffwave",
            "backbone": "wavenet",
            "res_channels": 8,
            "skip_channels": 8,
            "num_res_layers": 2,
            "dilation_cycle": 2,
            "T": 50,
        },
        {"optimizer": "adam", "weight_decay": 0.0},
    ),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_models_train(workdir, name):
    from sashimi.models import MODELS

    try:
        MODELS[name]
    except (ImportError, AttributeError) as e:
        pytest.skip(f"model {name} not importable yet ({e})")
    kind, model, train = REAL[name]
    ds = {
        "tiny": {"format": "folder", "download": None, "quantization": "mu-law", "clip_length": 256}
    }
    write_params(
        workdir,
        {
            name: {
                "kind": kind,
                "dataset": "tiny",
                "model": model,
                "train": dict(
                    {
                        "max_steps": 24,
                        "log_every": 4,
                        "val_every": 12,
                        "ckpt_every": 12,
                        "lr": 1e-2,
                    },
                    **train,
                ),
            }
        },
        datasets=ds,
    )
    assert cli("train", "--run", name) == 0
    rows = [r for r in read_log(workdir / "results/runs" / name) if r["split"] == "train"]
    losses = [float(r["loss"]) for r in rows]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-2:]) < losses[0], losses
