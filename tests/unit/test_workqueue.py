"""The work queue between the producer and the workers."""

from __future__ import annotations

import asyncio

from pipeline.engine.workqueue import WorkQueue


async def test_items_come_out_in_order_then_none_after_close() -> None:
    queue: WorkQueue[int] = WorkQueue(low_water=2)
    await queue.put_many([1, 2, 3])
    queue.close()
    assert [await queue.get() for _ in range(4)] == [1, 2, 3, None]


async def test_producer_waits_for_the_low_water_mark() -> None:
    """A slice is added only when the queue has drained to the low-water mark."""
    queue: WorkQueue[int] = WorkQueue(low_water=2)
    await queue.put_many([1, 2, 3, 4])
    second = asyncio.create_task(queue.put_many([5, 6]))
    await asyncio.sleep(0)
    assert not second.done() and len(queue) == 4
    assert await queue.get() == 1
    await asyncio.sleep(0)
    assert not second.done()  # 3 left, still above 2
    assert await queue.get() == 2
    await asyncio.wait_for(second, 1)
    assert len(queue) == 4


async def test_close_with_drop_wakes_idle_workers_and_drops_pending() -> None:
    queue: WorkQueue[int] = WorkQueue(low_water=1)
    waiting = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.close(drop_pending=True)
    assert await asyncio.wait_for(waiting, 1) is None
    await queue.put_many([1])  # ignored once closed
    assert await queue.get() is None
