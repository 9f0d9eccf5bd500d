"""fetch: import from a local folder (checksummed), refuse bad files, explain missing data."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA_ROOT

import training.fetch as fetch_module
from training.datasets import sources
from training.datasets.sources import DataMissingError, find_dataset


@pytest.fixture
def empty_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No data anywhere: data/raw and ../shared/data point at empty folders."""
    raw = tmp_path / "raw"
    monkeypatch.setenv("DLBOOK_DATA", str(tmp_path / "nothing"))
    monkeypatch.delenv("DLBOOK_DATA_ONLY", raising=False)  # look in the (empty) raw folder too
    monkeypatch.setattr("training.paths.RAW_DATA_DIR", raw)
    monkeypatch.setattr("training.paths.SHARED_DATA_DIR", tmp_path / "no-shared")
    monkeypatch.setattr(fetch_module, "RAW_DATA_DIR", raw)
    return raw


def test_missing_data_names_the_fixing_command(empty_roots: Path) -> None:
    with pytest.raises(DataMissingError) as err:
        find_dataset("fashion-mnist")
    assert "python -m training fetch fashion-mnist" in str(err.value)
    assert "--from" in str(err.value)


def test_import_from_local_folder_verifies_and_makes_it_findable(empty_roots: Path) -> None:
    folder = DATA_ROOT  # the tier's own data: the committed samples, or the complete sets
    report = fetch_module.fetch("mnist", source=folder)
    assert "imported" in report
    assert (empty_roots / "mnist" / "train-images-idx3-ubyte.gz").is_file()
    assert find_dataset("mnist") == empty_roots / "mnist"


def test_import_refuses_a_corrupt_idx_file(empty_roots: Path, tmp_path: Path) -> None:
    folder = DATA_ROOT  # the tier's own data: the committed samples, or the complete sets
    bad = tmp_path / "bad" / "mnist"
    shutil.copytree(folder / "mnist", bad)
    data = gzip.decompress((bad / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(DataMissingError, match="t10k-labels"):
        fetch_module.fetch("mnist", source=tmp_path / "bad")
    assert not (empty_roots / "mnist").exists()


def test_download_with_wrong_checksum_is_not_saved(empty_roots: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch_module, "_download", lambda url: b"not the real file")
    with pytest.raises(DataMissingError, match="md5 mismatch"):
        fetch_module.fetch("fashion-mnist")
    assert not (empty_roots / "fashion-mnist").exists()


def test_download_failure_says_how_to_import(empty_roots: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str) -> bytes:
        raise DataMissingError(f"could not download {url}: network unreachable")

    monkeypatch.setattr(fetch_module, "_download", offline)
    with pytest.raises(DataMissingError, match=r"fetch house-prices --from"):
        fetch_module.fetch("house-prices")


def test_npm_integrity_is_checked(empty_roots: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import base64
    import json

    tarball = b"fake tarball"
    wrong = base64.b64encode(hashlib.sha512(b"other").digest()).decode()
    pages = {fetch_module.NPM_POETRY: json.dumps({"dist": {"tarball": "T", "integrity": f"sha512-{wrong}"}}).encode(),
             "T": tarball}
    monkeypatch.setattr(fetch_module, "_download", pages.__getitem__)
    with pytest.raises(DataMissingError, match="integrity mismatch"):
        fetch_module.fetch("tang300")


def test_cli_reports_missing_data_with_exit_code(tmp_path: Path) -> None:
    env = {"DLBOOK_DATA": str(tmp_path), "PATH": "/usr/bin:/bin", "DLBOOK_RUNS": str(tmp_path / "runs")}
    # A run whose data cannot be found must fail with the one clear message, not a traceback.
    code = (
        "import training.paths as p, pathlib, sys;"
        f"p.RAW_DATA_DIR = pathlib.Path({str(tmp_path / 'raw')!r});"
        f"p.SHARED_DATA_DIR = pathlib.Path({str(tmp_path / 'none')!r});"
        "from training.cli import main; sys.exit(main(['train', 'lenet', '--profile', 'quick']))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stderr
    assert "python -m training fetch fashion-mnist" in result.stderr
    assert "Traceback" not in result.stderr


def test_sources_cover_every_dataset_file() -> None:
    for ds in sources.DATASETS.values():
        assert ds.files and all(f in ds.known_sha256 for f in ds.files)
