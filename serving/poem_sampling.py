"""How a poem is sampled: a form plan, then one token per step, constrained to that form.

A poem of ``lines`` clauses (句) of ``chars_per_clause`` characters is a fixed layout of slots:
character slots, then ``，`` after odd clauses and ``。`` after even ones. The plan fixes what must
stand where (the marks, the prompt's characters, acrostic or theme characters at line starts); every
other character slot is *sampled* from the model's logits with repetition penalty, temperature,
top-k and top-p, restricted to real characters (never ``<unk>``, a special token or a mark). So
every returned poem has exactly the requested form, by construction rather than by luck.

What reaches this module was checked once, by the request model (``serving.request_models``): the
form, the sampling parameters, the prompt's and acrostic's lengths and characters. Only what depends
on the model is checked here: whether it knows each character the plan fixes.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Protocol

import numpy as np

from preprocessing import Vocabulary

if TYPE_CHECKING:
    from serving.prosody import ProsodySpec

COMMA, FULL_STOP = "，", "。"
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")  # what a character slot may hold: one ideograph


class PoemRequestError(ValueError):
    """A valid request this model cannot write (a character it never saw, a rhyme the plan cannot
    meet); the message says why and how to fix it."""


@dataclass(frozen=True)
class PoemForm:
    """``lines`` clauses of ``chars_per_clause`` characters; the forms served are the request model's."""

    chars_per_clause: int = 5
    lines: int = 4

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


# The largest factor a temperature may scale the logits by: 1/T of a tiny temperature would overflow
# float32 (and turn the row into NaN); at 1e30 only the largest logit keeps any weight anyway.
MAX_INVERSE_TEMPERATURE = 1e30


@dataclass(frozen=True)
class SamplingParams:
    """One poem's sampling parameters; their bounds are the request model's (``PoemRequest.sampling``)."""

    temperature: float = 0.8  # 0 = greedy: each free slot takes the most likely allowed character
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 0.9
    repetition_penalty: float = 1.1


@cache
def _character_mask(tokens: tuple[str, ...]) -> np.ndarray:
    """True for vocabulary entries a character slot may take: single CJK ideographs only."""
    return np.array([len(t) == 1 and bool(CJK.match(t)) for t in tokens])


@cache
def _character_ids(tokens: tuple[str, ...]) -> np.ndarray:
    return np.flatnonzero(_character_mask(tokens))


_PER_VOCABULARY: dict[int, tuple[Vocabulary, np.ndarray, np.ndarray]] = {}


