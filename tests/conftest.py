"""Test setup: real data from ``../shared/data`` when it is there (CI), else the committed samples.

Runs, processed corpora and the BentoML store go to per-session temporary folders.
"""

from __future__ import annotations

import os
import tempfile
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
    # A private BentoML model store for the session: tests never touch ~/bentoml.
    os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="dlbook-bentoml-")
    # Runs and processed corpora of this session go to a temporary folder, never to runs/.
    scratch = Path(tempfile.mkdtemp(prefix="dlbook-tests-"))
    os.environ["DLBOOK_RUNS"] = str(scratch / "runs")
    os.environ["DLBOOK_PROCESSED"] = str(scratch / "processed")
    warnings.filterwarnings("ignore", message=".*torch.jit.*", category=DeprecationWarning)


@pytest.fixture
def data_root() -> Path:
    return DATA_ROOT


full_data_only = pytest.mark.skipif(not FULL_DATA, reason="needs the full data sets in ../shared/data")
