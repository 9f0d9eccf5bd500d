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
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from serving.poem_sampling import PoemSampler, advance_all
from serving.runtime import OnnxModel

StepObserver = Callable[[int, float], None]  # (batch size, seconds) after every step

logger = logging.getLogger(__name__)


class _Mailbox:
    """What the decoding thread has written for one poem and its reader has not taken yet.

    Lives on the poem's event loop (the decoding thread reaches it through ``call_soon_threadsafe``).
    Why not an ``asyncio.Queue`` of characters: each character would wake the reading task, and a
    stream that writes every 20 ms anyway paid for ~15 wake-ups per write. Here a reader that has
    something to send but is not due yet sleeps until it is, however many characters arrive, while
    the end of the poem (or a failure) always wakes it at once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.chars: list[str] = []
        self.finished = False
        self.failure: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._wake_on_char = True

    def put(self, item: object) -> None:
        """A character, ``None`` (the poem is whole) or an exception (it failed); on the loop."""
        if item is None:
            self.finished = True
        elif isinstance(item, BaseException):
            if self.finished:  # a deadline that fires in the same turn as the end: the poem is whole
                return
            self.failure = self.failure or item
        else:
            self.chars.append(item)  # type: ignore[arg-type]
            if not self._wake_on_char:
                return
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self, not_before: float) -> list[str] | None:
        """Every character written since the last take; ``None`` once the poem is whole and all was
        taken. Waits for a character, and holds what it has until ``not_before`` (loop time) unless
        the poem ends first. After a failure, every character written so far is handed over, then
        the failure is raised."""
        while True:
            ended = self.finished or self.failure is not None
            if self.chars and (ended or self.loop.time() >= not_before):
                taken, self.chars = self.chars, []
                return taken
            if ended:
                if self.failure is not None:
                    raise self.failure
                return None
            self._waiter = self.loop.create_future()
            timer = None
            early = self.loop.time() < not_before
            self._wake_on_char = not early
            if early:
                timer = self.loop.call_at(not_before, self._wake)
            try:
                await self._waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()


@dataclass
class _Live:
    sampler: PoemSampler
    mailbox: _Mailbox
    hidden: np.ndarray  # [L, H]
    whole: bool = False  # the reader wants only the finished poem: no character is posted before it
    cancelled: bool = False


def _deliver(items: list[tuple[_Mailbox, object]]) -> None:
    """Runs on a poem's event loop: one call per step carries every character that loop is owed."""
    for mailbox, item in items:
        mailbox.put(item)


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

    @contextlib.contextmanager
    def _enrolled(self, sampler: PoemSampler, deadline: float | None, whole: bool) -> Iterator[_Mailbox]:
        """Hand ``sampler`` to the decoding thread; its mailbox while the caller reads. Leaving (the
        poem read, the client gone or out of time) stops the poem costing steps.

        ``deadline`` (event-loop time) ends the poem with ``TimeoutError``: one timer per poem, where
        ``asyncio.wait_for`` around each read would create a task per read.
        """
        self._ensure_thread()
        loop = asyncio.get_running_loop()
        live = _Live(sampler, _Mailbox(loop), np.zeros((self.num_layers, self.hidden_size), np.float32), whole)
        timer = None if deadline is None else loop.call_at(deadline, live.mailbox.put, TimeoutError())
        self._inbox.put(live)
        try:
            yield live.mailbox
        finally:
            live.cancelled = True
            if timer is not None:
                timer.cancel()

    async def chunks(self, sampler: PoemSampler, deadline: float | None = None, every_s: float = 0.0
                     ) -> AsyncIterator[list[str]]:
        """The characters of one poem as the decoding thread writes them, in lists: each holds all
        written since the one before, at most one list every ``every_s`` seconds (the first at once,
        the last as soon as the poem ends). A stream that writes each list out thus costs one wake-up
        per write, not one per character."""
        loop = asyncio.get_running_loop()
        with self._enrolled(sampler, deadline, whole=False) as mailbox:
            not_before = -float("inf")
            while (chars := await mailbox.take(not_before)) is not None:
                yield chars
                not_before = loop.time() + every_s

    async def generate(self, sampler: PoemSampler, deadline: float | None = None) -> str:
        """The whole poem; the decoding thread posts nothing for it until it is finished."""
        with self._enrolled(sampler, deadline, whole=True) as mailbox:
            while await mailbox.take(-float("inf")) is not None:  # no characters come: only the end
                pass
        return sampler.text

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
                if not s.whole:
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
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Mailbox, object]]] = {}
        for s, item in items:
            by_loop.setdefault(s.mailbox.loop, []).append((s.mailbox, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that loop has closed: nobody is listening any more
                for s, _ in items:
                    if s.mailbox.loop is loop:
                        s.cancelled = True
