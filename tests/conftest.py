"""Shared test fixtures. The official-code fixtures travel with the repository (tests/fixtures);
`../shared` (small real audio, the reference copies) is optional: tests that need it skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SASHIMI_SHARED", ROOT.parent / "shared"))
REPO_FIXTURES = ROOT / "tests" / "fixtures"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is missing (real audio and the reference copies live there)")
    return SHARED


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The official-code fixtures: tests/fixtures in the repository, else ../shared/fixtures."""
    for d in (REPO_FIXTURES, SHARED / "fixtures"):
        if d.is_dir():
            return d
    pytest.skip(f"neither {REPO_FIXTURES} nor {SHARED / 'fixtures'} exists")


@pytest.fixture(scope="session")
def shared_data_dir(shared_dir: Path) -> Path:
    d = shared_dir / "data"
    if not d.is_dir():
        pytest.skip(f"{d} is missing")
    return d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
