"""``serving.admission.Slots``: requests beyond the limit wait in arrival order, bounded in number and time.

Run on asyncio's real loop; the order is driven by yielding to the loop, not by sleeping, and nothing
here measures or bounds how long anything takes."""

from __future__ import annotations

import asyncio

import pytest

from serving.admission import Slots


async def _hold(slots: Slots, order: list[int], i: int, release: asyncio.Event) -> bool:
    admitted = await slots.enter()
    if admitted:
        order.append(i)
        await release.wait()
        slots.leave()
    return admitted


def test_a_free_slot_is_taken_without_waiting_and_given_back() -> None:
    async def scenario() -> None:
        slots = Slots(limit=2, max_waiting=4, max_wait_s=1.0)
        assert await slots.enter() and await slots.enter()
        assert slots.executing == 2 and not slots.waiters
        slots.leave()
        slots.leave()
        assert slots.executing == 0

    asyncio.run(scenario())


def test_waiters_are_admitted_in_arrival_order_as_slots_free_up() -> None:
    async def scenario() -> list[int]:
        slots = Slots(limit=1, max_waiting=8, max_wait_s=5.0)
        order: list[int] = []
        releases = [asyncio.Event() for _ in range(5)]
        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(_hold(slots, order, i, releases[i])))
            await asyncio.sleep(0)  # each arrives after the previous one
        for i in range(5):
            for _ in range(3):  # let the woken waiter run up to its release event
                await asyncio.sleep(0)
            assert order == list(range(i + 1)) and slots.executing == 1  # exactly one runs; the next waits
            releases[i].set()
        assert all(await asyncio.gather(*tasks))
        assert slots.executing == 0 and slots.waiting == 0
        return order

    assert asyncio.run(scenario()) == [0, 1, 2, 3, 4]


def test_a_full_queue_refuses_at_once_and_a_long_wait_is_refused() -> None:
    async def scenario() -> None:
        slots = Slots(limit=1, max_waiting=2, max_wait_s=0.001)
        assert await slots.enter()
        waiting = [asyncio.create_task(slots.enter()) for _ in range(2)]
        await asyncio.sleep(0)
        assert slots.waiting == 2
        assert await slots.enter() is False  # a third would wait: the queue holds two
        assert await asyncio.gather(*waiting) == [False, False]  # nobody left before their deadline: both refused
        slots.leave()
        assert slots.executing == 0 and slots.waiting == 0
        assert await slots.enter()  # the expired entries do not block a later request

    asyncio.run(scenario())


def test_no_waiting_means_refusing_at_once() -> None:
    async def scenario() -> None:
        slots = Slots(limit=1, max_waiting=0, max_wait_s=1.0)
        assert await slots.enter()
        assert await slots.enter() is False

    asyncio.run(scenario())


@pytest.mark.parametrize("handed_over_first", [False, True])
def test_a_client_that_leaves_while_waiting_loses_no_slot(handed_over_first: bool) -> None:
    async def scenario() -> None:
        slots = Slots(limit=1, max_waiting=4, max_wait_s=5.0)
        assert await slots.enter()
        gone = asyncio.create_task(slots.enter())
        await asyncio.sleep(0)
        if handed_over_first:
            slots.leave()  # the slot is handed to the waiter, which is cancelled before it runs
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        if not handed_over_first:
            slots.leave()
        assert slots.executing == 0 and slots.waiting == 0
        assert await slots.enter() and slots.executing == 1

    asyncio.run(scenario())
