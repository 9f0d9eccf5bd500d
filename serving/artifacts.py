"""Reading an exported model back: ``meta.json`` plus files whose sha256 it lists. No torch here.

Export writes the digest of every artifact into ``meta.json``; loading re-hashes each file and
refuses a model whose bytes changed, naming the file, before any runtime sees it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

META_FILE = "meta.json"


class ArtifactError(RuntimeError):
    """An exported model that is missing a file, or whose file does not match its recorded digest."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_meta(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / META_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ArtifactError(f"{path}: missing; re-export the model") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: not valid JSON ({err}); re-export the model") from err


def verify_model_dir(model_dir: Path) -> dict[str, Any]:
    """Return the metadata once every listed file exists and matches its sha256."""
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{model_dir / META_FILE}: lists no files; re-export the model")
    for name, expected in files.items():
        path = model_dir / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (meta.json lists it); re-export the model")
        actual = sha256_file(path)
        if actual != expected["sha256"]:
            raise ArtifactError(
                f"{path}: sha256 {actual[:16]}… does not match the exported {expected['sha256'][:16]}…; "
                "the file is corrupted or was changed after export"
            )
    return meta
