"""A task attempt whose cancellation was lost is cancelled again when it is told again.

redis-py sends each command through asyncio.wait_for, which on Python 3.11 may
swallow a cancellation that lands as the send completes. A stopped attempt
that swallowed its cancellation would then run its tool to the end; the lease
renewal tells the runner again (a cancel request is stored with the task), and
the runner must cancel again, though it was told once already.
"""

from __future__ import annotations

import asyncio

from server.events.memory import MemoryEventLog
from server.tasks.factory import task_store_for
from server.tasks.runner import TaskLimits, TaskRunner, _Attempt


async def test_a_second_stop_cancels_an_attempt_that_swallowed_the_first() -> None:
    log = MemoryEventLog()
    runner = TaskRunner(
        task_store_for(log, lease_ttl_s=5.0),
        log,
        {},
        instance_id="test",
        limits=TaskLimits(),
    )
    cancellations = 0
    swallowed = asyncio.Event()

    async def stubborn_tool() -> None:
        """Swallows its first cancellation, as a send in redis-py can."""
        nonlocal cancellations
        while True:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancellations += 1
                if cancellations == 1:
                    swallowed.set()
                    continue
                raise

    task = asyncio.create_task(stubborn_tool())
    attempt = _Attempt(task=None, runner=task, started=True)  # type: ignore[arg-type]
    runner._attempts["t1"] = attempt
    await asyncio.sleep(0)

    runner.stop("t1", "cancelled")  # a cancel request's message
    await swallowed.wait()
    assert not task.done()  # the cancellation was lost
    runner.stop("t1", "cancelled")  # the lease renewal: a cancel was requested
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled() and cancellations == 2
    assert attempt.stop_reason == "cancelled"


async def test_a_second_stop_leaves_an_attempt_that_is_writing_how_it_stopped() -> None:
    log = MemoryEventLog()
    runner = TaskRunner(
        task_store_for(log, lease_ttl_s=5.0), log, {}, instance_id="test", limits=TaskLimits()
    )
    finishing = asyncio.Event()

    async def winding_down() -> None:
        finishing.set()
        await asyncio.sleep(0.05)  # writing its outcome

    task = asyncio.create_task(winding_down())
    attempt = _Attempt(task=None, runner=task, started=True, stop_reason="cancelled")  # type: ignore[arg-type]
    attempt.stopping = True
    runner._attempts["t1"] = attempt
    await finishing.wait()
    runner.stop("t1", "cancelled")
    await task
    assert not task.cancelled()
