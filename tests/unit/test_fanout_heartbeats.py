"""Heartbeats of live streams: one timer ticks every queue; a quiet one is due a heartbeat."""

from __future__ import annotations

import asyncio

from keel.v1.agent_service_pb2 import AgentEvent

from server.observe.observer import Heartbeats, LiveQueue


async def test_a_queue_quiet_for_every_tick_of_an_interval_is_due_a_heartbeat() -> None:
    queue = LiveQueue(4)
    assert queue.pop_all() == []
    for _ in range(Heartbeats.TICKS - 1):
        queue.tick(Heartbeats.TICKS)
    assert not queue.heartbeat_due
    queue.tick(Heartbeats.TICKS)
    assert queue.heartbeat_due
    await queue.wait()  # woken: returns at once


async def test_activity_starts_the_quiet_stretch_over() -> None:
    queue = LiveQueue(4)
    for _ in range(Heartbeats.TICKS - 1):
        queue.tick(Heartbeats.TICKS)
    queue.active = True  # the stream sent something
    for _ in range(Heartbeats.TICKS):
        queue.tick(Heartbeats.TICKS)
    assert not queue.heartbeat_due  # the first tick only saw the activity
    queue.tick(Heartbeats.TICKS)
    assert queue.heartbeat_due


async def test_a_batch_wakes_the_queue_without_a_heartbeat() -> None:
    queue = LiveQueue(4)
    waiter = asyncio.create_task(queue.wait())
    event = AgentEvent(run_id="r", index=0)
    queue.on_events([event])
    await waiter
    assert queue.pop_all() == [[event]] and not queue.heartbeat_due


async def test_the_timer_ticks_watched_queues_and_stops_when_none_is_left() -> None:
    heartbeats = Heartbeats(0.02)
    queue = LiveQueue(4)
    heartbeats.watch(queue)
    while not queue.heartbeat_due:  # a quiet queue gets one, however long that takes here
        queue.pop_all()
        await queue.wait()
    del queue  # the stream ended: nothing is watched, and the timer stops at its next tick
    while heartbeats._timer is not None:
        await asyncio.sleep(0.01)
