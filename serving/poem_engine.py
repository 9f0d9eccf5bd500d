"""Continuous batching for poem generation: every live poem advances one token per model step.

Requests add ``PoemSampler``s to a queue; one background loop gathers every live sequence into one
``(token[B], hidden[L,B,H])`` call of the exported step graph, hands each row of logits to its
sampler and publishes the chosen character to that poem's listener. Sequences join and leave
between steps, so sixteen concurrent requests cost about one batch-16 step per token instead of
sixteen batch-1 steps. The graph and the sampling of its logits (all rows together, see
``advance_all``) run in a worker thread, ONNX Runtime and numpy releasing the GIL, so the event loop
keeps accepting requests and sending characters while a step runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np

from serving.poem_sampling import PoemSampler, advance_all
from serving.runtime import OnnxModel

StepObserver = Callable[[int, float], None]  # (batch size, seconds) after every step


@dataclass
class _Live:
    sampler: PoemSampler
    events: asyncio.Queue
    hidden: np.ndarray  # [L, H]
    cancelled: bool = False


@dataclass
class PoemEngine:
    model: OnnxModel
    num_layers: int
    hidden_size: int
    max_batch: int = 64
    observe_step: StepObserver | None = None
    _pending: asyncio.Queue | None = None
    _live: list[_Live] = field(default_factory=list)
    _task: asyncio.Task | None = None

    def _ensure_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            # first use, or a new event loop (tests, a restarted worker): start clean on this loop
            self._pending = asyncio.Queue()
            self._live = []
            self._task = loop.create_task(self._run())

    async def stream(self, sampler: PoemSampler, deadline: float | None = None) -> AsyncIterator[str]:
        """Characters of one poem as the shared loop produces them.

        ``deadline`` (event-loop time) ends the poem with ``TimeoutError``: one timer per poem, where
        ``asyncio.wait_for`` around each character would create a task per character.
        """
        self._ensure_loop()
        live = _Live(sampler, asyncio.Queue(), np.zeros((self.num_layers, self.hidden_size), np.float32))
        timer = None
        if deadline is not None:
            timer = asyncio.get_running_loop().call_at(deadline, live.events.put_nowait, TimeoutError())
        await self._pending.put(live)
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

    def _admit(self) -> None:
        while len(self._live) < self.max_batch and not self._pending.empty():
            self._live.append(self._pending.get_nowait())

    def _step(self, samplers: list[PoemSampler], tokens: np.ndarray, hidden: np.ndarray
              ) -> tuple[list[str], np.ndarray]:
        logits, next_hidden = self.model.run({"token": tokens, "hidden": hidden})
        return advance_all(samplers, logits), next_hidden

    async def _run(self) -> None:
        while True:
            if not self._live:
                self._live.append(await self._pending.get())
            self._admit()
            self._live = [s for s in self._live if not s.cancelled]
            if not self._live:
                continue
            batch = self._live
            tokens = np.array([s.sampler.next_input for s in batch], dtype=np.int64)
            hidden = np.ascontiguousarray(np.stack([s.hidden for s in batch], axis=1))
            began = time.perf_counter()
            try:
                chars, next_hidden = await asyncio.to_thread(self._step, [s.sampler for s in batch], tokens, hidden)
            except Exception as err:  # noqa: BLE001 - fail the poems in flight, keep serving
                for s in batch:
                    s.events.put_nowait(RuntimeError(f"generation failed: {type(err).__name__}"))
                self._live = []
                continue
            if self.observe_step:
                self.observe_step(len(batch), time.perf_counter() - began)
            still = []
            for i, (s, ch) in enumerate(zip(batch, chars, strict=True)):
                s.hidden = next_hidden[:, i]
                s.events.put_nowait(ch)
                if s.sampler.done:
                    s.events.put_nowait(None)
                else:
                    still.append(s)
            self._live = still
