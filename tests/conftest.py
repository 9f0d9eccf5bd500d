"""Test setup: two data tiers, chosen by ``DLBOOK_TEST_DATA`` (``./dlbook test`` runs both).

- ``samples`` (the default): the committed real samples under ``data/samples`` and nothing else
  (``DLBOOK_DATA_ONLY=1`` hides ``data/raw`` and ``../shared/data``), exactly what a fresh clone has.
  Every test runs here except those marked ``full_data``.
- ``full``: the complete data sets (``data/raw`` or ``../shared/data``, as ``training.paths`` finds
  them); only the tests marked ``full_data`` run, for what only the complete sets can show.

Runs, processed corpora and the BentoML store go to per-session temporary folders.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import pytest

from training.datasets.sources import DATASETS

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
FULL_SETS = ("mnist", "fashion-mnist", "house-prices", "tang300", "quantangshi")
TIER = os.environ.get("DLBOOK_TEST_DATA", "samples")
if TIER not in ("samples", "full"):
    raise pytest.UsageError(f"DLBOOK_TEST_DATA must be 'samples' or 'full', not {TIER!r}")
FULL_DATA = TIER == "full"


def _full_data_root() -> Path | None:
    """The first data root holding every complete set, as ``training.paths`` would look."""
    candidates = [REPO / "data" / "raw", REPO.parent / "shared" / "data"]
    if os.environ.get("DLBOOK_DATA"):
        candidates.insert(0, Path(os.environ["DLBOOK_DATA"]))
    for root in candidates:
        if all((root / DATASETS[name].folder / f).is_file() for name in FULL_SETS for f in DATASETS[name].files):
            return root
    return None


DATA_ROOT = _full_data_root() if FULL_DATA else SAMPLES
if DATA_ROOT is None:
    raise pytest.UsageError("DLBOOK_TEST_DATA=full, but no folder (data/raw, ../shared/data or $DLBOOK_DATA) "
                            "holds every complete data set: fetch them with python -m training fetch")


def pytest_configure(config: pytest.Config) -> None:
    os.environ["DLBOOK_DATA"] = str(DATA_ROOT)
    if not FULL_DATA:
        os.environ["DLBOOK_DATA_ONLY"] = "1"  # a fresh clone: no full data set anywhere
    # A private BentoML model store for the session: tests never touch ~/bentoml.
    os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="dlbook-bentoml-")
    os.environ["BENTOML_DO_NOT_TRACK"] = "True"  # no usage analytics calls from test servers
    # Runs and processed corpora of this session go to a temporary folder, never to runs/.
    scratch = Path(tempfile.mkdtemp(prefix="dlbook-tests-"))
    os.environ["DLBOOK_RUNS"] = str(scratch / "runs")
    os.environ["DLBOOK_PROCESSED"] = str(scratch / "processed")
    # torch 2.13 warns on every torch.jit.trace/save/load ("`torch.jit.trace` is deprecated"): TorchScript is
    # deprecated in favour of torch.export since PyTorch 2.11 (https://pytorch.org/blog/pytorch-2-11-release-blog/,
    # as https://github.com/pytorch/pytorch/issues/65611 closes). We still export TorchScript for the parity check
    # and the TorchServe peer; delete this filter when nothing here calls torch.jit any more.
    warnings.filterwarnings("ignore", message=".*torch.jit.*", category=DeprecationWarning)


@pytest.fixture
def data_root() -> Path:
    return DATA_ROOT


# Tests that need the complete data sets: deselected in the samples tier by ./dlbook test, and
# skipped (with this reason) when someone runs them by hand in that tier.
full_data_only = pytest.mark.full_data


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if FULL_DATA:
        return
    skip = pytest.mark.skip(reason="needs the complete data sets: DLBOOK_TEST_DATA=full (./dlbook test runs "
                                   "that tier when data/raw or ../shared/data has them)")
    for item in items:
        if item.get_closest_marker("full_data"):
            item.add_marker(skip)


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
