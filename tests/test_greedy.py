"""Temperature 0 is greedy decoding: the argmax path, the same poem for every seed (issue 20, item 5)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from preprocessing import Vocabulary
from serving.poem_sampling import (
    PoemForm,
    PoemSampler,
    SamplingParams,
    advance_all,
    character_ids,
    plan_poem,
    sample_rows,
)
from serving.request_models import PoemRequest
from training.datasets.poems import read_tang300


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.build(read_tang300())


class _ToyModel:
    """A fixed random bigram table standing in for the poem model: logits depend on the last token."""

    def __init__(self, size: int) -> None:
        self.table = np.random.default_rng(11).normal(scale=2.0, size=(size, size)).astype(np.float32)

    def step(self, tokens: list[int]) -> np.ndarray:
        return self.table[tokens]


def _write(samplers: list[PoemSampler], model: _ToyModel) -> list[str]:
    while not samplers[0].done:
        advance_all(samplers, model.step([s.next_input for s in samplers]))
    return [s.text for s in samplers]


def _argmax_path(plan: list[int | None], vocab: Vocabulary, model: _ToyModel, penalty: float) -> str:
    """What greedy decoding means, written out: at each free slot the allowed character with the
    largest logit, after the repetition penalty on the characters already written."""
    allowed = character_ids(vocab)
    tokens: list[int] = []
    for forced in plan:
        if forced is not None:
            tokens.append(forced)
            continue
        logits = model.step([tokens[-1] if tokens else vocab.bos_id])[0].astype(np.float64)
        for t in set(tokens):
            logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
        tokens.append(int(allowed[np.argmax(logits[allowed])]))
    return vocab.decode(tokens)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_temperature_zero_writes_the_argmax_path_for_every_seed(vocab: Vocabulary, penalty: float) -> None:
    model = _ToyModel(len(vocab))
    plan = plan_poem(PoemForm(7, 4), vocab, acrostic="春夏")
    greedy = SamplingParams(0.0, top_k=5, top_p=0.5, repetition_penalty=penalty)
    poems = _write([PoemSampler(plan, vocab, greedy, seed) for seed in (0, 1, 2, 99)], model)
    assert poems[0] == _argmax_path(plan, vocab, model, penalty)
    assert len(set(poems)) == 1  # identical across seeds
    assert poems[0].startswith("春") and poems[0][8] == "夏" and len(poems[0]) == 32
    sampled = _write([PoemSampler(plan, vocab, SamplingParams(1.0, repetition_penalty=penalty), seed)
                      for seed in (0, 1, 2, 99)], model)
    assert len(set(sampled)) > 1  # a positive temperature still samples


def test_a_greedy_row_is_unaffected_by_the_rows_it_shares_a_step_with(vocab: Vocabulary) -> None:
    ids = character_ids(vocab)
    logits = np.random.default_rng(5).normal(size=(4, len(vocab))).astype(np.float32)
    params = [SamplingParams(0.0), SamplingParams(0.9), SamplingParams(0.0, repetition_penalty=1.0),
              SamplingParams(1.5, top_k=10)]
    histories = [[int(ids[0]), int(ids[1])], [], [int(ids[2])], []]
    rngs = [np.random.default_rng(s) for s in range(4)]
    together = sample_rows(logits, ids, histories, params, rngs)
    for row in (0, 2):
        alone = sample_rows(logits[row: row + 1], ids, [histories[row]], [params[row]], [np.random.default_rng(42)])
        assert together[row] == alone[0]
    assert together[2] == ids[np.argmax(logits[2, ids])]
    # a greedy row draws nothing from its generator, a sampled row draws exactly one number
    untouched, used = np.random.default_rng(0), np.random.default_rng(1)
    sample_rows(logits[:2], ids, [[], []], params[:2], [untouched, used])
    assert untouched.random() == np.random.default_rng(0).random()


def test_tiny_positive_temperatures_stay_finite(vocab: Vocabulary) -> None:
    ids = character_ids(vocab)
    logits = np.random.default_rng(8).normal(scale=30, size=(2, len(vocab))).astype(np.float32)
    picked = sample_rows(logits, ids, [[], []], [SamplingParams(1e-300), SamplingParams(1e-12)],
                         [np.random.default_rng(0), np.random.default_rng(1)])
    assert picked.tolist() == [ids[np.argmax(logits[0, ids])], ids[np.argmax(logits[1, ids])]]


@pytest.mark.parametrize("temperature", [0.0, 0.01, 5.0])
def test_temperature_accepts_zero_to_five(temperature: float) -> None:
    assert PoemRequest(temperature=temperature).sampling.temperature == temperature


@pytest.mark.parametrize(("temperature", "message"), [(-0.01, "greater than or equal to 0"),
                                                      (5.01, "less than or equal to 5"),
                                                      (float("nan"), "finite number"), (float("inf"), "finite number")])
def test_temperature_outside_zero_to_five_is_refused_with_the_range(temperature: float, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PoemRequest(temperature=temperature)


def test_the_openapi_schema_documents_greedy() -> None:
    from serving.service import PoemAPIs

    for api in (PoemAPIs.generate_poem, PoemAPIs.generate_poem_stream):
        field = api.input_spec.model_json_schema()["properties"]["temperature"]
        assert "0 = greedy (argmax)" in field["description"] and field["default"] == 0.8


def test_the_playground_slider_reaches_greedy() -> None:
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "serving" / "playground" / "index.html").read_text(encoding="utf-8")
    assert "Temperature (0 = greedy)" in page
    assert 'id="poem-temperature" min="0"' in page


def test_the_poem_endpoints_decode_temperature_zero_greedily(tmp_path_factory) -> None:
    """Over HTTP, through the decoding process: 0 is accepted on both routes and gives one poem for every seed."""
    import json

    import httpx
    from live_server import serve

    from training.export import export_run
    from training.paths import runs_dir
    from training.train import TrainOptions, train

    # a brief poem model of its own (as conftest's), so this test does not wait for every brief training
    summary = train(TrainOptions("poem_rnn", limit=200, epochs=1, device="cpu", progress=False,
                                 run_name="brief-greedy-poem"))
    export_run(runs_dir() / summary["run"], name="tang-poem-greedy")
    log = tmp_path_factory.mktemp("greedy-server") / "server.log"
    with serve("PoemService", log, DLBOOK_POEM_MODELS="tang-poem-greedy") as base:
        poems = []
        for seed in (1, 2, 3):
            response = httpx.post(f"{base}/generate_poem", timeout=60,
                                  json={"temperature": 0, "seed": seed, "chars_per_clause": 5, "n": 2})
            assert response.status_code == 200, response.text
            poems += [p["poem"] for p in response.json()["poems"]]
        assert len(set(poems)) == 1 and len(poems[0]) == 24
        with httpx.stream("POST", f"{base}/generate_poem_stream", json={"temperature": 0, "seed": 9},
                          timeout=60) as response:
            events = [e for e in response.read().decode().split("\n\n") if e.startswith("event: done")]
        assert json.loads(events[0].split("\n")[1].removeprefix("data: "))["poems"][0]["poem"] == poems[0]
        refused = httpx.post(f"{base}/generate_poem", json={"temperature": 5.5}, timeout=60)
        assert refused.status_code == 400, refused.text
        assert "temperature: Input should be less than or equal to 5" in refused.json()["error"]
