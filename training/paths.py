"""Where data and runs live. One place, so every command agrees.

Data is looked up, in order, in ``$DLBOOK_DATA``, ``data/raw`` (where ``fetch`` puts it) and the
``../shared/data`` folder beside a development checkout (found automatically, as CI does).
``DLBOOK_DATA_ONLY=1`` looks in ``$DLBOOK_DATA`` alone: the test suite's samples tier uses it to prove
that a fresh clone, with no full data set anywhere, passes on the committed samples.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RAW_DATA_DIR = REPO_ROOT / "data" / "raw"
PROCESSED_DATA_DIR = REPO_ROOT / "data" / "processed"
SAMPLES_DIR = REPO_ROOT / "data" / "samples"
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def data_roots() -> list[Path]:
    roots = []
    if os.environ.get("DLBOOK_DATA"):
        roots.append(Path(os.environ["DLBOOK_DATA"]))
        if os.environ.get("DLBOOK_DATA_ONLY") == "1":
            return roots
    roots += [RAW_DATA_DIR, SHARED_DATA_DIR]
    return roots


def runs_dir() -> Path:
    return Path(os.environ.get("DLBOOK_RUNS", REPO_ROOT / "runs"))


def processed_dir() -> Path:
    path = Path(os.environ.get("DLBOOK_PROCESSED", PROCESSED_DATA_DIR))
    path.mkdir(parents=True, exist_ok=True)
    return path
