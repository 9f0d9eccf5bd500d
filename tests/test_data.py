"""Loaders on the real files: shapes, dtypes, label ranges, checksums, CSV vs IDX, poem rules."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from conftest import FULL_DATA, full_data_only

from training.datasets.house import holdout_split, load_house_train
from training.datasets.images import load_image_split, read_idx, read_image_csv
from training.datasets.poems import normalise, read_quantangshi_regular, read_tang300, regular_form
from training.datasets.sources import DATASETS, find_dataset


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_image_splits_shapes_dtypes_and_labels(dataset: str) -> None:
    train, test = load_image_split(dataset, "train"), load_image_split(dataset, "test")
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (28, 28)
    assert train.labels.dtype == np.int64 and set(np.unique(train.labels)) == set(range(10))
    # The complete sets, or the committed samples (the first 2,000 training and 500 test images).
    assert (len(train), len(test)) == ((60_000, 10_000) if FULL_DATA else (2_000, 500))
    assert np.bincount(test.labels).min() >= (800 if FULL_DATA else 30)  # every class is represented
    assert train.images.max() == 255 and train.images.min() == 0


@full_data_only
@pytest.mark.parametrize("name", sorted(DATASETS))
def test_shared_files_match_their_checksums(name: str) -> None:
    folder = find_dataset(name)
    for file in DATASETS[name].files:
        digest = hashlib.sha256((folder / file).read_bytes()).hexdigest()
        assert digest == DATASETS[name].known_sha256[file], file


def _write_csv(path: Path, images: np.ndarray, labels: np.ndarray, label_first: bool) -> None:
    pixels = [f"pixel{i}" for i in range(784)] if label_first else [f"pixel{i + 1}" for i in range(784)]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["label", *pixels] if label_first else [*pixels, "class"])
        for image, label in zip(images.reshape(len(images), -1), labels, strict=True):
            row = image.tolist()
            writer.writerow([label, *row] if label_first else [*row, label])


@pytest.mark.parametrize("label_first", [True, False], ids=["kaggle", "openml"])
def test_csv_and_idx_readers_agree(tmp_path: Path, label_first: bool) -> None:
    split = load_image_split("fashion-mnist", "test")
    path = tmp_path / "images.csv"
    _write_csv(path, split.images[:64], split.labels[:64], label_first)
    images, labels = read_image_csv(path)
    np.testing.assert_array_equal(images, split.images[:64])
    np.testing.assert_array_equal(labels, split.labels[:64])


def test_idx_reader_rejects_truncated_files(tmp_path: Path) -> None:
    good = (find_dataset("mnist") / "t10k-labels-idx1-ubyte.gz").read_bytes()
    import gzip

    raw = gzip.decompress(good)
    (tmp_path / "short.idx").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "text.idx").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "text.idx")


def test_house_prices_table_and_holdout() -> None:
    table = load_house_train()
    assert len(table.records) == 1460 and table.prices is not None
    assert len(table.numeric_columns) + len(table.categorical_columns) == 79
    assert "MSSubClass" in table.numeric_columns and "Alley" in table.categorical_columns
    assert table.prices.min() > 10_000 and table.records[0]["LotFrontage"] == 65.0
    assert table.records[0]["Alley"] is None  # "NA" in the CSV is missing, as pandas reads it
    train_idx, test_idx = holdout_split(1460)
    assert (len(train_idx), len(test_idx)) == (1168, 292)
    assert not set(train_idx) & set(test_idx)
    # scikit-learn's train_test_split(range(1460), test_size=0.2, random_state=42) starts with these
    assert test_idx[:5].tolist() == [892, 1105, 413, 522, 1036]


def test_poem_normalisation_and_form_rule() -> None:
    raw = "春眠不觉晓？处处闻啼鸟！“夜来”风雨声；花落知多少。"
    assert normalise(raw) == "春眠不觉晓。处处闻啼鸟。夜来风雨声，花落知多少。"
    canonical = "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"
    assert regular_form(normalise(raw)) == canonical
    assert regular_form("床前明月光，疑是地上霜。") is None  # two clauses are not a poem of 4 lines
    assert regular_form("床前明月光，疑是地上霜。举头望明月，低头思故乡") is None  # no final 。
    assert regular_form("床前明月光，疑是地上霜。举头望明月，低头思乡。") is None  # uneven clauses


def test_tang300_keeps_every_poem() -> None:
    poems = read_tang300()
    assert len(poems) == 319
    assert all(set(p) - {"，", "。"} and not set(p) & set("？！；“”") for p in poems)
    assert sum(len(p) <= 24 for p in poems) > 0  # the short 绝句 the textbook dropped are kept


def test_quantangshi_regular_corpus_is_simplified_and_regular() -> None:
    poems = read_quantangshi_regular()
    assert len(poems) > (40_000 if FULL_DATA else 2_000)
    assert poems[0].startswith("秦川雄帝宅，函谷壮皇居。")  # 壯 → 壮: OpenCC t2s ran
    assert all(regular_form(p) == p for p in poems[:2000])
    assert len(set(poems)) == len(poems)
