"""Get a data set into ``data/raw``: import it from a folder, or download it from its official source.

Imports accept the official files and the known copies in ``../shared/data`` by checksum; any other
copy is accepted only if it parses (IDX headers, CSV columns) and its sha256 is printed, so a user
with their own mirror is not locked out but is told. Downloads are verified against the digest the
source publishes (MD5 for MNIST / Fashion-MNIST, OpenML's ``md5_checksum``, npm's ``sha512``
integrity) before anything is written under ``data/raw``.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from training.datasets.images import parse_idx
from training.datasets.sources import DATASETS, SHARED_DATA_DIR_HINT, DataMissingError, DataSet, find_dataset
from training.paths import RAW_DATA_DIR

NPM_POETRY = "https://registry.npmjs.org/chinese-poetry/2.0.1"
OPENML_HOUSE = "https://api.openml.org/api/v1/json/data/42165"
TIMEOUT_S = 60


def _digest(data: bytes, algorithm: str) -> str:
    return hashlib.new(algorithm, data).hexdigest()


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise DataMissingError(f"could not download {url}: {err}") from err


def _validate(ds: DataSet, name: str, data: bytes) -> None:
    """Refuse a file that does not parse as what it claims to be."""
    if name.endswith("ubyte.gz"):
        try:
            parse_idx(data, name)
        except (ValueError, OSError, EOFError) as err:
            raise DataMissingError(f"{name} is not a valid IDX file: {err}") from err
    elif name.endswith(".csv"):
        lines = data[:4000].decode("utf-8", "replace").splitlines()
        if len(lines) < 2 or "Id" not in lines[0]:
            raise DataMissingError(f"{name}: expected a House Prices CSV with a header and rows")
        if name == "train.csv" and "SalePrice" not in lines[0]:
            raise DataMissingError(f"{name} has no SalePrice column: not the House Prices train.csv")
    elif name.endswith(".jsonl.gz"):
        try:
            first = gzip.decompress(data).split(b"\n", 1)[0]
        except (OSError, EOFError) as err:
            raise DataMissingError(f"{name}: not a gzip file ({err})") from err
        if b"paragraphs" not in first:
            raise DataMissingError(f"{name}: expected JSON lines with 'paragraphs'")
    elif name.endswith(".txt"):
        text = data.decode("utf-8", "replace")
        poems = [line for line in text.splitlines() if line.strip()]
        if len(poems) < 10 or not any("，" in p for p in poems):
            raise DataMissingError(f"{name}: expected one poem per line with ，。 punctuation")


def _write(ds: DataSet, files: dict[str, bytes]) -> Path:
    target = RAW_DATA_DIR / ds.folder
    target.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        tmp = target / (name + ".part")
        tmp.write_bytes(data)
        tmp.replace(target / name)
    return target


def import_from(ds: DataSet, folder: Path) -> tuple[Path, list[str]]:
    """Copy ``ds``'s files from ``folder`` (or ``folder/<ds.folder>``), checking each one."""
    candidates = [folder / ds.folder, folder]
    source = next((c for c in candidates if all((c / f).is_file() for f in ds.files)), None)
    if source is None:
        raise DataMissingError(
            f"{folder} does not hold {', '.join(ds.files)} (looked in {' and '.join(map(str, candidates))})")
    files, notes = {}, []
    for name in ds.files:
        data = (source / name).read_bytes()
        sha = _digest(data, "sha256")
        official = ds.official.get(name)
        if ds.known_sha256.get(name) == sha or (official and _digest(data, official[1]) == official[2]):
            notes.append(f"{name}: checksum matches a known copy")
        else:
            _validate(ds, name, data)
            notes.append(f"{name}: unknown copy (sha256 {sha}); contents parse, accepted")
        files[name] = data
    return _write(ds, files), notes


