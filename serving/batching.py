"""Adaptive batching inside the worker: concurrent requests for one model share one ORT call.

While the model is busy, arriving requests queue; when it frees up, everything queued (up to
``max_batch`` rows) runs as one batch. An idle model runs a lone request at once, so a single
client pays no waiting window and a crowd gets large batches. Nothing is refused for being slow:
BentoML's adaptive batching sheds requests it cannot answer within ``max_latency_ms`` with 503s
(https://docs.bentoml.com/en/latest/guides/adaptive-batching.html), which is not what we want:
load is shed by the request guard instead (``serving.admission``).

A lone request (the only one queued when the model frees up, at most ``inline_rows`` rows) runs on
the event loop itself: for a small model a thread hop costs as much as the inference, and a lone
request is what a lightly loaded server sees. A batch of several requests goes to a worker thread (ONNX Runtime
releases the GIL), so the loop keeps parsing the next requests on the other core while the model
runs. Measured with ``loadtests/request_cpu.py`` and ``loadtests/http_bench.py``
(docs/PERFORMANCE.md): at 32 concurrent requests the loop spent a fifth of its time in
``Session.run`` when batches of up to 16 rows ran on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

BatchFn = Callable[[np.ndarray], np.ndarray]
BatchObserver = Callable[[int, float], None]  # (rows, seconds)


@dataclass
class MicroBatcher:
    fn: BatchFn  # rows [N, ...] → results [N, ...]; runs in a worker thread
    max_batch: int = 256
    observe: BatchObserver | None = None
    inline_rows: int = 0
    _queue: list[tuple[np.ndarray, asyncio.Future]] = field(default_factory=list)
    _wakeup: asyncio.Event | None = None
    _task: asyncio.Task | None = None

    async def submit(self, rows: np.ndarray) -> np.ndarray:
        """Results for ``rows`` (one request's rows, kept together in one batch)."""
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append((rows, future))
        self._wakeup.set()
        return await future

    def _take(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        taken, rows = [], 0
        while self._queue and (not taken or rows + len(self._queue[0][0]) <= self.max_batch):
            item = self._queue.pop(0)
            if item[1].cancelled():
                continue
            taken.append(item)
            rows += len(item[0])
        return taken

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            taken = self._take()
            if not taken:
                continue
            batch = np.concatenate([rows for rows, _ in taken]) if len(taken) > 1 else taken[0][0]
            began = loop.time()
            try:
                if len(taken) == 1 and len(batch) <= self.inline_rows:
                    results = self.fn(batch)  # a lone request: a thread hop would cost more than the model
                else:
                    results = await asyncio.to_thread(self.fn, batch)
            except Exception as err:  # noqa: BLE001 - each waiting request gets the failure
                for _, future in taken:
                    if not future.done():
                        future.set_exception(err)
                continue
            if self.observe:
                self.observe(len(batch), loop.time() - began)
            start = 0
            for rows, future in taken:
                if not future.done():
                    future.set_result(results[start: start + len(rows)])
                start += len(rows)
