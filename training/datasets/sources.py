"""The data sets: their files, official sources and checksums, and where to find them locally.

A data set is *found* when every file it needs is in one data root (see ``training.paths``).
``training.fetch`` fills ``data/raw`` from the official sources or a local folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from training.paths import data_roots

IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@dataclass(frozen=True)
class DataSet:
    name: str
    folder: str
    files: tuple[str, ...]
    title: str
    # file → (download URL, algorithm, digest) of the official copy
    official: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    # file → sha256 of other known-good copies (the ones in ../shared/data)
    known_sha256: dict[str, str] = field(default_factory=dict)
    # how the official source is fetched when it is not a plain file list
    fetcher: str = "files"


_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

DATASETS: dict[str, DataSet] = {
    "mnist": DataSet(
        "mnist",
        "mnist",
        IDX_FILES,
        "MNIST handwritten digits (60,000 + 10,000, 28×28)",
        official={
            "train-images-idx3-ubyte.gz": (_MNIST_URL + "train-images-idx3-ubyte.gz", "md5",
                                           "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            "train-labels-idx1-ubyte.gz": (_MNIST_URL + "train-labels-idx1-ubyte.gz", "md5",
                                           "d53e105ee54ea40749a09fcbcd1e9432"),
            "t10k-images-idx3-ubyte.gz": (_MNIST_URL + "t10k-images-idx3-ubyte.gz", "md5",
                                          "9fb629c4189551a2d022fa330f9573f3"),
            "t10k-labels-idx1-ubyte.gz": (_MNIST_URL + "t10k-labels-idx1-ubyte.gz", "md5",
                                          "ec29112dd5afa0611ce80d1b7f02629c"),
        },
        known_sha256={
            "train-images-idx3-ubyte.gz": "71524e2cd1ad2968737f7f2f2ff69cbfc32df8ccddff51593f7cb2d4e0eb5b64",
            "train-labels-idx1-ubyte.gz": "fe03b8bd7915f70bf5aa08be480aa413fbd85afcaa58b35d230d335f284fd88e",
            "t10k-images-idx3-ubyte.gz": "5634745efa576a17e7d4cf5cd9d09123c75e6538e5114267c2d156edaf519341",
            "t10k-labels-idx1-ubyte.gz": "ae18e77e031ccde52407f794d123116439864147d33ac992975f85dd4dc42af6",
        },
    ),
    "fashion-mnist": DataSet(
        "fashion-mnist",
        "fashion-mnist",
        IDX_FILES,
        "Fashion-MNIST clothes (60,000 + 10,000, 28×28, 10 classes)",
        official={
            "train-images-idx3-ubyte.gz": (_FASHION_URL + "train-images-idx3-ubyte.gz", "md5",
                                           "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            "train-labels-idx1-ubyte.gz": (_FASHION_URL + "train-labels-idx1-ubyte.gz", "md5",
                                           "25c81989df183df01b3e8a0aad5dffbe"),
            "t10k-images-idx3-ubyte.gz": (_FASHION_URL + "t10k-images-idx3-ubyte.gz", "md5",
                                          "bef4ecab320f06d8554ea6380940ec79"),
            "t10k-labels-idx1-ubyte.gz": (_FASHION_URL + "t10k-labels-idx1-ubyte.gz", "md5",
                                          "bb300cfdad3c16e7a12a480ee83cd310"),
        },
        known_sha256={
            "train-images-idx3-ubyte.gz": "c76353bd679da070dcaddee8c8c0e277b149281a1de3df8030c687694fad5be4",
            "train-labels-idx1-ubyte.gz": "a578f3c9ec239359c0d23abadc5d55e4a4fb20df357215637b7a2f127b006a74",
            "t10k-images-idx3-ubyte.gz": "52f5d53f8e160594d0d4a3d5da6ad460bc6edce201b862ca35279c74118562f5",
            "t10k-labels-idx1-ubyte.gz": "ae04cd950ab214637dd08f56319057c2ae10cbb660f742681f426479e3d51363",
        },
    ),
    "house-prices": DataSet(
        "house-prices",
        "house-prices",
        ("train.csv",),
        "Kaggle House Prices (Ames, Iowa): train.csv with SalePrice",
        known_sha256={
            "train.csv": "1e18addf81e5e4d347cc17ee6075bbe4a42b7fa26b9e5b063e8f692a5f929d41",
            "test.csv": "8fdd3d829d4d986b58f845c9553b225e67dd8383624d90fb6ca1d4bed5798c1e",
        },
        fetcher="openml",
    ),
    "tang300": DataSet(
        "tang300",
        "poems",
        ("tang300.txt",),
        "唐诗三百首, one poem per line",
        known_sha256={"tang300.txt": "56dcec4576c152f421abc5dde9d77db92024eeb37c016bd8207a86dd944798a5"},
        fetcher="npm-chinese-poetry",
    ),
    "quantangshi": DataSet(
        "quantangshi",
        "poems",
        ("quantangshi.jsonl.gz",),
        "全唐诗, 57,607 poems, traditional characters, JSON lines",
        known_sha256={
            "quantangshi.jsonl.gz": "ebc672d4b2149af243693fde7ec78f1aa6ff14d8381df213796cdcb88ddf5eb5"
        },
        fetcher="npm-chinese-poetry",
    ),
}


class DataMissingError(FileNotFoundError):
    """Raised with one message that names the command which fixes it."""


def missing_message(name: str) -> str:
    ds = DATASETS[name]
    looked = ", ".join(str(r / ds.folder) for r in data_roots())
    return (
        f"{ds.title} ({name}) was not found (looked in {looked}).\n"
        f"  Download it from its official source:  python -m training fetch {name}\n"
        f"  or import it from a folder you have:    python -m training fetch {name} --from /path/to/folder"
    )


def find_dataset(name: str) -> Path:
    """The folder holding every file of ``name``; :class:`DataMissingError` if none does."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}: use one of {sorted(DATASETS)}")
    ds = DATASETS[name]
    for root in data_roots():
        folder = root / ds.folder
        if all((folder / f).is_file() for f in ds.files):
            return folder
    raise DataMissingError(missing_message(name))

SHARED_DATA_DIR_HINT = (
    "If you have the files, import them: python -m training fetch {name} --from /path/to/folder"
)
