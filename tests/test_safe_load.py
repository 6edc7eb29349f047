"""No loader executes a pickle: a crafted checkpoint that would run a shell command is refused by
every loader with one line naming the file and the global, and the command never runs."""

from __future__ import annotations

import os
import re
import sys
import types
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from sashimi.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = f"{os.system.__module__}.system"  # how pickle names os.system (posix.system on Linux)


class Evil:
    """Unpickling this runs `cmd` (pickle calls os.system(cmd) to rebuild it)."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / f"pwned_{uuid.uuid4().hex}"
    yield m
    assert not m.exists(), "a loader executed the pickle"


def _evil_ckpt(path: Path, marker: Path, **extra) -> Path:
    """Looks like our checkpoint (model, model_name), plus an object that runs a command."""
    torch.save(
        {"model": {"w": torch.zeros(2)}, "model_name": "sashimi", "x": Evil(f"touch {marker}")}
        | extra,
        path,
    )
    return path


def _assert_refused(msg: str, path: Path, global_name: str = SYSTEM) -> None:
    assert "\n" not in msg and str(path) in msg and global_name in msg, msg


def test_load_checkpoint_refuses(tmp_path, marker):
    from sashimi.checkpoints import load_checkpoint

    p = _evil_ckpt(tmp_path / "evil.pt", marker)
    with pytest.raises(UserError) as e:
        load_checkpoint(p)
    _assert_refused(str(e.value), p)


def test_run_folder_with_replaced_last_pt(tmp_path, marker):
    from sashimi.checkpoints import load_model

    ckdir = tmp_path / "runs" / "r" / "checkpoints"
    ckdir.mkdir(parents=True)
    p = _evil_ckpt(ckdir / "last.pt", marker)
    with pytest.raises(UserError) as e:
        load_model(tmp_path / "runs" / "r")
    _assert_refused(str(e.value), p)


def test_import_checkpoint_cli_refuses(tmp_path, marker, capsys):
    from sashimi.cli import main

    p = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": {"encoder.0.weight": torch.zeros(2)}, "hp": Evil(f"touch {marker}")}, p
    )
    assert main(["import-checkpoint", "--src", str(p), "--out", str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err.strip()
    _assert_refused(err, p)
    assert not (tmp_path / "o.pt").exists()


def test_lightning_hparams_do_not_open_the_door(tmp_path, marker):
    """The omegaconf / Lightning allowlist admits their classes only, not anything beside them."""
    omegaconf = pytest.importorskip("omegaconf")
    from sashimi.import_checkpoint import read_source

    hp = omegaconf.OmegaConf.create({"model": {"layers": 3}})
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": hp, "cb": Evil(f"touch {marker}")}, p)
    with pytest.raises(UserError) as e:
        read_source(p)
    _assert_refused(str(e.value), p)


def test_other_globals_are_named(tmp_path, marker):
    """A global outside torch's blocklist (subprocess) is refused by name too."""
    import subprocess

    from sashimi.safe_load import load_foreign

    class Sub:
        def __reduce__(self):
            return (subprocess.check_call, (["touch", str(marker)],))

    p = tmp_path / "sub.pt"
    torch.save({"x": Sub()}, p)
    with pytest.raises(UserError) as e:
        load_foreign(p)
    _assert_refused(str(e.value), p, ".check_call")  # protocol 2 writes it as commands.check_call


def _fake_official_module(monkeypatch) -> type:
    """A stand-in `models.resnext` so torch.save can name the official class (as a release does)."""
    models = types.ModuleType("models")
    resnext = types.ModuleType("models.resnext")

    class CifarResNeXt(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = nn.Linear(4, 10)

    CifarResNeXt.__module__, CifarResNeXt.__qualname__ = "models.resnext", "CifarResNeXt"
    resnext.CifarResNeXt = CifarResNeXt
    models.resnext = resnext
    monkeypatch.setitem(sys.modules, "models", models)
    monkeypatch.setitem(sys.modules, "models.resnext", resnext)
    return CifarResNeXt


def test_load_classifier_refuses_ours_and_released_forms(tmp_path, marker, monkeypatch):
    from sashimi.classifier import load_classifier

    p = _evil_ckpt(tmp_path / "evil_ours.pt", marker, model_name="resnext")
    with pytest.raises(UserError) as e:
        load_classifier(p)
    _assert_refused(str(e.value), p)
    # a pickled "released" model whose module carries an object that runs a command
    model = _fake_official_module(monkeypatch)()
    model.payload = Evil(f"touch {marker}")
    p = tmp_path / "resnext.pth"
    torch.save(nn.DataParallel(model), p)
    monkeypatch.delitem(sys.modules, "models.resnext")
    monkeypatch.delitem(sys.modules, "models")
    with pytest.raises(UserError) as e:
        load_classifier(p)
    _assert_refused(str(e.value), p)


def test_to_plain_reads_a_dictconfig(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    from sashimi.safe_load import LIGHTNING, load_foreign, to_plain

    cfg = {"model": {"layers": 3, "pool": [4, 4], "name": "w", "f": 1.5, "none": None}}
    p = tmp_path / "hp.ckpt"
    hp = omegaconf.OmegaConf.create(cfg)
    torch.save({"hyper_parameters": hp, "hparams_type": type(hp)}, p)
    obj = load_foreign(p, LIGHTNING)
    assert to_plain(obj["hyper_parameters"]) == cfg
    assert obj["hparams_type"] is LIGHTNING["omegaconf.dictconfig.DictConfig"]


def test_no_source_file_unpickles_without_weights_only():
    """Every torch.load in the package goes through safe_load (weights_only=True)."""
    offenders = []
    for f in (ROOT / "src" / "sashimi").rglob("*.py"):
        text = f.read_text()
        calls = re.findall(r"torch\.load\([^)]*\)", text)
        if "weights_only=False" in text or any("weights_only=True" not in c for c in calls):
            offenders.append(f.name)
    assert offenders == []
