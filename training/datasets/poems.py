"""Tang poem corpora → one normalised poem per string.

Normalisation (both corpora): ``？！`` become ``。`` and ``；：、`` become ``，`` (they close clauses the
same way), quotes, brackets and spaces are dropped, and any other character that is not a CJK
ideograph is dropped too (the textbook left ``；“”（）`` in its vocabulary).

The default corpus is **regular** 全唐诗 poems, converted from traditional to simplified with OpenCC
(``t2s``). A poem is regular when its clauses, split at any clause mark, number an even count of at
least 4 and all have 5 characters or all have 7; its marks are then rewritten as the canonical
alternation ``，。，。…`` (so 绝句, 律诗 and longer 排律 all keep their form). Exact duplicates
(the collection repeats some poems) are kept once, so no poem sits on both sides of the split.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from training.datasets.sources import find_dataset
from training.paths import processed_dir

CLAUSE_MARKS = "，。"
_TO_FULL_STOP = str.maketrans({"？": "。", "！": "。", "?": "。", "!": "。", ".": "。"})
_TO_COMMA = str.maketrans({"；": "，", "：": "，", "、": "，", ";": "，", ",": "，", ":": "，"})
_CJK = r"\u3400-\u4dbf\u4e00-\u9fff"
_NOT_KEPT = re.compile(f"[^{_CJK}，。]")
_CLAUSE_SPLIT = re.compile("[，。]")


def normalise(text: str) -> str:
    """Map clause marks onto ``，。`` and drop everything that is neither them nor an ideograph."""
    return _NOT_KEPT.sub("", text.translate(_TO_FULL_STOP).translate(_TO_COMMA))


def regular_form(poem: str) -> str | None:
    """The poem with canonical ``，。`` if it is a regular 5- or 7-character poem, else None."""
    if not poem.endswith("。"):
        return None
    clauses = _CLAUSE_SPLIT.split(poem)[:-1]
    if len(clauses) < 4 or len(clauses) % 2 or any(not c for c in clauses):
        return None
    length = len(clauses[0])
    if length not in (5, 7) or any(len(c) != length for c in clauses):
        return None
    return "".join(c + ("，" if i % 2 == 0 else "。") for i, c in enumerate(clauses))


def read_tang300(path: Path | None = None) -> list[str]:
    """唐诗三百首, every poem kept (the textbook dropped the 38 of ≤ 24 characters)."""
    path = path or find_dataset("tang300") / "tang300.txt"
    poems = [normalise(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [p for p in poems if p]


def _quantangshi_texts(path: Path) -> Iterable[str]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield "".join(json.loads(line)["paragraphs"])


def read_quantangshi_regular(path: Path | None = None, use_cache: bool = True) -> list[str]:
    """Regular poems of 全唐诗 in simplified characters, deduplicated, in corpus order.

    OpenCC over 57,607 poems takes a few seconds, so the result is cached under
    ``data/processed`` keyed by the source file's sha256.
    """
    path = path or find_dataset("quantangshi") / "quantangshi.jsonl.gz"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    cache = processed_dir() / f"quantangshi-regular-{digest}.txt"
    if use_cache and cache.is_file():
        return cache.read_text(encoding="utf-8").splitlines()
    import opencc  # only needed once per corpus version

    converter = opencc.OpenCC("t2s")
    seen: set[str] = set()
    poems = []
    for text in _quantangshi_texts(path):
        poem = regular_form(normalise(converter.convert(text)))
        if poem and poem not in seen:
            seen.add(poem)
            poems.append(poem)
    if use_cache:
        cache.write_text("\n".join(poems), encoding="utf-8")
    return poems


def heldout_split(n: int, fraction: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (train, held-out) poem indices: the held-out part is ``ceil(n·fraction)`` poems."""
    n_test = int(np.ceil(fraction * n))
    perm = np.random.RandomState(seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


CORPORA = {"tang300": read_tang300, "quantangshi": read_quantangshi_regular}


def load_corpus(name: str) -> list[str]:
    if name not in CORPORA:
        raise ValueError(f"unknown poem corpus {name!r}: use one of {sorted(CORPORA)}")
    return CORPORA[name]()
