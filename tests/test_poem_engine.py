"""The continuous-batching engine on a real (briefly trained) exported poem model, without HTTP: the
server's side in this process, the decoding loop in the process it starts."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import bentoml
import numpy as np
import pytest

from preprocessing import Vocabulary
from serving.poem_decoder import _SIGNALLED, StepLoop
from serving.poem_engine import PoemEngine
from serving.poem_protocol import AddPoem, CancelPoem, Kind, Retire, Step
from serving.poem_sampling import PoemForm, PoemSampler, SamplingParams, plan_poem
from training.datasets.poems import read_tang300


def _engine(exported: dict[str, dict]) -> tuple[PoemEngine, Vocabulary]:
    meta = exported["poem_rnn"]
    path = Path(bentoml.models.get(meta["tag"]).path)
    vocab = Vocabulary.from_dict(meta["preprocessing"]["vocab"])
    engine = PoemEngine(path / "model.onnx", vocab, meta["config"]["num_layers"], meta["config"]["hidden_size"])
    assert engine.start() in ("CPUExecutionProvider", "CUDAExecutionProvider")
    return engine, vocab


@pytest.fixture(scope="module")
def engine_parts(exported: dict[str, dict]) -> Iterator[tuple[PoemEngine, Vocabulary]]:
    engine, vocab = _engine(exported)
    yield engine, vocab
    engine.stop()


def test_a_graph_onnx_runtime_cannot_load_stops_start_with_the_reason(exported: dict[str, dict],
                                                                     tmp_path: Path) -> None:
    meta = exported["poem_rnn"]
    whole = (Path(bentoml.models.get(meta["tag"]).path) / "model.onnx").read_bytes()
    broken = tmp_path / "model.onnx"
    broken.write_bytes(whole[: len(whole) // 3])  # a copy cut short
    vocab = Vocabulary.from_dict(meta["preprocessing"]["vocab"])
    engine = PoemEngine(broken, vocab, meta["config"]["num_layers"], meta["config"]["hidden_size"])
    try:
        with pytest.raises(RuntimeError, match=r"ONNX Runtime cannot run .*model\.onnx: \w+"):
            engine.start()
    finally:
        engine.stop()


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
        return await engine.generate(_samplers(vocab, 1)[0], deadline=loop.time() + 3600)  # far beyond any poem's time

    assert len(asyncio.run(run())) == 64


def test_chunks_spell_the_poem_first_at_once_and_the_end_without_waiting_out_the_interval(engine_parts) -> None:
    engine, vocab = engine_parts

    async def run() -> tuple[list[list[str]], str]:
        # With an hour between lists, only the end of the poem can release the second one: a reader that
        # sat out the interval once the poem is whole would be stopped by pytest-timeout (10 minutes).
        paced = [c async for c in engine.chunks(_samplers(vocab, 1, seed=7)[0], every_s=3600.0)]
        return paced, await engine.generate(_samplers(vocab, 1, seed=7)[0])

    paced, whole = asyncio.run(run())
    assert "".join(sum(paced, [])) == whole and len(whole) == 64
    assert len(paced) <= 2  # the first character(s) at once (all 64, if this loop was held up), the rest at the end


def test_unpaced_chunks_spell_the_same_poem(engine_parts) -> None:
    engine, vocab = engine_parts

    async def run() -> tuple[list[list[str]], str]:
        return ([c async for c in engine.chunks(_samplers(vocab, 1, seed=3)[0])],
                await engine.generate(_samplers(vocab, 1, seed=3)[0]))

    chunks, whole = asyncio.run(run())
    assert "".join(sum(chunks, [])) == whole


def test_a_failed_step_hands_over_the_characters_before_it_then_fails_the_batch_and_decoding_goes_on(
        engine_parts) -> None:
    """A real fault inside a decoding step: a plan that forces a token id the vocabulary does not
    have at slot 10 makes the step that writes it raise (IndexError). That poem gets the nine
    characters before it, then "generation failed". The other poem is enrolled by its own request, so
    on a busy machine it may reach the decoder after that step: either it shared the failing step
    (then it gets what it had, then "generation failed") or it is written whole; it is never lost.
    The next poem is written whole."""
    engine, vocab = engine_parts
    broken, healthy = _samplers(vocab, 2, seed=11)
    broken.plan = list(broken.plan)
    broken.plan[9] = len(vocab) + 1000
    received: dict[int, list[str]] = {0: [], 1: []}

    async def read(index: int, sampler: PoemSampler) -> BaseException | None:
        try:
            async for chars in engine.chunks(sampler, every_s=60.0):
                received[index].extend(chars)
        except RuntimeError as err:
            return err
        return None

    async def run() -> tuple[list, str]:
        errors = await asyncio.gather(read(0, broken), read(1, healthy))
        return errors, await engine.generate(_samplers(vocab, 1, seed=12)[0])

    errors, after = asyncio.run(run())
    assert isinstance(errors[0], RuntimeError) and "generation failed: IndexError" in str(errors[0]), errors
    assert len(received[0]) == 9
    if errors[1] is None:  # it joined after the failing step
        assert len(received[1]) == 64
    else:
        assert "generation failed: IndexError" in str(errors[1]) and len(received[1]) <= 9, errors
    assert len(after) == 64


def test_a_decoding_process_that_dies_fails_its_poems_and_the_next_poem_starts_a_new_one(
        exported: dict[str, dict]) -> None:
    engine, vocab = _engine(exported)
    first_pid = engine._decoder.proc.pid

    async def run() -> tuple[BaseException | None, str]:
        failure = None
        try:
            async for _ in engine.chunks(_samplers(vocab, 1, seed=21)[0], every_s=60.0):
                engine._decoder.proc.kill()  # a real crash of the decoding process, mid-poem
        except RuntimeError as err:
            failure = err
        return failure, await engine.generate(_samplers(vocab, 1, seed=22)[0])

    try:
        failure, after = asyncio.run(run())
        assert failure is not None and "the decoding process stopped" in str(failure)
        assert len(after) == 64 and engine._decoder.proc.pid != first_pid
    finally:
        engine.stop()


def test_a_cancelled_poem_leaves_the_batch(engine_parts) -> None:
    """A reader that stops early (a client gone) frees its slot: poems after it still complete, and
    the engine holds no poem once every reader has left."""
    engine, vocab = engine_parts

    async def run() -> str:
        stream = engine.chunks(_samplers(vocab, 1, seed=31)[0], every_s=0.0)
        await anext(stream)
        await stream.aclose()
        return await engine.generate(_samplers(vocab, 1, seed=32)[0])

    assert len(asyncio.run(run())) == 64
    assert engine._live == {}


def test_sigterm_drains_the_decoding_process_its_poems_finish_and_new_poems_go_to_a_new_one(
        exported: dict[str, dict]) -> None:
    """BentoML's process manager sends SIGTERM to a worker's children when the server drains: the
    decoding process finishes the poem it is writing (whole, no ``error``), then exits by itself with
    status 0; the next poem starts a new process."""
    engine, vocab = _engine(exported)
    proc = engine._decoder.proc

    async def run() -> str:
        chars: list[str] = []
        async for chunk in engine.chunks(_samplers(vocab, 1, seed=41)[0], every_s=0.0):
            if not chars:
                os.kill(proc.pid, signal.SIGTERM)  # mid-poem, as during a graceful shutdown
            chars.extend(chunk)
        return "".join(chars)

    try:
        poem = asyncio.run(run())
        assert len(poem) == 64
        assert proc.wait() == 0  # no longer ignored: it drained and left
        after = asyncio.run(engine.generate(_samplers(vocab, 1, seed=42)[0]))
        assert len(after) == 64 and engine._decoder.proc.pid != proc.pid
    finally:
        engine.stop()


def test_an_idle_decoding_process_exits_on_sigterm_and_when_its_input_closes(exported: dict[str, dict]) -> None:
    engine, _ = _engine(exported)
    idle = engine._decoder.proc
    os.kill(idle.pid, signal.SIGTERM)
    assert idle.wait() == 0
    engine.start()  # a new one
    second = engine._decoder.proc
    assert second.pid != idle.pid and second.poll() is None
    engine.stop()  # closes its input: the way a server that stops or dies ends it
    assert second.poll() is not None


class _FakeGraph:
    """Stands in for the ONNX step graph in the decoding loop: random logits, a zero state."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        self.rng = np.random.default_rng(0)
        self.vocab_size, self.hidden_size = vocab_size, hidden_size

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        rows = len(feeds["token"])
        return [self.rng.normal(size=(rows, self.vocab_size)).astype(np.float32), np.zeros_like(feeds["hidden"])]