def _character_arrays(vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """(mask, ids) of ``vocab``, kept per Vocabulary object. The caches above key on the tokens'
    tuple, which is 70 µs to build and hash for 6,000 tokens, and a request asked for it several
    times (planning and each sampler); they stay underneath so equal vocabularies share one array."""
    hit = _PER_VOCABULARY.get(id(vocab))
    if hit is not None and hit[0] is vocab:
        return hit[1], hit[2]
    tokens = tuple(vocab.tokens)
    arrays = _character_mask(tokens), _character_ids(tokens)
    if len(_PER_VOCABULARY) >= 32:
        _PER_VOCABULARY.clear()
    _PER_VOCABULARY[id(vocab)] = (vocab, *arrays)
    return arrays


def character_mask(vocab: Vocabulary) -> np.ndarray:
    return _character_arrays(vocab)[0]


def character_ids(vocab: Vocabulary) -> np.ndarray:
    """Ids a character slot may take, in vocabulary order."""
    return _character_arrays(vocab)[1]


def _check_known(vocab: Vocabulary, text: str, what: str) -> None:
    unknown = vocab.unknown_chars(text)
    if unknown:
        raise PoemRequestError(
            f"{what} has characters the model never saw: {''.join(unknown)}; replace them with common "
            "Chinese characters")


def plan_poem(form: PoemForm, vocab: Vocabulary, prompt: str = "", acrostic: str = "",
              line_starts: dict[int, str] | None = None) -> list[int | None]:
    """Token id forced at each slot (None = sample it).

    ``prompt`` fills the first character slots; ``acrostic`` puts one character at the start of each
    line; ``line_starts`` (theme keywords) puts a word at the start of given lines where nothing else
    is forced. Both come from a validated ``PoemRequest`` (Chinese characters only, marks dropped,
    within the form, agreeing with each other); characters this model never saw are refused here.
    """
    _check_known(vocab, prompt, "prompt")
    _check_known(vocab, acrostic, "acrostic")
    plan: list[int | None] = [vocab.id_of(m) if (m := form.mark_at(s)) else None for s in range(form.slots)]
    char_slots = form.character_slots()
    for slot, ch in zip(char_slots, prompt, strict=False):
        plan[slot] = vocab.id_of(ch)
    width = form.chars_per_clause + 1
    for line, ch in enumerate(acrostic):
        plan[line * width] = vocab.id_of(ch)
    for line, word in (line_starts or {}).items():
        for offset, ch in enumerate(word[: form.chars_per_clause]):
            slot = line * width + offset
            if plan[slot] is None and ch in vocab and character_mask(vocab)[vocab.id_of(ch)]:
                plan[slot] = vocab.id_of(ch)
    return plan


NUCLEUS_CANDIDATES = 1024


_BIASES: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _mask_bias(allowed: np.ndarray, vocab_size: int) -> np.ndarray:
    """0 for vocabulary ids a character slot may take, -inf for the rest (float32, ``[V]``).

    Adding it to the logits is one contiguous pass, where gathering the allowed columns was a
    fancy-indexing copy three times slower, and the columns stay vocabulary ids. Kept per ``allowed``
    array (one per vocabulary in practice, see :func:`character_ids`).
    """
    hit = _BIASES.get(id(allowed))
    if hit is not None and hit[0] is allowed and len(hit[1]) == vocab_size:
        return hit[1]
    bias = np.full(vocab_size, -np.inf, dtype=np.float32)
    bias[allowed] = 0.0
    if len(_BIASES) >= 32:
        _BIASES.clear()
    _BIASES[id(allowed)] = (allowed, bias)
    return bias


def _penalise(x: np.ndarray, histories: list[list[int]], penalties: np.ndarray) -> None:
    """Repetition penalty, in place, on every row at once: each token a row already holds is made
    less likely once (a positive score divided by the row's penalty, a negative one multiplied),
    however often it occurs. Only the (row, token) cells the histories name are touched: a thousand
    cells instead of two passes over the whole ``[B, V]`` array."""
    lengths = [len(h) for h in histories]
    if not any(lengths) or not np.any(penalties != 1.0):
        return
    vocab_size = x.shape[1]
    rows = np.repeat(np.arange(len(histories)), lengths)
    tokens = np.fromiter(itertools.chain.from_iterable(histories), dtype=np.int64, count=sum(lengths))
    cells = rows * vocab_size + tokens  # repeats read the same score and write the same result: once
    values = x.ravel()[cells]
    factor = penalties[cells // vocab_size].astype(x.dtype)
    x.ravel()[cells] = np.where(values > 0, values / factor, values * factor)


def _nucleus_thresholds(weights: np.ndarray, totals: np.ndarray, top_p: np.ndarray) -> np.ndarray:
    """Per row, the smallest weight the top-p nucleus keeps (0 for rows with ``top_p`` 1).

    Found from the weight *values*, never by sorting indices: numpy sorts and partitions plain float
    arrays with SIMD, ~10× faster than ``argsort``. The ``NUCLEUS_CANDIDATES`` largest weights of each
    row are partitioned out and sorted; the weight where their running sum reaches ``top_p`` of the
    row's total is the threshold (a row whose head holds less than that sorts all its weights instead).
    Keeping every weight at or above it gives the set a full sort would keep, ties at the threshold aside.
    """
    rows, count = weights.shape
    thresholds = np.zeros(rows, dtype=np.float32)
    nucleus = np.flatnonzero(top_p < 1.0)
    if not len(nucleus):
        return thresholds
    needed = top_p[nucleus] * totals[nucleus]
    head_size = min(NUCLEUS_CANDIDATES, count)
    head = np.sort(np.partition(weights[nucleus], count - head_size, axis=1)[:, count - head_size:], axis=1)
    head = head[:, ::-1]
    running = np.cumsum(head, axis=1)
    cut = np.minimum((running < needed[:, None]).sum(axis=1), head_size - 1)
    thresholds[nucleus] = head[np.arange(len(nucleus)), cut]
    for i in np.flatnonzero(running[:, -1] < needed):  # head too light: sort the whole row
        values = np.sort(weights[nucleus[i]])[::-1]
        cut_all = int(np.searchsorted(np.cumsum(values), needed[i]))
        thresholds[nucleus[i]] = values[min(cut_all, count - 1)]
    return thresholds


def _draw(weights: np.ndarray, thresholds: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Per row, the column of a draw among the weights at or above the row's threshold.

    Only the kept cells are summed (tens, rarely thousands, of ``V``), packed to the left of a
    ``[B, most kept]`` array so each row's running sum is its own, exactly as if sampled alone.
    A draw that rounding puts at the row's total takes the last kept cell.
    """
    floor = np.maximum(thresholds, np.finfo(np.float32).smallest_subnormal)  # never a zero weight
    kept = np.flatnonzero(weights >= floor[:, None])  # ~6× faster than a 2-D np.nonzero
    rows, cols = np.divmod(kept, weights.shape[1])
    counts = np.bincount(rows, minlength=len(weights))
    starts = np.cumsum(counts) - counts
    packed = np.zeros((len(weights), counts.max()), dtype=np.float64)
    packed[rows, np.arange(len(rows)) - starts[rows]] = weights.ravel()[kept]
    running = np.cumsum(packed, axis=1)
    targets = uniforms * running[np.arange(len(weights)), counts - 1]
    picked = np.minimum((running <= targets[:, None]).sum(axis=1), counts - 1)
    return cols[starts + picked]


def sample_rows(logits: np.ndarray, allowed_ids: np.ndarray, histories: list[list[int]],
                params: list[SamplingParams], rngs: list[np.random.Generator],
                bias: np.ndarray | None = None) -> np.ndarray:
    """One character id per row of ``logits [B, V]``: mask → penalty → top-k → temperature → top-p → draw.

    All rows go through each stage together as one ``[B, V]`` float32 array, so sixteen poems cost
    about one numpy call per stage, not sixteen. Each row keeps its own parameters and random
    generator and draws exactly one number from it, so a poem does not depend on which other poems
    shared its steps. float32 is the precision the model's logits come in, and twice as fast as
    float64 through exp and partition. Weights are left unnormalised (top-p compares against each
    row's total), which saves a pass.

    ``bias`` (``[B, V]``, 0 or -inf), when given, replaces the allowed characters' bias row by row: the
    rhyme and tone constraints of ``serving.prosody`` come in through it, in the same pass.

    A row with temperature 0 is greedy: it takes the largest allowed score after the repetition
    penalty (the argmax path; top-k and top-p cannot change it) and draws no random number, so its
    poem is the same for every seed.
    """
    x = np.add(logits, _mask_bias(allowed_ids, logits.shape[1]) if bias is None else bias, dtype=np.float32)
    _penalise(x, histories, np.array([p.repetition_penalty for p in params]))
    greedy = np.array([p.temperature == 0 for p in params])
    if greedy.all():
        return x.argmax(axis=1)
    best = x.argmax(axis=1) if greedy.any() else None
    count = len(allowed_ids)
    for r, p in enumerate(params):
        if 0 < p.top_k < count and not greedy[r]:
            drop = np.argpartition(-x[r], p.top_k - 1)[p.top_k:]
            x[r, drop] = -np.inf
    inverse = [min(1.0 / p.temperature, MAX_INVERSE_TEMPERATURE) if p.temperature else 1.0 for p in params]
    x *= np.array(inverse, dtype=np.float32)[:, None]
    x -= x.max(axis=1, keepdims=True)
    weights = np.exp(x, out=x)
    totals = weights.sum(axis=1)
    thresholds = _nucleus_thresholds(weights, totals, np.array([p.top_p for p in params], dtype=np.float32))
    uniforms = np.array([0.0 if g else rng.random() for g, rng in zip(greedy, rngs, strict=True)])
    picked = _draw(weights, thresholds, uniforms)
    if best is not None:
        picked[greedy] = best[greedy]
    return picked


def sample_next(logits: np.ndarray, allowed_ids: np.ndarray, generated: list[int], params: SamplingParams,
                rng: np.random.Generator) -> int:
    """One character id from ``logits [V]``: :func:`sample_rows` for a single row."""
    return int(sample_rows(logits[None], allowed_ids, [generated], [params], [rng])[0])


class SlotConstraint(Protocol):
    """What :func:`advance_all` asks of a poem's constraint (``serving.prosody.PoemProsody``; a protocol
    because that module imports this one)."""

    def mask(self, slot: int) -> np.ndarray | None: ...  # allowed ids ``[V]``, None: all of them

    def accept(self, slot: int, token: int) -> None: ...


@dataclass
class PoemSampler:
    """One poem being written: feed ``next_input`` to the model, give its logits to ``advance``.

    ``constraint`` (rhyme and tones, ``serving.prosody``) masks each sampled slot and hears every
    token; ``constraint_spec`` is what the decoding process needs to build its own copy of it."""

    plan: list[int | None]
    vocab: Vocabulary
    params: SamplingParams
    seed: int
    tokens: list[int] = field(default_factory=list)  # generated slots so far
    constraint: SlotConstraint | None = None
    constraint_spec: tuple[PoemForm, ProsodySpec] | None = None  # set with ``constraint``

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.allowed_ids = character_ids(self.vocab)

    @property
    def done(self) -> bool:
        return len(self.tokens) == len(self.plan)

    @property
    def next_input(self) -> int:
        return self.tokens[-1] if self.tokens else self.vocab.bos_id

    @property
    def forced(self) -> int | None:
        """The token the plan fixes for the next slot, or None when it must be sampled."""
        return self.plan[len(self.tokens)]

    def accept(self, token: int) -> str:
        self.tokens.append(token)
        return self.vocab.tokens[token]

    def advance(self, logits: np.ndarray) -> str:
        """Choose the next slot's token from the logits that followed ``next_input``; return its text."""
        return advance_all([self], logits[None])[0]

    @property
    def text(self) -> str:
        return self.vocab.decode(self.tokens)


def advance_all(samplers: list[PoemSampler], logits: np.ndarray) -> list[str]:
    """Advance every sampler by one slot from its row of ``logits [B, V]``; the rows that must be
    sampled are sampled together (:func:`sample_rows`), forced slots just take their token.

    Rows with a constraint get the characters it forbids as -inf in their own bias row, added to the
    logits in the pass that adds the allowed characters' bias anyway (``serving.prosody.row_biases``);
    then every constraint hears the token its slot got, forced or sampled. Rows without one cost
    nothing more: with no constrained row, the one shared bias is added as before."""
    free = [i for i, s in enumerate(samplers) if s.forced is None]
    chosen: dict[int, int] = {}
    if free:
        rows = logits[free]
        masks = [None if (c := samplers[i].constraint) is None else c.mask(len(samplers[i].tokens)) for i in free]
        allowed = samplers[free[0]].allowed_ids
        bias = None
        if any(m is not None for m in masks):
            from serving.prosody import row_biases  # here: serving.prosody imports this module

            bias = row_biases(masks, allowed, rows.shape[1])
        picked = sample_rows(rows, allowed, [samplers[i].tokens for i in free],
                             [samplers[i].params for i in free], [samplers[i].rng for i in free], bias)
        chosen = dict(zip(free, picked.tolist(), strict=True))
    out = []
    for i, s in enumerate(samplers):
        token = chosen.get(i, s.forced)
        if s.constraint is not None:
            s.constraint.accept(len(s.tokens), token)
        out.append(s.accept(token))
    return out
