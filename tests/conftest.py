"""Test setup: real data from ``../shared/data`` when it is there (CI), else the committed samples.

Runs and processed corpora go to a per-session temporary folder so tests never touch ``runs/``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SAMPLES = REPO / "data" / "samples"
FULL_DATA = SHARED.is_dir()
DATA_ROOT = SHARED if FULL_DATA else SAMPLES


def pytest_configure(config: pytest.Config) -> None:
    os.environ["DLBOOK_DATA"] = str(DATA_ROOT)
    warnings.filterwarnings("ignore", message=".*torch.jit.*", category=DeprecationWarning)


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("DLBOOK_RUNS", str(base / "runs"))
    monkeypatch.setenv("DLBOOK_PROCESSED", str(base / "processed"))


@pytest.fixture
def data_root() -> Path:
    return DATA_ROOT


full_data_only = pytest.mark.skipif(not FULL_DATA, reason="needs the full data sets in ../shared/data")
