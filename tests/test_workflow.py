"""The workflow: Snakemake and DVC run the same commands, a rerun with nothing changed does
nothing, and a parameter change reruns only the jobs that read it.

Everything runs in a temporary copy of the repository's workflow files. The rerun tests run
a small sub-DAG for real with a stand-in `sashimi` on PATH that writes each verb's outputs
instantly, so Snakemake records real metadata (params, inputs) to compare against.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT  # tests/ is on sys.path
from sashimi.config import load_params

BIN = Path(sys.executable).parent
COPY = ["Snakefile", "profiles", "workflow", "dvc.yaml", ".dvcignore", "params.yaml", "src"]
REDIRECT = re.compile(r"\s*>\s*\S+\s+2>&1\s*$")  # the rules' `> {log} 2>&1`

FAKE_SASHIMI = r"""#!/usr/bin/env bash
# Stand-in for `sashimi`: writes what each verb writes, instantly, and logs the call.
set -euo pipefail
echo "sashimi $*" >> calls.txt
verb=$1; shift
case $verb in
  prepare)  mkdir -p data/prepared/$2 && echo '{}' > data/prepared/$2/manifest.json ;;
  train)    mkdir -p results/runs/$2/checkpoints && echo x > results/runs/$2/checkpoints/last.pt ;;
  sample)   mkdir -p results/runs/$2/samples && echo x > results/runs/$2/samples/loglik.csv ;;
  evaluate) if [ "$1" = --real ]; then d=results/runs/real-$4; else d=results/runs/$2; fi
            mkdir -p $d && echo '{}' > $d/metrics.json ;;
  *)        echo "unexpected verb $verb" >&2; exit 3 ;;
esac
"""


def _copy_repo(dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dst / name)
    return dst


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> str:
    """Run a tool of the venv in `cwd` (scale from the copy's params.yaml); its output, or fail."""
    full_env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    full_env.pop("SASHIMI_SCALE", None)
    full_env.update(env or {})
    p = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-4000:]}"
    return out


def _norm(cmd: str) -> str:
    return " ".join(REDIRECT.sub("", cmd).split())


def snakemake_jobs(cwd: Path, env: dict | None = None) -> list[tuple[str, set[str]]]:
    """(command, input files) of every job of `snakemake -n -p -F all`."""
    out = _run([str(BIN / "snakemake"), "-n", "-p", "-F", "all"], cwd, env)
    jobs, inputs = [], set()
    for line in out.splitlines():
        if re.match(r"^(?:local)?rule \S+:$", line.strip()):
            inputs = set()
        elif line.strip().startswith("input:"):
            inputs = {x.strip() for x in line.split(":", 1)[1].split(",")}
        elif line.startswith("Shell command:"):
            cmd = _norm(line.split(":", 1)[1])
            if cmd != "None":  # `rule all` has no command
                jobs.append((cmd, inputs))
    return jobs


def snakemake_commands(cwd: Path, env: dict | None = None) -> list[str]:
    return sorted(cmd for cmd, _ in snakemake_jobs(cwd, env))


def _dvc_init(cwd: Path) -> None:
    if not (cwd / ".dvc").is_dir():
        _run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd)


def dvc_commands(cwd: Path) -> list[str]:
    _dvc_init(cwd)
    out = _run([str(BIN / "dvc"), "repro", "--dry", "-f"], cwd)
    return sorted(_norm(line[2:]) for line in out.splitlines() if line.startswith("> "))


LIST_STAGES = """
import json, sys
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo
with Repo(sys.argv[1]) as repo:
    stages = [s for s in repo.index.stages if s.cmd]
    files = [[d.def_path for d in s.deps if not isinstance(d, ParamsDependency)] for s in stages]
    print(json.dumps([[s.cmd, deps] for s, deps in zip(stages, files)]))
"""


def dvc_stage_deps(cwd: Path) -> list[tuple[str, list[str]]]:
    """(command, declared file deps: params left out) of every stage of dvc.yaml, as DVC resolves them."""
    _dvc_init(cwd)
    out = _run([sys.executable, "-c", LIST_STAGES, str(cwd)], cwd)
    return [(_norm(cmd), deps) for cmd, deps in json.loads(out.strip().splitlines()[-1])]


def planned_jobs(cwd: Path, targets: list[str], env: dict | None = None) -> set[tuple[str, str]]:
    """(rule, wildcards) of every job a dry run would execute."""
    out = _run([str(BIN / "snakemake"), "-n", "--cores", "1", *targets], cwd, env)
    jobs, rule = set(), None
    for line in out.splitlines():
        m = re.match(r"^(?:local)?rule (\S+):$", line.strip())
        if m:
            rule = m.group(1)
            jobs.add((rule, ""))
            continue
        m = re.match(r"^wildcards: (.*)$", line.strip())
        if m and rule:
            jobs.discard((rule, ""))
            jobs.add((rule, m.group(1)))
    return jobs


