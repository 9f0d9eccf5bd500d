"""The character vocabulary of the poem model, saved with it (the textbook never saved its own)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


@dataclass
class Vocabulary:
    """Index 0..3 are ``<pad> <bos> <eos> <unk>``; characters follow by descending frequency."""

    tokens: list[str]
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if tuple(self.tokens[:4]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        self._index = {t: i for i, t in enumerate(self.tokens)}
        if len(self._index) != len(self.tokens):
            raise ValueError("vocabulary has duplicate tokens")

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> Vocabulary:
        """Characters seen at least ``min_count`` times; ties broken by code point so builds repeat."""
        counts = Counter(ch for text in texts for ch in text)
        chars = sorted((c for c, n in counts.items() if n >= min_count), key=lambda c: (-counts[c], c))
        return cls(list(SPECIALS) + chars)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._index

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    def id_of(self, token: str) -> int:
        return self._index.get(token, self.unk_id)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self.id_of(ch) for ch in text]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.tokens[i] for i in ids if i >= len(SPECIALS))

    def unknown_chars(self, text: str) -> list[str]:
        """Characters of ``text`` the model has never seen, in order, without repeats."""
        return list(dict.fromkeys(ch for ch in text if ch not in self._index))

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        return cls(list(data["tokens"]))
