"""Shared test fixtures. `../shared` (fixtures, small real audio) is optional: tests skip without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SASHIMI_SHARED", ROOT.parent / "shared"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is missing (official fixtures and real audio live there)")
    return SHARED


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir: Path) -> Path:
    d = shared_dir / "fixtures"
    if not d.is_dir():
        pytest.skip(f"{d} is missing")
    return d


@pytest.fixture(scope="session")
def shared_data_dir(shared_dir: Path) -> Path:
    d = shared_dir / "data"
    if not d.is_dir():
        pytest.skip(f"{d} is missing")
    return d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