# ----------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return _copy_repo(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def dvc_cmds(repo) -> list[str]:
    return dvc_commands(repo)


def test_snakemake_and_dvc_run_the_same_commands(repo, dvc_cmds):
    smk = snakemake_commands(repo)
    assert smk, "snakemake planned no shell commands"
    only_smk = sorted(set(smk) - set(dvc_cmds))
    only_dvc = sorted(set(dvc_cmds) - set(smk))
    assert not only_smk and not only_dvc, (
        f"Snakefile and dvc.yaml disagree.\nonly in snakemake: {only_smk}\nonly in dvc: {only_dvc}"
    )
    assert smk == dvc_cmds  # same multiset: no command twice in one and once in the other
    # every run is trained, every generative run sampled and evaluated, the report written once
    P = load_params(repo / "params.yaml", check_models=False)
    for key, run in P.runs.items():
        assert f"sashimi train --run {key}" in smk
        if run.kind != "classifier":
            assert f"sashimi sample --run {key}" in smk
            assert any(c.startswith(f"sashimi evaluate --run {key} --metrics") for c in smk)
    assert smk.count("sashimi report") == 1


# Snakemake's inputs are marker files where DVC's deps are the folders they stand for.
SMK_TO_DVC = [
    (re.compile(r"^(data/prepared/[^/]+)/manifest\.json$"), r"\1"),
    (re.compile(r"^(results/runs/[^/]+)/train\.done$"), r"\1/checkpoints"),
]


def _smk_dep(path: str) -> str:
    for pattern, repl in SMK_TO_DVC:
        path = pattern.sub(repl, path)
    return path


def _dvc_dep(repo: Path, path: str) -> set[str]:
    """A source folder stands for its *.py files (what the rules' `code()` lists), or for all its
    files when it holds no Python (e.g. src/sashimi/reference)."""
    full = repo / path
    if not (path.startswith("src/") and full.is_dir()):
        return {path}
    files = sorted(full.glob("*.py")) or sorted(f for f in full.iterdir() if f.is_file())
    return {str(f.relative_to(repo)) for f in files}


def test_snakemake_and_dvc_jobs_have_the_same_dependencies(repo, dvc_cmds):
    """Every command depends on the same data and source files in both (issue 18: dvc.yaml's
    code deps had drifted). One documented exception: DVC cannot vary deps per item, so every
    `evaluate` stage depends on the classifier checkpoint, even where its rule does not."""
    smk = {cmd: {_smk_dep(p) for p in inputs} for cmd, inputs in snakemake_jobs(repo)}
    P = load_params(repo / "params.yaml", check_models=False)
    classifiers = {
        f"results/runs/{k}/checkpoints" for k, r in P.runs.items() if r.kind == "classifier"
    }
    problems = []
    for cmd, deps in dvc_stage_deps(repo):
        want = smk.get(cmd)
        if want is None:
            continue  # a command only one side runs fails the command-parity test
        got = set().union(*(_dvc_dep(repo, d) for d in deps)) if deps else set()
        if cmd.startswith("sashimi evaluate "):
            got -= classifiers - want
        if got != want:
            problems.append(
                f"{cmd}: only in dvc.yaml {sorted(got - want)}; only in the Snakefile {sorted(want - got)}"
            )
    assert not problems, "dvc.yaml deps differ from the Snakemake inputs:\n" + "\n".join(problems)


def test_parity_at_paper_scale_except_downloads(repo, dvc_cmds):
    """At paper scale the DAG is the same plus the downloads, which DVC runs as the stages of
    its own pipeline file (workflow/raw/dvc.yaml, so the demo never downloads); no command line
    depends on the scale."""
    smk = snakemake_commands(repo, {"SASHIMI_SCALE": "paper"})
    downloads = sorted(c for c in smk if c.startswith("sashimi download "))
    P = load_params(repo / "params.yaml", scale="paper", check_models=False)
    expected = sorted(
        {
            f"sashimi download --dataset {d.download} --out data/raw/{d.download}"
            for d in P.datasets.values()
            if d.download
        }
    )
    assert downloads == expected and downloads
    assert sorted(c for c in smk if not c.startswith("sashimi download ")) == dvc_cmds
    out = _run([str(BIN / "dvc"), "repro", "--dry", "-f", "workflow/raw/dvc.yaml"], repo)
    raw = sorted(_norm(line[2:]) for line in out.splitlines() if line.startswith("> "))
    assert raw == downloads, f"workflow/raw/dvc.yaml vars.downloads: make it {expected}"


