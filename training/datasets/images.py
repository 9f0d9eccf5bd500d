"""28×28 image data sets: IDX files (gzipped or not) and the Kaggle / OpenML CSV layouts.

Every reader returns ``images uint8 [N, 28, 28]`` and ``labels int64 [N]``; scaling to floats is the
model's business (``preprocessing.pixels``), not the reader's.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.datasets.sources import find_dataset

DIGIT_LABELS = [str(i) for i in range(10)]
FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_LABELS_ZH = ["T恤", "裤子", "套衫", "连衣裙", "外套", "凉鞋", "衬衫", "运动鞋", "包", "短靴"]
DIGIT_LABELS_ZH = ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九"]

LABELS = {"mnist": (DIGIT_LABELS, DIGIT_LABELS_ZH), "fashion-mnist": (FASHION_LABELS, FASHION_LABELS_ZH)}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, checking its header against its size."""
    return parse_idx(Path(path).read_bytes(), str(path))


def parse_idx(data: bytes, path: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes (gzipped or not)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes) but {len(data) - header} follow")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_image_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a Kaggle ``label,pixel0..`` CSV (label first) or OpenML ``mnist_784.csv`` (``class`` last)."""
    path = Path(path)
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    if header[0] == "label":
        label_col = 0
    elif header[-1] == "class":
        label_col = len(header) - 1
    else:
        raise ValueError(f"{path}: expected a 'label' first column or a 'class' last column, got {header[:2]}…")
    if len(header) != 785:
        raise ValueError(f"{path}: expected 784 pixel columns and a label, got {len(header)} columns")
    rows = np.array([[int(float(v)) for v in row] for row in reader if row], dtype=np.int64)
    labels = rows[:, label_col]
    pixels = np.delete(rows, label_col, axis=1)
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{path}: pixel values must lie in 0..255")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


@dataclass(frozen=True)
class ImageSplit:
    images: np.ndarray  # uint8 [N, 28, 28]
    labels: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


def load_image_split(dataset: str, split: str, folder: Path | None = None) -> ImageSplit:
    """``dataset`` is ``mnist`` or ``fashion-mnist``; ``split`` is ``train`` or ``test`` (official)."""
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    folder = folder or find_dataset(dataset)
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(f"{folder}: {split} images {images.shape} do not match labels {labels.shape}")
    return ImageSplit(images, labels)
