"""The micro-batcher: a lone request runs in its caller, a crowd shares one call in a worker thread."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from serving.batching import MicroBatcher


def _recording(calls: list[tuple[int, str]]):
    def fn(rows: np.ndarray) -> np.ndarray:
        calls.append((len(rows), threading.current_thread().name))
        return rows * 2

    return fn


def test_a_lone_request_runs_on_the_loop_thread_without_a_hop() -> None:
    calls: list[tuple[int, str]] = []
    batcher = MicroBatcher(_recording(calls), max_batch=8, inline_rows=4)

    async def main() -> np.ndarray:
        return await batcher.submit(np.arange(3))

    result = asyncio.run(main())
    assert result.tolist() == [0, 2, 4]
    assert calls == [(3, threading.current_thread().name)]


def test_concurrent_requests_share_batches_off_the_loop_and_get_their_own_rows() -> None:
    calls: list[tuple[int, str]] = []
    batcher = MicroBatcher(_recording(calls), max_batch=64, inline_rows=4)

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(*(batcher.submit(np.full(2, i)) for i in range(10)))

    results = asyncio.run(main())
    assert [r.tolist() for r in results] == [[2 * i, 2 * i] for i in range(10)]
    loop_thread = threading.current_thread().name
    # All ten queue before the batching task runs: one call, in a worker thread.
    assert calls == [(20, calls[0][1])] and calls[0][1] != loop_thread


def test_a_request_larger_than_inline_rows_goes_to_a_thread() -> None:
    calls: list[tuple[int, str]] = []
    batcher = MicroBatcher(_recording(calls), max_batch=64, inline_rows=4)
    asyncio.run(batcher.submit(np.arange(5)))
    assert calls[0][1] != threading.current_thread().name


def test_a_failing_batch_fails_each_of_its_requests_and_the_batcher_goes_on() -> None:
    def fn(rows: np.ndarray) -> np.ndarray:
        if (rows < 0).any():
            raise ValueError("negative")
        return rows

    batcher = MicroBatcher(fn, max_batch=64, inline_rows=0)

    async def main() -> list:
        return await asyncio.gather(batcher.submit(np.array([-1])), batcher.submit(np.array([1])),
                                    return_exceptions=True)

    first = asyncio.run(main())
    assert all(isinstance(r, ValueError) for r in first)  # one batch, one failure for both
    assert asyncio.run(batcher.submit(np.array([3]))).tolist() == [3]
