"""The package stands on its own: a non-editable install (no checkout beside it) still finds
its params.yaml schema and reference data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_validates_params_yaml(tmp_path):
    src = tmp_path / "src-copy"  # build from a copy: setuptools writes build/ beside the source
    shutil.copytree(
        ROOT / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(src),
        ],
        check=True,
    )
    check = (
        "import sys, sashimi.config as c\n"
        "assert c.__file__.startswith(sys.argv[1]), c.__file__\n"
        "p = c.load_params(sys.argv[2], scale='paper')\n"
        "print(len(p.runs))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", check, str(site), str(ROOT / "params.yaml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) > 10
    # and a wrong key is still caught by the packaged schema
    bad = tmp_path / "params.yaml"
    bad.write_text(
        (ROOT / "params.yaml").read_text().replace("train_defaults:", "train_defautls:", 1)
    )
    out = subprocess.run(
        [sys.executable, "-c", check, str(site), str(bad)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "train_defautls" in out.stderr
