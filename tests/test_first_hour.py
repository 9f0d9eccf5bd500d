"""A fresh clone's first hour: training on the committed samples, labelling what it made, and
``./dlbook up`` choosing which run to serve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FULL_DATA, REPO, SAMPLES, full_data_only

from training.datasets.images import ImageSplit
from training.datasets.provenance import describe_training_data
from training.datasets.sources import DataMissingError, find_dataset
from training.quickstart import best_run, needs_export, run_rank
from training.tasks.image import split_train_validation, validation_size


def test_validation_is_a_capped_fraction_of_the_training_images() -> None:
    # The full set keeps the deep-MLP recipe's 50k/10k split; the 2,000 samples keep 1,667 to train on.
    assert validation_size(60_000) == 10_000
    assert validation_size(2_000) == 333
    images = np.zeros((2_000, 28, 28), np.uint8)
    train, val = split_train_validation(ImageSplit(images, np.arange(2_000) % 10))
    assert (len(train), len(val)) == (1_667, 333)


@pytest.mark.skipif(FULL_DATA, reason="the samples tier hides the complete sets")
def test_the_samples_tier_sees_no_full_data_set_anywhere() -> None:
    # DLBOOK_DATA_ONLY=1: ../shared/data and data/raw are out of sight, as on a fresh clone.
    assert Path(os.environ["DLBOOK_DATA"]).resolve() == SAMPLES.resolve()
    for name in ("mnist", "fashion-mnist", "house-prices", "tang300", "quantangshi"):
        assert find_dataset(name).resolve().is_relative_to(SAMPLES.resolve())
    env = {**os.environ, "DLBOOK_DATA": str(REPO / "no-such-folder")}
    code = "from training.datasets.sources import find_dataset; find_dataset('mnist')"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode != 0 and "python -m training fetch mnist" in done.stderr


@pytest.mark.skipif(FULL_DATA, reason="the samples tier")
def test_the_samples_are_described_as_samples() -> None:
    mnist = describe_training_data("mnist")
    assert mnist["complete"] is False and mnist["records"] == 2_000 and mnist["official_records"] == 60_000
    assert mnist["label"] == "a sample: 2,000 of 60,000 images"
    assert describe_training_data("quantangshi")["complete"] is False
    assert describe_training_data("house-prices")["complete"] is True  # the whole train.csv is committed


@full_data_only
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "house-prices", "tang300", "quantangshi"])
def test_the_complete_sets_are_described_as_complete(name: str) -> None:
    assert describe_training_data(name)["complete"] is True


def test_a_model_trained_on_the_samples_says_so_in_meta_and_on_models(exported: dict[str, dict]) -> None:
    from serving.model_store import locate_exported

    meta = exported["mlp"]
    data = meta["training"]["data"]
    assert data["dataset"] == "mnist" and data["complete"] is FULL_DATA
    described = locate_exported(meta["name"]).describe()
    assert described["trained_on"] == data
    assert described["profile"] == meta["training"]["profile"]


def _fake_run(root: Path, name: str, profile: str, complete: bool, weights: bytes) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "model.pt").write_bytes(weights)
    (run / "metrics.json").write_text(json.dumps({"profile": profile, "data": {"complete": complete}}))
    return run


def test_up_serves_the_full_run_over_the_quick_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLBOOK_RUNS", str(tmp_path))
    quick = _fake_run(tmp_path, "mlp-default-mnist-quick", "quick", True, b"quick weights")
    assert best_run("mlp", "default", "mnist") == quick
    full = _fake_run(tmp_path, "mlp-default-mnist", "full", True, b"full weights")
    assert best_run("mlp", "default", "mnist") == full
    # A full-profile run on the samples ranks below a quick run on the complete set.
    (full / "metrics.json").write_text(json.dumps({"profile": "full", "data": {"complete": False}}))
    assert best_run("mlp", "default", "mnist") == quick
    # A run still training (no metrics.json yet) is not finished.
    (quick / "metrics.json").unlink()
    assert best_run("mlp", "default", "mnist") == full


def test_up_re_exports_when_the_store_holds_other_or_weaker_weights(tmp_path: Path) -> None:
    from serving.artifacts import sha256_file

    full = _fake_run(tmp_path, "full", "full", True, b"full weights")
    summary = {"profile": "full", "data": {"complete": True}}
    assert needs_export(full, None, summary)[0]
    same = {"source": {"model_sha256": sha256_file(full / "model.pt")}, "training": summary, "tag": "m:1"}
    assert needs_export(full, same, summary) == (False, "the store already serves this run (m:1)")
    quick_in_store = {"source": {"model_sha256": "0" * 64}, "training": {"profile": "quick"}, "tag": "m:0"}
    assert needs_export(full, quick_in_store, summary)[0]
    # Exported before the source was recorded: replaced, since nothing says it is these weights.
    assert needs_export(full, {"training": {"profile": "quick"}}, summary)[0]
    # The store's full model is kept when only a quick run is left on disk.
    quick = _fake_run(tmp_path, "quick", "quick", True, b"quick weights")
    stored_full = {"source": {"model_sha256": "1" * 64}, "training": summary, "tag": "m:2"}
    export, why = needs_export(quick, stored_full, {"profile": "quick", "data": {"complete": True}})
    assert not export and "better model" in why
    assert run_rank({"profile": "full"}) > run_rank({"profile": "quick"})


def test_data_missing_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLBOOK_DATA", str(tmp_path))
    monkeypatch.setenv("DLBOOK_DATA_ONLY", "1")
    with pytest.raises(DataMissingError, match="python -m training fetch mnist"):
        find_dataset("mnist")


def test_a_half_made_venv_is_rebuilt(tmp_path: Path) -> None:
    """./dlbook's setup: a .venv whose pip does not work is removed and made again."""
    checkout = tmp_path / "clone"
    checkout.mkdir()
    for name in ("dlbook", "constraints.txt", "pyproject.toml"):
        (checkout / name).write_bytes((REPO / name).read_bytes())
    (checkout / "dlbook").chmod(0o755)
    broken = checkout / ".venv" / "bin"
    broken.mkdir(parents=True)
    (broken / "python").symlink_to(sys.executable)  # a python with no venv around it …
    (checkout / ".venv" / "pyvenv.cfg").write_text("home = /nowhere\n")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    # … and a "python3.11" that records the rebuild instead of installing GB of packages.
    (fake_bin / "python3.11").write_text(
        "#!/bin/sh\n"
        "if [ \"$1\" = -c ]; then exit 0; fi\n"
        "if [ \"$1\" = -m ] && [ \"$2\" = venv ]; then echo rebuilt > \"$3.rebuilt\"; exit 1; fi\n"
        "exit 0\n")
    (fake_bin / "python3.11").chmod(0o755)
    (broken / "python").unlink()
    (broken / "python").write_text("#!/bin/sh\nexit 1\n")  # pip does not run
    (broken / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    done = subprocess.run(["./dlbook", "setup"], cwd=checkout, env=env, capture_output=True, text=True)
    assert "incomplete (no working pip); rebuilding it" in done.stderr
    assert (checkout / ".venv.rebuilt").read_text().strip() == "rebuilt"
    assert done.returncode != 0 and "could not create .venv" in done.stderr
