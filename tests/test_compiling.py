"""The run's one compile setting (`runs.<key>.compile`): what each mode compiles, on which
device and for which model; the trainer and sampler follow it; the retired keys are refused."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from sashimi import compiling
from sashimi.config import load_params
from sashimi.errors import UserError
from sashimi.ssm import kernels
from test_train import REAL, _ckpt, cli, setup_workdir, tiny_run, write_params

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object only: no GPU needed
SASHIMI = REAL["sashimi"][1]
WAVENET = REAL["wavenet"][1]

# (mode, device) -> (S4 compiled paths for a large problem, SaShiMi's compiled step)
EXPECTED = {
    ("never", CPU): (False, False),
    ("never", CUDA): (False, False),
    ("auto", CPU): (False, False),
    ("auto", CUDA): (True, True),
    ("always", CPU): (True, True),
    ("always", CUDA): (True, True),
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    return setup_workdir(tmp_path, monkeypatch)


def _build(spec: dict) -> torch.nn.Module:
    from sashimi.models import build_model

    kw = dict(spec)
    return build_model(kw.pop("name"), **kw)


@pytest.mark.parametrize("mode, device", list(EXPECTED), ids=lambda x: str(x))
def test_each_mode_maps_to_what_compiles(mode, device, monkeypatch):
    monkeypatch.setattr(kernels, "_compile_broken", False)  # an earlier test's failure aside
    s4_paths, step = EXPECTED[mode, device]
    assert kernels.compile_enabled(mode, 1 << 30, device) is s4_paths
    assert compiling.compile_step(mode, device) is step
    assert compiling.compile_step(mode, str(device)) is step  # "cuda" as a string too

    sashimi, wavenet = _build(SASHIMI), _build(WAVENET)
    compiling.apply_to_model(sashimi, mode)
    modes = [m.compile_mode for m in sashimi.modules() if hasattr(m, "compile_mode")]
    assert modes and set(modes) == {mode}
    assert not compiling.has_own_paths(wavenet)
    # the whole model only under `always`, and only for a model with no compiled path of its own
    assert compiling.compile_whole(sashimi, mode) is False
    assert compiling.compile_whole(wavenet, mode) is (mode == "always")


def test_a_bad_mode_is_one_line_naming_the_value(tmp_path):
    with pytest.raises(UserError, match="sometimes"):
        compiling.check("sometimes")
    with pytest.raises(UserError, match="sometimes"):
        compiling.compile_step("sometimes", CPU)
    p = write_params(tmp_path, {"tiny": tiny_run(compile="sometimes")})
    with pytest.raises(UserError) as e:
        load_params(p, check_models=False)
    msg = str(e.value)
    assert "runs.tiny.compile" in msg and "sometimes" in msg and "\n" not in msg


def test_run_key_default_and_demo_override(tmp_path):
    run = tiny_run(compile="always", demo={"compile": "never"})
    p = write_params(tmp_path, {"tiny": run, "plain": tiny_run()})
    assert load_params(p, scale="demo", check_models=False).run("tiny").compile == "never"
    P = load_params(p, scale="paper", check_models=False)
    assert P.run("tiny").compile == "always" and P.run("plain").compile == "auto"
    assert P.flat("tiny")["compile"] == "always"


@pytest.mark.parametrize(
    "where, path",
    [
        ("train_defaults", ("train_defaults", "compile")),
        ("sample_defaults", ("sample_defaults", "compile")),
        ("run train", ("runs", "tiny", "train", "s4_compile")),
        ("run sample", ("runs", "tiny", "sample", "compile")),
        ("run demo train", ("runs", "tiny", "demo", "train", "compile")),
    ],
)
def test_retired_keys_fail_naming_the_key(tmp_path, where, path):
    p = write_params(tmp_path, {"tiny": tiny_run()})
    raw = yaml.safe_load(p.read_text())
    node = raw
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = "always" if path[-1] == "s4_compile" else True
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError) as e:
        load_params(p, check_models=False)
    msg = str(e.value)
    assert "\n" not in msg and f"{p}: {'.'.join(path)}: retired key" in msg, msg
    assert "compile: auto | always | never" in msg


def _trainer(workdir, run: dict):
    from sashimi.distributed import Dist
    from sashimi.trainer import Trainer

    write_params(workdir, {"r": run})
    P = load_params(workdir / "params.yaml")
    return Trainer(P, P.run("r"), device=CPU, dist=Dist())


@pytest.mark.parametrize("mode", compiling.MODES)
def test_trainer_follows_the_run(workdir, mode):
    sashimi = _trainer(workdir, {"dataset": "tiny", "model": SASHIMI, "compile": mode})
    modes = [m.compile_mode for m in sashimi.model.modules() if hasattr(m, "compile_mode")]
    assert len(modes) > 3 and set(modes) == {mode}  # every S4 kernel, block and norm
    assert sashimi._compiled is False and sashimi._fwd is sashimi.net

    wavenet = _trainer(workdir, {"dataset": "tiny", "model": WAVENET, "compile": mode})
    assert wavenet._compiled is (mode == "always")  # torch.compile wraps lazily: no compiling yet
    assert (wavenet._fwd is not wavenet.net) is (mode == "always")


def test_auto_on_a_cpu_compiles_nothing(workdir, monkeypatch):
    """Train and sample a small SaShiMi under the default (auto) on a CPU: torch.compile is
    never called, and every compiled-path check the S4 layers make says no."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile called under compile: auto on a CPU")

    asked = []
    enabled = kernels.compile_enabled

    def spy(mode, elements=None, device=None):
        asked.append((mode, enabled(mode, elements, device)))
        return asked[-1][1]

    monkeypatch.setattr(torch, "compile", refuse)
    monkeypatch.setattr(kernels, "compile_enabled", spy)
    run = {"dataset": "tiny", "model": SASHIMI, "train": {"max_steps": 2, "val_every": 2}}
    write_params(workdir, {"s": run})
    assert cli("train", "--run", "s") == 0
    assert cli("sample", "--run", "s", "--device", "cpu", "--no-progress") == 0
    assert asked and {m for m, _ in asked} == {"auto"} and not any(on for _, on in asked)


