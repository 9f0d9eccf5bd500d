"""Form-constrained sampling without a model: plans, masks, top-k/top-p and seeds."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from preprocessing import Vocabulary
from serving.poem_sampling import (
    NUCLEUS_CANDIDATES,
    PoemForm,
    PoemRequestError,
    PoemSampler,
    SamplingParams,
    _draw,
    _penalise,
    character_ids,
    plan_poem,
    sample_next,
    sample_rows,
)
from serving.request_models import PoemRequest
from training.datasets.poems import read_tang300


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.build(read_tang300())


def test_plan_forces_marks_prompt_and_acrostic(vocab: Vocabulary) -> None:
    request = PoemRequest(prompt="春眠，不觉", acrostic="春处夜花")  # the request drops the mark
    plan = plan_poem(request.form, vocab, request.prompt, request.acrostic)
    text = ["·" if t is None else vocab.tokens[t] for t in plan]
    assert "".join(text) == "春眠不觉·，处····。夜····，花····。"


@pytest.mark.parametrize("field", ["prompt", "acrostic"])
def test_characters_the_model_never_saw_are_refused_by_the_plan(vocab: Vocabulary, field: str) -> None:
    unknown = next(ch for ch in (chr(c) for c in range(0x4E00, 0x9FA6)) if ch not in vocab)
    with pytest.raises(PoemRequestError, match=f"{field} has characters the model never saw: {unknown}"):
        plan_poem(PoemForm(5, 4), vocab, **{field: unknown})


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"prompt": "春😀"}, "only Chinese characters"), ({"acrostic": "一二三四五"}, "has 5 characters"),
     ({"prompt": "夜" * 21}, "holds 20"), ({"prompt": "床", "acrostic": "春"}, "line 1 starts with 床"),
     ({"prompt": "夜" * 29, "chars_per_clause": 7}, "holds 28"), ({"acrostic": "一二三四五", "lines": 8}, None)],
)
def test_impossible_poems_are_refused_by_the_request(fields: dict, message: str | None) -> None:
    if message is None:
        assert PoemRequest(**fields).acrostic == fields["acrostic"]
        return
    with pytest.raises(ValidationError, match=message):
        PoemRequest(**fields)


def test_sampling_respects_mask_top_k_and_top_p(vocab: Vocabulary) -> None:
    ids = character_ids(vocab)
    assert vocab.unk_id not in ids and vocab.id_of("，") not in ids and vocab.id_of("。") not in ids
    rng = np.random.default_rng(0)
    logits = rng.normal(size=len(vocab))
    logits[vocab.unk_id] = logits[vocab.id_of("。")] = 100.0  # never drawn, however likely
    best = ids[np.argsort(-logits[ids])[:3]]
    draws = {sample_next(logits, ids, [], SamplingParams(1.0, top_k=3, top_p=1.0, repetition_penalty=1.0), rng)
             for _ in range(300)}
    assert draws == set(best.tolist())
    peaked = np.full(len(vocab), -10.0)
    peaked[ids[0]], peaked[ids[1]] = 5.0, 4.0  # ids[0] alone holds about 73% of the mass
    only_top = {sample_next(peaked, ids, [], SamplingParams(1.0, top_p=0.5, repetition_penalty=1.0), rng)
                for _ in range(200)}
    assert only_top == {int(ids[0])}
    wide = {sample_next(peaked, ids, [], SamplingParams(1.0, top_p=0.9, repetition_penalty=1.0), rng)
            for _ in range(400)}
    assert wide == {int(ids[0]), int(ids[1])}


def _reference_nucleus(logits: np.ndarray, ids: np.ndarray, params: SamplingParams) -> set[int]:
    """The top-p set by the textbook recipe: full sort, smallest prefix reaching top_p."""
    scores = logits[ids] / params.temperature
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    cut = int(np.searchsorted(np.cumsum(probs[order]), params.top_p))
    return set(ids[order[: cut + 1]].tolist())


@pytest.mark.parametrize("spread", [0.3, 3.0])  # flat: the nucleus is wider than the partitioned head; peaked
def test_nucleus_is_the_full_sort_set(vocab: Vocabulary, spread: float) -> None:
    ids = character_ids(vocab)
    logits = np.random.default_rng(3).normal(scale=spread, size=len(vocab))
    params = SamplingParams(1.0, top_p=0.6, repetition_penalty=1.0)
    expected = _reference_nucleus(logits, ids, params)
    assert (len(expected) > NUCLEUS_CANDIDATES) == (spread < 1)
    draws = sample_rows(np.tile(logits, (4000, 1)), ids, [[]] * 4000, [params] * 4000,
                        [np.random.default_rng(i) for i in range(4000)])
    assert set(draws.tolist()) <= expected
    if len(expected) < 50:
        assert set(draws.tolist()) == expected


def test_rows_sampled_together_equal_rows_sampled_alone(vocab: Vocabulary) -> None:
    """Continuous batching must not change a poem: each row depends only on its own logits, params and seed."""
    ids = character_ids(vocab)
    rng = np.random.default_rng(4)
    logits = rng.normal(scale=2.0, size=(6, len(vocab)))
    params = [SamplingParams(), SamplingParams(0.5, top_k=5), SamplingParams(1.5, top_p=1.0),
              SamplingParams(1.0, top_p=0.3, repetition_penalty=2.0), SamplingParams(0.8, top_k=50, top_p=0.5),
              SamplingParams(2.0, top_p=0.99)]
    histories = [[], [int(ids[0])], [int(i) for i in ids[:30]], [int(ids[5])] * 3, [], [int(ids[9])]]
    together = sample_rows(logits, ids, histories, params, [np.random.default_rng(s) for s in range(6)])
    alone = [sample_rows(logits[r: r + 1], ids, [histories[r]], [params[r]], [np.random.default_rng(r)])[0]
             for r in range(6)]
    assert together.tolist() == alone


def test_same_seed_same_poem_and_exact_form(vocab: Vocabulary) -> None:
    form = PoemForm(7, 8)
    plan = plan_poem(form, vocab)
    rng = np.random.default_rng(1)
    logits_per_step = rng.normal(size=(form.slots, len(vocab)))

    def write(seed: int) -> str:
        sampler = PoemSampler(plan, vocab, SamplingParams(), seed)
        for step in range(form.slots):
            sampler.advance(logits_per_step[step])
        assert sampler.done
        return sampler.text

    poem = write(5)
    assert poem == write(5) and poem != write(6)
    assert len(poem) == 64 and poem[7] == "，" and poem[15] == "。" and poem[-1] == "。"


@pytest.mark.parametrize("bad", [{"temperature": -0.1}, {"temperature": 5.01}, {"top_p": 0.0}, {"top_p": 1.5},
                                 {"top_k": -1}, {"repetition_penalty": 0.5}, {"temperature": float("nan")},
                                 {"temperature": float("inf")}])
def test_sampling_parameters_out_of_range(bad: dict) -> None:
    (field,) = bad
    with pytest.raises(ValidationError, match=field):
        PoemRequest(**bad)


def test_the_sampler_gets_the_validated_parameters() -> None:
    request = PoemRequest(temperature=0.0, top_k=5, top_p=0.5, repetition_penalty=1.3)
    assert request.sampling == SamplingParams(0.0, 5, 0.5, 1.3)


def test_repetition_penalty_counts_a_token_once() -> None:
    """A character held three times is penalised as much as one held once, and only in its own row."""
    scores = np.array([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]], dtype=np.float32)
    once, thrice = scores.copy(), scores.copy()
    _penalise(once, [[0, 1], []], np.array([2.0, 2.0]))
    _penalise(thrice, [[0, 0, 0, 1, 1], []], np.array([2.0, 2.0]))
    assert once.tolist() == thrice.tolist() == [[1.0, -4.0, 1.0], [2.0, -2.0, 1.0]]


def test_draw_picks_within_the_kept_cells_at_both_ends() -> None:
    """Only weights at or above a row's threshold can be drawn; a draw at the very top of the range
    (float rounding can put it at the total) takes the last kept cell, never one past it."""
    weights = np.array([[0.0, 0.5, 0.1, 1.0, 0.2], [0.3, 0.0, 0.0, 0.0, 0.3]], dtype=np.float32)
    thresholds = np.array([0.2, 0.0], dtype=np.float32)
    assert _draw(weights, thresholds, np.array([0.0, 0.0])).tolist() == [1, 0]
    assert _draw(weights, thresholds, np.array([np.nextafter(1.0, 0.0), 1.0])).tolist() == [4, 4]
    draws = {int(_draw(weights, thresholds, np.array([u, u]))[0]) for u in np.linspace(0, 0.999, 200)}
    assert draws == {1, 3, 4}
