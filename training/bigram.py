"""The bigram baseline the poem model must beat, scored on exactly the same tokens.

Interpolated Witten-Bell smoothing: ``P(b|a) = λ_a·c(a,b)/c(a) + (1-λ_a)·P(b)`` with
``λ_a = c(a)/(c(a)+T(a))`` (``T(a)`` = distinct followers of ``a``) and an add-one unigram ``P(b)``.
It has no knob to tune, so nobody can argue it was left weak on purpose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class BigramModel:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.pair_counts: dict[tuple[int, int], int] = {}
        self.context_counts = np.zeros(vocab_size, dtype=np.int64)
        self.followers = np.zeros(vocab_size, dtype=np.int64)
        self.unigram = np.ones(vocab_size, dtype=np.float64)

    def fit(self, sequences: Sequence[Sequence[int]]) -> BigramModel:
        for seq in sequences:
            for a, b in zip(seq[:-1], seq[1:], strict=True):
                key = (a, b)
                if key not in self.pair_counts:
                    self.pair_counts[key] = 0
                    self.followers[a] += 1
                self.pair_counts[key] += 1
                self.context_counts[a] += 1
                self.unigram[b] += 1
        self.unigram /= self.unigram.sum()
        return self

    def log_prob(self, a: int, b: int) -> float:
        c_a = self.context_counts[a]
        if c_a == 0:
            return math.log(self.unigram[b])
        lam = c_a / (c_a + self.followers[a])
        p = lam * self.pair_counts.get((a, b), 0) / c_a + (1 - lam) * self.unigram[b]
        return math.log(p)

    def nll(self, sequences: Sequence[Sequence[int]]) -> tuple[float, int]:
        """Total negative log-likelihood and number of predicted tokens (every token after the first)."""
        total, n = 0.0, 0
        for seq in sequences:
            for a, b in zip(seq[:-1], seq[1:], strict=True):
                total -= self.log_prob(a, b)
                n += 1
        return total, n
