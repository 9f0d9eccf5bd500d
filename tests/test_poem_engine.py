"""The continuous-batching engine on a real (briefly trained) exported poem model, without HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import bentoml
import pytest

from preprocessing import Vocabulary
from serving.poem_engine import PoemEngine
from serving.poem_sampling import PoemForm, PoemSampler, SamplingParams, plan_poem
from serving.runtime import OnnxModel


@pytest.fixture(scope="module")
def engine_parts(exported: dict[str, dict]) -> tuple[PoemEngine, Vocabulary]:
    meta = exported["poem_rnn"]
    path = Path(bentoml.models.get(meta["tag"]).path)
    vocab = Vocabulary.from_dict(meta["preprocessing"]["vocab"])
    engine = PoemEngine(OnnxModel(path / "model.onnx"), meta["config"]["num_layers"], meta["config"]["hidden_size"])
    return engine, vocab


def _samplers(vocab: Vocabulary, count: int, seed: int = 0) -> list[PoemSampler]:
    plan = plan_poem(PoemForm(7, 8), vocab)
    return [PoemSampler(plan, vocab, SamplingParams(), seed + i) for i in range(count)]


def test_poems_written_together_equal_poems_written_alone(engine_parts) -> None:
    engine, vocab = engine_parts

    async def run() -> tuple[list[str], list[str]]:
        together = await asyncio.gather(*[engine.generate(s) for s in _samplers(vocab, 6)])
        alone = [await engine.generate(s) for s in _samplers(vocab, 6)]
        return together, alone

    together, alone = asyncio.run(run())
    assert together == alone and all(len(p) == 64 for p in together)


def test_a_deadline_ends_a_poem_with_timeout_and_frees_its_slot(engine_parts) -> None:
    engine, vocab = engine_parts

    async def run() -> str:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            await engine.generate(_samplers(vocab, 1)[0], deadline=loop.time())  # already due
        return await engine.generate(_samplers(vocab, 1)[0], deadline=loop.time() + 60)

    assert len(asyncio.run(run())) == 64


def test_chunks_spell_the_poem_first_at_once_and_the_end_without_waiting_out_the_interval(engine_parts) -> None:
    engine, vocab = engine_parts

    async def run() -> tuple[list[list[str]], str]:
        # With a minute between lists, only the end of the poem can release the second one before
        # the 30 s bound: the reader must not sit out the interval once the poem is whole.
        paced = [c async for c in engine.chunks(_samplers(vocab, 1, seed=7)[0], every_s=60.0)]
        return paced, await engine.generate(_samplers(vocab, 1, seed=7)[0])

    paced, whole = asyncio.run(asyncio.wait_for(run(), timeout=30))
    assert "".join(sum(paced, [])) == whole and len(whole) == 64
    assert len(paced) <= 2  # the first character(s) at once (all 64, if this loop was held up), the rest at the end


def test_unpaced_chunks_spell_the_same_poem(engine_parts) -> None:
    engine, vocab = engine_parts

    async def run() -> tuple[list[list[str]], str]:
        return ([c async for c in engine.chunks(_samplers(vocab, 1, seed=3)[0])],
                await engine.generate(_samplers(vocab, 1, seed=3)[0]))

    chunks, whole = asyncio.run(run())
    assert "".join(sum(chunks, [])) == whole


class _FailsAt:
    """The real step graph, except that its ``at``-th run raises (a fault injected, not a stand-in model)."""

    def __init__(self, model: OnnxModel, at: int = 1) -> None:
        self.model, self.runs, self.at = model, 0, at

    def run(self, feeds: dict) -> list:
        self.runs += 1
        if self.runs == self.at:
            raise MemoryError("injected")
        return self.model.run(feeds)


def _failing_engine(exported: dict[str, dict], at: int) -> tuple[PoemEngine, Vocabulary]:
    meta = exported["poem_rnn"]
    path = Path(bentoml.models.get(meta["tag"]).path)
    vocab = Vocabulary.from_dict(meta["preprocessing"]["vocab"])
    model = _FailsAt(OnnxModel(path / "model.onnx"), at)
    return PoemEngine(model, meta["config"]["num_layers"], meta["config"]["hidden_size"]), vocab


def test_a_failure_midway_hands_over_the_characters_before_it_then_raises(exported: dict[str, dict]) -> None:
    engine, vocab = _failing_engine(exported, at=11)
    received: list[str] = []

    async def run() -> None:
        async for chars in engine.chunks(_samplers(vocab, 1)[0], every_s=60.0):
            received.extend(chars)

    with pytest.raises(RuntimeError, match="generation failed: MemoryError"):
        asyncio.run(asyncio.wait_for(run(), timeout=30))
    assert len(received) == 10  # the ten steps before the failed one


def test_a_failed_step_fails_the_poems_in_flight_and_the_engine_keeps_serving(exported: dict[str, dict]) -> None:
    engine, vocab = _failing_engine(exported, at=1)

    async def run() -> str:
        with pytest.raises(RuntimeError, match="generation failed: MemoryError"):
            await engine.generate(_samplers(vocab, 1)[0])
        return await engine.generate(_samplers(vocab, 1)[0])

    assert len(asyncio.run(run())) == 64
