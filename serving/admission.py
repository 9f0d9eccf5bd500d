"""How late the event loop runs: the queueing delay a new request would meet, for load shedding.

A worker saturated with small requests never holds many of them *inside* the app at once: the queue
forms before it, in the kernel's socket buffers and the loop's ready list, where no counter sees it.
What does show it is the loop's lateness: a timer due every few milliseconds fires as late as the
work queued ahead of it. When that lateness stays above a budget, a new request would wait at
least that long, so the guard refuses it at once (503, ``Retry-After``) instead of letting every
request's latency grow until clients time out.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from serving.settings import Settings


def queue_budget_s(settings: Settings | None = None) -> float:
    """``DLBOOK_MAX_QUEUE_MS`` in seconds: loop lateness above which API requests are shed (0: never)."""
    return (settings or Settings.from_env()).queue_budget_s


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
