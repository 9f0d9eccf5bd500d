"""Kaggle House Prices CSV → typed records, and the textbook's fixed 80/20 holdout.

Types are inferred the way pandas does for the textbook: a column is numeric when every present
value parses as a number. ``NA``, ``?`` and empty cells are missing (pandas reads ``NA`` as NaN, so
e.g. Alley=NA, "no alley", becomes the textbook's "NaN" category).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.features import MISSING_STRINGS
from training.datasets.sources import find_dataset

TARGET = "SalePrice"
ID_COLUMN = "Id"


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@dataclass
class HouseTable:
    records: list[dict[str, Any]]  # feature columns only, typed, None = missing
    prices: np.ndarray | None  # float64 [N] or None for Kaggle's test.csv
    ids: list[int]
    numeric_columns: list[str]
    categorical_columns: list[str]


def read_house_csv(path: str | Path, numeric_columns: list[str] | None = None) -> HouseTable:
    """Read ``train.csv`` (or ``test.csv``; pass the training file's numeric columns for it)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path}: no rows")
    columns = [c for c in rows[0] if c not in (ID_COLUMN, TARGET)]
    if numeric_columns is None:
        numeric_columns = [
            c for c in columns
            if all(r[c] in MISSING_STRINGS or _as_number(r[c]) is not None for r in rows)
        ]
    numeric = set(numeric_columns)
    records = []
    for r in rows:
        record: dict[str, Any] = {}
        for c in columns:
            v = r[c]
            if v in MISSING_STRINGS:
                record[c] = None
            elif c in numeric:
                record[c] = _as_number(v)
            else:
                record[c] = v
        records.append(record)
    prices = np.array([float(r[TARGET]) for r in rows]) if TARGET in rows[0] else None
    return HouseTable(
        records,
        prices,
        [int(r[ID_COLUMN]) for r in rows],
        [c for c in columns if c in numeric],
        [c for c in columns if c not in numeric],
    )


def load_house_train(folder: Path | None = None) -> HouseTable:
    return read_house_csv((folder or find_dataset("house-prices")) / "train.csv")


def holdout_split(n: int, test_fraction: float = 0.2, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """The same indices as scikit-learn's ``train_test_split(test_size=0.2, random_state=42)``.

    scikit-learn permutes with ``RandomState(seed)`` and takes the first ``ceil(n·f)`` as the test
    part; replaying that keeps our holdout identical to the textbook's without the dependency.
    """
    n_test = int(np.ceil(test_fraction * n))
    perm = np.random.RandomState(seed).permutation(n)
    return perm[n_test:], perm[:n_test]
