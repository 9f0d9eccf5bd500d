"""Continuous batching for poem generation: every live poem advances one token per model step.

Requests hand ``PoemSampler``s to a decoding thread; it gathers every live sequence into one
``(token[B], hidden[L,B,H])`` call of the exported step graph, hands each row of logits to its
sampler (all rows together, see ``advance_all``) and posts the chosen characters back to each
poem's event loop. Sequences join and leave between steps, so sixteen concurrent requests cost
about one batch-16 step per token instead of sixteen batch-1 steps.

Why a thread of its own rather than ``asyncio.to_thread`` per step: a step's input is the previous
step's output, so the steps of a batch are strictly serial, and with a hop back to the event loop
between steps every step also waited for the loop to get round to it (behind the HTTP work of
sixteen streams): the decoding thread sat idle a seventh of the time. Now it starts the next step
at once, and the loop hands the characters out while that step runs. ONNX Runtime and numpy
release the GIL, so both proceed on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np

from serving.poem_sampling import PoemSampler, advance_all
from serving.runtime import OnnxModel

StepObserver = Callable[[int, float], None]  # (batch size, seconds) after every step

logger = logging.getLogger(__name__)


@dataclass
class _Live:
    sampler: PoemSampler
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # characters, then None; or an exception
    hidden: np.ndarray  # [L, H]
    cancelled: bool = False


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    """Runs on a poem's event loop: one call per step carries every character that loop is owed."""
    for events, item in items:
        events.put_nowait(item)


@dataclass
class PoemEngine:
    model: OnnxModel
    num_layers: int
    hidden_size: int
    max_batch: int = 64
    observe_step: StepObserver | None = None
    _inbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    _thread: threading.Thread | None = None
    _starting: threading.Lock = field(default_factory=threading.Lock)

    def _ensure_thread(self) -> None:
        with self._starting:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._decode_forever, name="poem-decoder", daemon=True)
                self._thread.start()

    async def stream(self, sampler: PoemSampler, deadline: float | None = None) -> AsyncIterator[str]:
        """Characters of one poem as the decoding thread produces them.

        ``deadline`` (event-loop time) ends the poem with ``TimeoutError``: one timer per poem, where
        ``asyncio.wait_for`` around each character would create a task per character.
        """
        self._ensure_thread()
        loop = asyncio.get_running_loop()
        live = _Live(sampler, loop, asyncio.Queue(), np.zeros((self.num_layers, self.hidden_size), np.float32))
        timer = None
        if deadline is not None:
            timer = loop.call_at(deadline, live.events.put_nowait, TimeoutError())
        self._inbox.put(live)
        try:
            while True:
                item = await live.events.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            live.cancelled = True  # a client that went away (or ran out of time) stops costing steps
            if timer is not None:
                timer.cancel()

    async def generate(self, sampler: PoemSampler, deadline: float | None = None) -> str:
        return "".join([ch async for ch in self.stream(sampler, deadline)])

    def _step(self, samplers: list[PoemSampler], tokens: np.ndarray, hidden: np.ndarray
              ) -> tuple[list[str], np.ndarray]:
        logits, next_hidden = self.model.run({"token": tokens, "hidden": hidden})
        return advance_all(samplers, logits), next_hidden

    def _admit(self, live: list[_Live]) -> list[_Live]:
        """Live poems plus those waiting (blocking only when nothing is live), less the cancelled."""
        if not live:
            live = [self._inbox.get()]
        while len(live) < self.max_batch:
            try:
                live.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return [s for s in live if not s.cancelled]

    def _decode_forever(self) -> None:
        live: list[_Live] = []
        while True:
            live = self._admit(live)
            if not live:
                continue
            tokens = np.array([s.sampler.next_input for s in live], dtype=np.int64)
            hidden = np.ascontiguousarray(np.stack([s.hidden for s in live], axis=1))
            began = time.perf_counter()
            try:
                chars, next_hidden = self._step([s.sampler for s in live], tokens, hidden)
            except Exception as err:  # noqa: BLE001 - fail the poems in flight, keep serving
                logger.exception("poem decoding step failed")
                self._post([(s, RuntimeError(f"generation failed: {type(err).__name__}")) for s in live])
                live = []
                continue
            if self.observe_step:
                self.observe_step(len(live), time.perf_counter() - began)
            out: list[tuple[_Live, object]] = []
            still = []
            for i, (s, ch) in enumerate(zip(live, chars, strict=True)):
                s.hidden = next_hidden[:, i]
                out.append((s, ch))
                if s.sampler.done:
                    out.append((s, None))
                else:
                    still.append(s)
            self._post(out)
            live = still

    @staticmethod
    def _post(items: list[tuple[_Live, object]]) -> None:
        """Hand characters to their poems' event loops: one thread-safe call per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for s, item in items:
            by_loop.setdefault(s.loop, []).append((s.events, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that loop has closed: nobody is listening any more
                for s, _ in items:
                    if s.loop is loop:
                        s.cancelled = True
