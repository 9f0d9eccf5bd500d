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


class _FailsOnce:
    """The real step graph, except that its first run raises (a fault injected, not a stand-in model)."""

    def __init__(self, model: OnnxModel) -> None:
        self.model, self.failed = model, False

    def run(self, feeds: dict) -> list:
        if not self.failed:
            self.failed = True
            raise MemoryError("injected")
        return self.model.run(feeds)


def test_a_failed_step_fails_the_poems_in_flight_and_the_engine_keeps_serving(exported: dict[str, dict]) -> None:
    meta = exported["poem_rnn"]
    path = Path(bentoml.models.get(meta["tag"]).path)
    vocab = Vocabulary.from_dict(meta["preprocessing"]["vocab"])
    engine = PoemEngine(_FailsOnce(OnnxModel(path / "model.onnx")), meta["config"]["num_layers"],
                        meta["config"]["hidden_size"])

    async def run() -> str:
        with pytest.raises(RuntimeError, match="generation failed: MemoryError"):
            await engine.generate(_samplers(vocab, 1)[0])
        return await engine.generate(_samplers(vocab, 1)[0])

    assert len(asyncio.run(run())) == 64