def test_old_checkpoint_with_retired_keys_resumes(workdir, capsys):
    """A checkpoint saved with train.compile / train.s4_compile / sample.compile in its config
    still loads and resumes; the run-level setting does not make it stale either."""
    from sashimi.checkpoints import load_model

    base = {"max_steps": 3, "ckpt_every": 3}
    write_params(workdir, {"tiny": tiny_run(train=base)})
    assert cli("train", "--run", "tiny") == 0
    last = workdir / "results/runs/tiny/checkpoints/last.pt"
    ckpt = _ckpt(workdir)
    ckpt["config"]["train"].update(compile=False, s4_compile="always")
    ckpt["config"]["sample"] = dict(ckpt["config"].get("sample") or {}, compile=True)
    torch.save(ckpt, last)

    model, loaded = load_model(last)
    assert loaded["config"]["train"]["s4_compile"] == "always" and loaded["step"] == 3
    write_params(workdir, {"tiny": tiny_run(train=dict(base, max_steps=5), compile="never")})
    capsys.readouterr()
    assert cli("train", "--run", "tiny", "--resume") == 0
    assert "resuming tiny from step 3" in capsys.readouterr().err
    assert _ckpt(workdir)["step"] == 5


def test_bench_generate_takes_the_run_mode(capsys):
    from sashimi.cli import main

    kw = json.dumps({"d_model": 8, "n_layers": 1, "glu": False})
    argv = ["bench", "generate", "--model", "sashimi", "--model-kwargs", kw, "--steps", "8",
            "--warmup", "2", "--compile", "auto"]  # fmt: skip
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["compile"] == "auto" and r["compiled"] is False  # auto: the step on CUDA only
    with pytest.raises(SystemExit) as e:  # argparse: the choices are the run's modes
        main(["bench", "train", "--compile", "sometimes"])
    assert e.value.code == 2 and "invalid choice: 'sometimes'" in capsys.readouterr().err
