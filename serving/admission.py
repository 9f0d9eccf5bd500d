"""How a request is admitted: a bounded queue of slots, and how late the event loop runs.

**Slots** (:class:`Slots`): at most ``DLBOOK_MAX_IN_FLIGHT`` API requests execute at once; the next
ones wait, up to ``DLBOOK_MAX_WAITING`` of them and for at most ``DLBOOK_MAX_WAIT_MS`` each, before
the guard reads their bodies, and get freed slots in arrival order until the oldest has waited
``DLBOOK_NEWEST_FIRST_AFTER_MS``, newest first from then on; only a request that finds the queue full,
or waits out its time, is refused (503, ``Retry-After``). Measured on the 2-core box
(``loadtests/overload.py``, docs/PERFORMANCE.md): refusing at once when 64 requests were in
progress made goodput *fall* with load, from 1,930 answers/s at 32 connections to 966 at 128 and
458 at 256, because a refused client sends its next request at once, and those refusals (HTTP
parsing, a JSON body, a log line, metrics, wrk's own work on the same cores) took the CPU that
serving needed: 2,605 refusals/s at 256 connections. A request that waits instead costs a timer and
a future, nothing on the cores, and a closed-loop client that waits sends nothing else meanwhile, so
the worker keeps serving at capacity and arrival order keeps the wait fair (TGI's router queues the
same way, with a bounded queue).

A worker saturated with small requests never holds many of them *inside* the app at once: the queue
forms before it, in the kernel's socket buffers and the loop's ready list, where no counter sees it.
What does show it is the loop's lateness: a timer due every few milliseconds fires as late as the
work queued ahead of it. When that lateness stays above a budget, a new request would wait at
least that long, so the guard refuses it at once (503, ``Retry-After``) instead of letting every
request's latency grow until clients time out.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from serving.settings import Settings


def queue_budget_s(settings: Settings | None = None) -> float:
    """``DLBOOK_MAX_QUEUE_MS`` in seconds: loop lateness above which API requests are shed (0: never)."""
    return (settings or Settings.from_env()).queue_budget_s


@dataclass
class Slots:
    """``limit`` requests execute at once (0: no limit); the next ones wait for a slot.

    ``enter()`` is a plain counter increment while a slot is free and nobody waits (the hot path pays no
    await); otherwise the caller waits for a slot to be handed over by ``leave()`` (no thundering herd:
    exactly one waiter wakes), for at most ``max_wait_s``. It returns False, and the caller refuses the
    request, when ``max_waiting`` requests already wait or the wait ran out.

    Which waiter gets a freed slot: the longest waiting (arrival order) while the queue drains
    quickly; the newest once the oldest has waited ``newest_first_after_s`` (adaptive LIFO, as in
    "Fail at Scale", Maurer 2015, https://queue.acm.org/detail.cfm?id=2839461). Under sustained
    overload arrival order hands every slot to the request closest to its deadline, so every
    accepted request has waited nearly the longest; newest-first serves the requests whose clients
    are still likely waiting, keeps their latency near the unloaded one, and leaves the oldest to run
    out their wait and be refused (measured with ``loadtests/overload.py``, docs/PERFORMANCE.md).
    """

    limit: int
    max_waiting: int
    max_wait_s: float
    newest_first_after_s: float = 0.0  # 0: always arrival order
    executing: int = 0
    waiters: deque[tuple[asyncio.Future[bool], float]] = field(default_factory=deque)

    @property
    def waiting(self) -> int:
        return sum(not f.done() for f, _ in self.waiters)

    async def enter(self) -> bool:
        if not self.limit or (self.executing < self.limit and not self.waiters):
            self.executing += 1
            return True
        if self.max_waiting <= 0 or self.max_wait_s <= 0:
            return False
        if len(self.waiters) >= self.max_waiting:
            self._drop_expired()
            if len(self.waiters) >= self.max_waiting:
                return False
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[bool] = loop.create_future()
        self.waiters.append((turn, loop.time()))
        expiry = loop.call_later(self.max_wait_s, _expire, turn)
        try:
            return await turn  # True: a leaving request handed its slot over (``executing`` unchanged)
        except asyncio.CancelledError:
            # The client went away while waiting. A slot handed over in that instant is passed on.
            if turn.done() and not turn.cancelled() and turn.result():
                self.leave()
            raise
        finally:
            expiry.cancel()

    def leave(self) -> None:
        """Hand the slot to a waiter still waiting (the oldest, or the newest under overload), else free it."""
        self._drop_expired()
        if self.waiters and self.newest_first_after_s:
            oldest_since = self.waiters[0][1]
            if asyncio.get_running_loop().time() - oldest_since > self.newest_first_after_s:
                while self.waiters:
                    turn, _ = self.waiters.pop()
                    if not turn.done():
                        turn.set_result(True)
                        return
        while self.waiters:
            turn, _ = self.waiters.popleft()
            if not turn.done():
                turn.set_result(True)
                return
        self.executing -= 1

    def _drop_expired(self) -> None:
        """Waits run out in arrival order: the expired (and cancelled) ones are at the front."""
        while self.waiters and self.waiters[0][0].done():
            self.waiters.popleft()


def _expire(turn: asyncio.Future[bool]) -> None:
    """The wait ran out: the request is refused (its future stays in the queue until ``leave`` skips it)."""
    if not turn.done():
        turn.set_result(False)


@dataclass
class LoopLag:
    """A smoothed measure of the running loop's lateness, sampled by a timer every ``period_s``."""

    period_s: float = 0.005
    smoothing: float = 0.3  # weight of the newest sample
    lag_s: float = 0.0
    _task: asyncio.Task | None = None

    def ensure_running(self) -> None:
        """Start sampling on the current loop (first request, or a new loop after a restart)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self.lag_s = 0.0
            self._task = loop.create_task(self._sample())

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.period_s
            await asyncio.sleep(self.period_s)
            late = max(0.0, loop.time() - due)
            self.lag_s += self.smoothing * (late - self.lag_s)