def test_dvc_yaml_lists_every_generative_run(repo):
    """dvc.yaml's hand-kept lists name exactly params.yaml's runs (clear message when not)."""
    P = load_params(repo / "params.yaml", check_models=False)
    dvc = yaml.safe_load((repo / "dvc.yaml").read_text())
    generative = next(v["generative"] for v in dvc["vars"] if "generative" in v)
    want = {k for k, r in P.runs.items() if r.kind != "classifier"}
    assert set(generative) == want, (
        f"dvc.yaml vars.generative: add {want - set(generative)}, drop {set(generative) - want}"
    )
    deps = set(dvc["stages"]["report"]["deps"])
    missing = {f"results/runs/{k}/metrics.json" for k in want} - deps
    assert not missing, f"dvc.yaml stages.report.deps: add {sorted(missing)}"


# ----------------------------------------------------------------------------- reruns

TARGETS = ["results/runs/sashimi-sc09/metrics.json", "results/runs/wavenet-sc09/metrics.json"]


@pytest.fixture(scope="module")
def built_once(tmp_path_factory) -> tuple[Path, dict]:
    """A copy where the sashimi-sc09 and wavenet-sc09 sub-DAGs have run (stand-in sashimi)."""
    tmp = tmp_path_factory.mktemp("built")
    repo = _copy_repo(tmp / "repo")
    fake = tmp / "bin"
    fake.mkdir()
    (fake / "sashimi").write_text(FAKE_SASHIMI)
    (fake / "sashimi").chmod(0o755)
    env = {"PATH": f"{fake}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    _run([str(BIN / "snakemake"), "--cores", "2", *TARGETS], repo, env)
    calls = (repo / "calls.txt").read_text().splitlines()
    assert sorted(calls) == sorted(
        [
            "sashimi prepare --key sc09",
            "sashimi prepare --key sc09-v1",
            "sashimi train --run classifier-sc09",
            "sashimi train --run sashimi-sc09",
            "sashimi train --run wavenet-sc09",
            "sashimi sample --run sashimi-sc09",
            "sashimi sample --run wavenet-sc09",
            "sashimi evaluate --run sashimi-sc09 --metrics nll,sc09",
            "sashimi evaluate --run wavenet-sc09 --metrics nll,sc09",
        ]
    )
    return repo, env


@pytest.fixture()
def built(built_once, tmp_path) -> tuple[Path, dict]:
    """A private copy of the built state (outputs, mtimes and .snakemake metadata)."""
    repo, env = built_once
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, symlinks=True)
    return copy, env


def _edit_params(repo: Path, edit) -> None:
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    edit(raw)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _run_block(raw: dict, key: str) -> dict:
    return raw["runs"][key].setdefault("demo", {})


def test_rerun_with_nothing_changed_does_nothing(built):
    repo, env = built
    assert planned_jobs(repo, TARGETS, env) == set()
    # rewriting params.yaml with the same meaning (comments, anchors, layout gone) changes nothing
    _edit_params(repo, lambda raw: None)
    assert planned_jobs(repo, TARGETS, env) == set()


def test_model_parameter_change_reruns_only_that_model(built):
    repo, env = built
    _edit_params(
        repo, lambda raw: _run_block(raw, "sashimi-sc09").setdefault("model", {}).update(d_model=24)
    )
    assert planned_jobs(repo, TARGETS, env) == {
        ("train", "run=sashimi-sc09"),
        ("sample", "run=sashimi-sc09"),
        ("evaluate", "run=sashimi-sc09"),
    }


def test_sample_parameter_change_keeps_the_checkpoint(built):
    repo, env = built
    _edit_params(
        repo, lambda raw: _run_block(raw, "wavenet-sc09").setdefault("sample", {}).update(n=4)
    )
    assert planned_jobs(repo, TARGETS, env) == {
        ("sample", "run=wavenet-sc09"),
        ("evaluate", "run=wavenet-sc09"),
    }


def test_classifier_change_rescores_but_does_not_retrain_generators(built):
    repo, env = built
    _edit_params(
        repo, lambda raw: _run_block(raw, "classifier-sc09").setdefault("train", {}).update(lr=0.07)
    )
    assert planned_jobs(repo, TARGETS, env) == {
        ("train", "run=classifier-sc09"),
        ("evaluate", "run=sashimi-sc09"),
        ("evaluate", "run=wavenet-sc09"),
    }


def test_dataset_change_reruns_its_runs_only(built):
    repo, env = built
    _edit_params(repo, lambda raw: raw["datasets"]["sc09"]["demo"]["options"].update(n_clips=100))
    jobs = planned_jobs(repo, TARGETS, env)
    assert ("prepare", "dataset=sc09") in jobs and ("train", "run=sashimi-sc09") in jobs
    assert ("prepare", "dataset=sc09-v1") not in jobs and (
        "train",
        "run=classifier-sc09",
    ) not in jobs