def test_the_decoding_loop_speaks_the_protocol_drain_retire_cancel() -> None:
    """The decoder's side of serving.poem_protocol, in this process: two poems join, one is cancelled,
    SIGTERM is reported as Draining once, and after Retire the loop writes what it holds and returns."""
    vocab = Vocabulary.build(read_tang300())
    plan = tuple(plan_poem(PoemForm(5, 4), vocab))
    sent: list = []
    loop = StepLoop(_FakeGraph(len(vocab), 8), vocab, 1, 8, max_batch=1, send=sent.append)  # type: ignore[arg-type]
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    for message in (AddPoem(1, plan, SamplingParams(), 1), AddPoem(2, plan, SamplingParams(0.0), 2),
                    AddPoem(3, plan, SamplingParams(), 3), CancelPoem(3), _SIGNALLED, _SIGNALLED, Retire()):
        inbox.put(message)
    runner = threading.Thread(target=loop.run, args=(inbox,), daemon=True)
    runner.start()
    runner.join()  # a loop that never returns is stopped by pytest-timeout (pyproject.toml)
    assert not runner.is_alive(), "the loop must return once retired with nothing left to write"
    assert [m.kind for m in sent].count(Kind.DRAINING) == 1 and sent[0].kind is Kind.DRAINING
    steps = [m for m in sent if isinstance(m, Step)]
    written = {i: [t for m in steps for pid, t in zip(m.poem_ids, m.tokens, strict=True) if pid == i]
               for i in (1, 2, 3)}
    assert len(written[1]) == len(written[2]) == len(plan) and written[3] == []  # max_batch 1: one after the other
    assert all(m.rows == 1 for m in steps)
    assert vocab.decode(written[1])[5] == "，" and vocab.decode(written[2])[-1] == "。"
    # end of input ends the loop at once, poems held or not
    inbox.put(AddPoem(4, plan, SamplingParams(), 4))
    inbox.put(None)
    after_close: list = []
    fresh = StepLoop(_FakeGraph(len(vocab), 8), vocab, 1, 8, max_batch=4, send=after_close.append)  # type: ignore[arg-type]
    fresh.run(inbox)  # a None in the inbox: returns at once
    assert after_close == [] and [s.id for s in fresh.waiting] == [4]
