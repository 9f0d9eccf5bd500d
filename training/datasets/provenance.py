"""Whether a data set on disk is the complete official set or a cut of it (such as ``data/samples``).

A model trained on the committed samples (2,000 of MNIST's 60,000 training images, 4,000 of 全唐诗's
57,607 poems) works, but it is not the model the README's figures describe. Its run summary, its
exported meta, ``/models`` and the playground all say so, so nobody mistakes a fresh clone's model
for the real one. The check counts records in the files (cheap: a header, or one pass over a few
MB), so it also holds for a cut copied somewhere else, where a path test would not.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

from training.datasets.sources import find_dataset

# The number of training records in each complete official set (../shared/data/README.md).
OFFICIAL_RECORDS = {
    "mnist": 60_000,
    "fashion-mnist": 60_000,
    "house-prices": 1_460,
    "tang300": 319,
    "quantangshi": 57_607,
}
_UNITS = {"mnist": "images", "fashion-mnist": "images", "house-prices": "houses", "tang300": "poems",
          "quantangshi": "poems"}


def _idx_count(path: Path) -> int:
    """The first dimension of an IDX file, read from its header only."""
    opener = gzip.open if path.read_bytes()[:2] == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        header = f.read(8)
    return int.from_bytes(header[4:8], "big")


def _line_count(path: Path) -> int:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def count_records(name: str) -> int:
    """Training records of ``name`` as found on disk (images, houses or poems)."""
    folder = find_dataset(name)
    if name in ("mnist", "fashion-mnist"):
        return _idx_count(folder / "train-images-idx3-ubyte.gz")
    if name == "house-prices":
        return _line_count(folder / "train.csv") - 1  # the header
    if name == "tang300":
        return _line_count(folder / "tang300.txt")
    if name == "quantangshi":
        return _line_count(folder / "quantangshi.jsonl.gz")
    raise ValueError(f"unknown data set {name!r}")


def describe_training_data(name: str) -> dict[str, Any]:
    """``{"dataset", "records", "official_records", "complete", "label"}`` for a run's summary."""
    records, official = count_records(name), OFFICIAL_RECORDS[name]
    complete = records >= official
    unit = _UNITS[name]
    label = (f"the complete set ({records:,} {unit})" if complete
             else f"a sample: {records:,} of {official:,} {unit}")
    return {"dataset": name, "records": records, "official_records": official, "complete": complete,
            "label": label}

