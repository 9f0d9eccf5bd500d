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
    os.environ["BENTOML_DO_NOT_TRACK"] = "True"  # no usage analytics calls from test servers
    # Runs and processed corpora of this session go to a temporary folder, never to runs/.
    scratch = Path(tempfile.mkdtemp(prefix="dlbook-tests-"))
    os.environ["DLBOOK_RUNS"] = str(scratch / "runs")
    os.environ["DLBOOK_PROCESSED"] = str(scratch / "processed")
    warnings.filterwarnings("ignore", message=".*torch.jit.*", category=DeprecationWarning)


@pytest.fixture
def data_root() -> Path:
    return DATA_ROOT


full_data_only = pytest.mark.skipif(not FULL_DATA, reason="needs the full data sets in ../shared/data")


# Brief real trainings shared by the export and serving tests (module fixtures would train twice).
BRIEF_TRAININGS = {
    "mlp": {"limit": 1500, "epochs": 1},
    "lenet": {"limit": 4000, "epochs": 2},
    "lenet-book": {"limit": 3000, "epochs": 2},
    "price_mlp": {"epochs": 3},
    "poem_rnn": {"limit": 200, "epochs": 1},
}


@pytest.fixture(scope="session")
def trained_runs() -> dict[str, Path]:
    from training.train import TrainOptions, train

    runs = {}
    for key, settings in BRIEF_TRAININGS.items():
        arch, _, preset = key.partition("-")
        summary = train(TrainOptions(arch, preset or "default", device="cpu", progress=False,
                                     run_name=f"brief-{key}", **settings))
        runs[key] = Path(os.environ["DLBOOK_RUNS"]) / summary["run"]
    return runs


@pytest.fixture(scope="session")
def exported(trained_runs: dict[str, Path]) -> dict[str, dict]:
    """Every brief run exported once into the session's model store: key → meta (with ``tag``)."""
    from training.export import export_run

    return {key: export_run(run) for key, run in trained_runs.items()}
