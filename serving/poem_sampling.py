"""How a poem is sampled: a form plan, then one token per step, constrained to that form.

A poem of ``lines`` clauses (句) of ``chars_per_clause`` characters is a fixed layout of slots:
character slots, then ``，`` after odd clauses and ``。`` after even ones. The plan fixes what must
stand where (the marks, the prompt's characters, acrostic or theme characters at line starts); every
other character slot is *sampled* from the model's logits with repetition penalty, temperature,
top-k and top-p, restricted to real characters (never ``<unk>``, a special token or a mark). So
every returned poem has exactly the requested form, by construction rather than by luck.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from preprocessing import Vocabulary

COMMA, FULL_STOP = "，", "。"
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
# Marks a user may type in a prompt; the form puts ，。 where they belong, so they are dropped.
_PROMPT_MARKS = re.compile(r"[\s，。,.;；:：、！？!?“”\"'‘’《》()（）]")


class PoemRequestError(ValueError):
    """A request that cannot become a poem of the asked form; the message says why and how to fix it."""


@dataclass(frozen=True)
class PoemForm:
    chars_per_clause: int = 5
    lines: int = 4

    def __post_init__(self) -> None:
        if self.chars_per_clause not in (5, 7):
            raise PoemRequestError(f"chars_per_clause must be 5 or 7, got {self.chars_per_clause}")
        if self.lines not in (4, 8):
            raise PoemRequestError(f"lines must be 4 (绝句) or 8 (律诗), got {self.lines}")

    @property
    def slots(self) -> int:
        return self.lines * (self.chars_per_clause + 1)

    @property
    def characters(self) -> int:
        return self.lines * self.chars_per_clause

    def mark_at(self, slot: int) -> str | None:
        """The punctuation that must stand at ``slot``, or None for a character slot."""
        line, offset = divmod(slot, self.chars_per_clause + 1)
        if offset < self.chars_per_clause:
            return None
        return COMMA if line % 2 == 0 else FULL_STOP

    def character_slots(self) -> list[int]:
        return [s for s in range(self.slots) if self.mark_at(s) is None]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 0.9
    repetition_penalty: float = 1.1

    def __post_init__(self) -> None:
        if not 0.05 <= self.temperature <= 5.0:
            raise PoemRequestError(f"temperature must lie in [0.05, 5], got {self.temperature}")
        if self.top_k < 0:
            raise PoemRequestError(f"top_k must be ≥ 0 (0 turns it off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise PoemRequestError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not 1.0 <= self.repetition_penalty <= 3.0:
            raise PoemRequestError(f"repetition_penalty must lie in [1, 3], got {self.repetition_penalty}")


@cache
def _character_mask(tokens: tuple[str, ...]) -> np.ndarray:
    """True for vocabulary entries a character slot may take: single CJK ideographs only."""
    return np.array([len(t) == 1 and bool(_CJK.match(t)) for t in tokens])


def character_mask(vocab: Vocabulary) -> np.ndarray:
    return _character_mask(tuple(vocab.tokens))


@cache
def _character_ids(tokens: tuple[str, ...]) -> np.ndarray:
    return np.flatnonzero(_character_mask(tokens))


def character_ids(vocab: Vocabulary) -> np.ndarray:
    """Ids a character slot may take, in vocabulary order."""
    return _character_ids(tuple(vocab.tokens))


def clean_prompt(prompt: str) -> str:
    return _PROMPT_MARKS.sub("", prompt)


def _check_known(vocab: Vocabulary, text: str, what: str) -> None:
    unknown = vocab.unknown_chars(text)
    if unknown:
        raise PoemRequestError(
            f"{what} has characters the model never saw: {''.join(unknown)}; replace them with common "
            "Chinese characters")
    mask = character_mask(vocab)
    bad = [ch for ch in dict.fromkeys(text) if not mask[vocab.id_of(ch)]]
    if bad:
        raise PoemRequestError(f"{what} may hold only Chinese characters, got {''.join(bad)}")


def plan_poem(form: PoemForm, vocab: Vocabulary, prompt: str = "", acrostic: str = "",
              line_starts: dict[int, str] | None = None) -> list[int | None]:
    """Token id forced at each slot (None = sample it).

    ``prompt`` fills the first character slots; ``acrostic`` puts one character at the start of each
    line; ``line_starts`` (theme keywords) puts a word at the start of given lines where nothing else
    is forced. Conflicts and characters the model does not know are refused with the reason.
    """
    prompt = clean_prompt(prompt)
    acrostic = clean_prompt(acrostic)
    _check_known(vocab, prompt, "prompt")
    _check_known(vocab, acrostic, "acrostic")
    if len(prompt) > form.characters:
        raise PoemRequestError(f"prompt has {len(prompt)} characters but a {form.lines}-line poem of "
                               f"{form.chars_per_clause}-character lines holds {form.characters}")
    if len(acrostic) > form.lines:
        raise PoemRequestError(f"acrostic has {len(acrostic)} characters but the poem has {form.lines} lines; "
                               f"use at most {form.lines} or ask for more lines")
    plan: list[int | None] = [vocab.id_of(m) if (m := form.mark_at(s)) else None for s in range(form.slots)]
    char_slots = form.character_slots()
    for slot, ch in zip(char_slots, prompt, strict=False):
        plan[slot] = vocab.id_of(ch)
    width = form.chars_per_clause + 1
    for line, ch in enumerate(acrostic):
        slot = line * width
        if plan[slot] is not None and plan[slot] != vocab.id_of(ch):
            raise PoemRequestError(f"prompt and acrostic disagree on the first character of line {line + 1}")
        plan[slot] = vocab.id_of(ch)
    for line, word in (line_starts or {}).items():
        for offset, ch in enumerate(word[: form.chars_per_clause]):
            slot = line * width + offset
            if plan[slot] is None and ch in vocab and character_mask(vocab)[vocab.id_of(ch)]:
                plan[slot] = vocab.id_of(ch)
    return plan


NUCLEUS_CANDIDATES = 256


def _nucleus(order: np.ndarray, probs: np.ndarray, top_p: float) -> np.ndarray:
    """Of ``order`` (most probable first), the smallest prefix whose probability mass reaches ``top_p``."""
    cumulative = np.cumsum(probs[order])
    return order[: int(np.searchsorted(cumulative, top_p)) + 1]


def sample_next(logits: np.ndarray, allowed_ids: np.ndarray, generated: list[int], params: SamplingParams,
                rng: np.random.Generator) -> int:
    """One character id from ``logits [V]``: penalty → mask → temperature → top-k → top-p → draw.

    Everything after the mask works on candidate ids, not on all V (≈ 6,000) entries: a full sort
    per token was 70% of decoding time. The nucleus is looked for among the most probable
    ``NUCLEUS_CANDIDATES`` first and among all candidates only when those do not reach ``top_p``,
    so the kept set is exactly the one a full sort would give.
    """
    x = logits.astype(np.float64, copy=True)
    if params.repetition_penalty != 1.0 and generated:
        seen = np.unique(np.asarray(generated))
        x[seen] = np.where(x[seen] > 0, x[seen] / params.repetition_penalty, x[seen] * params.repetition_penalty)
    candidates = allowed_ids
    scores = x[candidates] / params.temperature
    if 0 < params.top_k < len(candidates):
        top = np.argpartition(-scores, params.top_k - 1)[: params.top_k]
        candidates, scores = candidates[top], scores[top]
    scores -= scores.max()
    probs = np.exp(scores)
    probs /= probs.sum()
    if params.top_p < 1.0:
        if len(probs) > NUCLEUS_CANDIDATES:
            head = np.argpartition(-probs, NUCLEUS_CANDIDATES - 1)[:NUCLEUS_CANDIDATES]
            head = head[np.argsort(-probs[head], kind="stable")]
            if probs[head].sum() < params.top_p:
                head = np.argsort(-probs, kind="stable")
        else:
            head = np.argsort(-probs, kind="stable")
        keep = _nucleus(head, probs, params.top_p)
        candidates, probs = candidates[keep], probs[keep] / probs[keep].sum()
    cumulative = np.cumsum(probs)
    pick = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return int(candidates[min(pick, len(candidates) - 1)])


@dataclass
class PoemSampler:
    """One poem being written: feed ``next_input`` to the model, give its logits to ``advance``."""

    plan: list[int | None]
    vocab: Vocabulary
    params: SamplingParams
    seed: int
    tokens: list[int] = field(default_factory=list)  # generated slots so far

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.allowed_ids = character_ids(self.vocab)

    @property
    def done(self) -> bool:
        return len(self.tokens) == len(self.plan)

    @property
    def next_input(self) -> int:
        return self.tokens[-1] if self.tokens else self.vocab.bos_id

    def advance(self, logits: np.ndarray) -> str:
        """Choose the next slot's token from the logits that followed ``next_input``; return its text."""
        forced = self.plan[len(self.tokens)]
        if forced is not None:
            token = forced
        else:
            token = sample_next(logits, self.allowed_ids, self.tokens, self.params, self.rng)
        self.tokens.append(token)
        return self.vocab.tokens[token]

    @property
    def text(self) -> str:
        return self.vocab.decode(self.tokens)