def _download_files(ds: DataSet) -> dict[str, bytes]:
    files = {}
    for name, (url, algorithm, expected) in ds.official.items():
        data = _download(url)
        if _digest(data, algorithm) != expected:
            raise DataMissingError(f"{url}: {algorithm} mismatch (expected {expected}); not saved")
        files[name] = data
    return files


def _download_openml_house() -> dict[str, bytes]:
    """OpenML 42165 is Kaggle's train.csv (1,460 rows, same columns) as ARFF; convert it to CSV."""
    description = json.loads(_download(OPENML_HOUSE))["data_set_description"]
    data = _download(description["url"])
    if _digest(data, "md5") != description["md5_checksum"]:
        raise DataMissingError("OpenML 42165: md5 mismatch; not saved")
    lines, columns, in_data = [], [], False
    for line in data.decode("utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("%"):
            continue
        if not in_data:
            if stripped.lower().startswith("@attribute"):
                columns.append(stripped.split()[1].strip("'\""))
            elif stripped.lower().startswith("@data"):
                in_data = True
            continue
        cells = [c.strip().strip("'\"") for c in stripped.split(",")]
        lines.append(",".join("NA" if c == "?" else c for c in cells))
    if "SalePrice" not in columns or len(lines) != 1460:
        raise DataMissingError(f"OpenML 42165 did not look like House Prices train.csv ({len(lines)} rows)")
    return {"train.csv": ("\n".join([",".join(columns), *lines]) + "\n").encode()}


def _download_npm_poetry(ds: DataSet) -> dict[str, bytes]:
    """chinese-poetry 2.0.1 from the npm registry, checked against its published sha512 integrity."""
    meta = json.loads(_download(NPM_POETRY))["dist"]
    tarball = _download(meta["tarball"])
    algorithm, expected = meta["integrity"].split("-", 1)
    if base64.b64encode(hashlib.new(algorithm, tarball).digest()).decode() != expected:
        raise DataMissingError("chinese-poetry tarball: integrity mismatch; not saved")
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        if ds.name == "quantangshi":
            out = io.BytesIO()
            with gzip.GzipFile(fileobj=out, mode="wb") as gz:
                members = sorted((m for m in tar.getmembers() if "/quantangshi/poet.tang." in m.name),
                                 key=lambda m: int(m.name.rsplit(".", 2)[-2]))
                for member in members:
                    for poem in json.load(tar.extractfile(member)):
                        record = {"title": poem.get("title", ""), "author": poem.get("author", ""),
                                  "paragraphs": poem.get("paragraphs", [])}
                        gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
            return {"quantangshi.jsonl.gz": out.getvalue()}
        # 唐诗三百首: the mengxue collection, traditional → simplified, one poem per line.
        import opencc

        converter = opencc.OpenCC("t2s")
        book = json.load(tar.extractfile("package/dist/mengxue/tangshisanbaishou.json"))
        poems = [converter.convert("".join(p["paragraphs"])) for group in book["content"]
                 for p in group["content"]]
        return {"tang300.txt": ("\n".join(poems) + "\n").encode()}


def fetch(name: str, source: str | Path | None = None, force: bool = False) -> str:
    """Make ``name`` available; returns a one-line report, raises :class:`DataMissingError`."""
    ds = DATASETS[name]
    if not force and source is None:
        try:
            return f"{name}: present in {find_dataset(name)}"
        except DataMissingError:
            pass
    if source is not None:
        target, notes = import_from(ds, Path(source))
        return f"{name}: imported into {target} ({'; '.join(notes)})"
    try:
        if ds.fetcher == "files":
            files = _download_files(ds)
        elif ds.fetcher == "openml":
            files = _download_openml_house()
        else:
            files = _download_npm_poetry(ds)
    except DataMissingError as err:
        raise DataMissingError(
            f"{err}\n{ds.title} could not be fetched. {SHARED_DATA_DIR_HINT.format(name=name)}") from err
    for fname, data in files.items():
        _validate(ds, fname, data)
    return f"{name}: downloaded and verified into {_write(ds, files)}"

