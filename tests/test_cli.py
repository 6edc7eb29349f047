"""The CLI: every verb is listed, `python -m sashimi` works, errors are one line."""

from __future__ import annotations

import subprocess
import sys

from sashimi.cli import VERBS, main


def test_help_lists_every_verb(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for verb in (
        "download",
        "prepare",
        "train",
        "sample",
        "evaluate",
        "report",
        "bench",
        "classifier",
    ):
        assert verb in out
    assert set(VERBS) >= {"download", "prepare", "train", "sample", "evaluate", "report", "bench"}


def test_python_dash_m_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "sashimi", "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "download" in r.stdout


def test_user_error_is_one_line(tmp_path, capsys):
    # a verb reading params.yaml with a missing file: one line, naming the file
    missing = tmp_path / "nope.yaml"
    code = main(["--params", str(missing), "train", "--run", "sashimi-sc09"])
    err = capsys.readouterr().err.strip()
    assert code in (2, 3)
    assert len(err.splitlines()) == 1
    if code == 2:
        assert str(missing) in err
