"""One observer's live side: a bounded queue fed by the log's notifications.

After etcd's watcher: notification never blocks the writer. When the queue
is full, the observer is demoted (`demoted = True`, queue dropped) and goes
back to reading the log, so a slow consumer never slows the run or other
observers and never loses an event.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Sequence

from keel.v1.agent_service_pb2 import AgentEvent

from server import metrics


class LiveQueue:
    """A Listener (server.events.log) holding up to `max_batches` committed batches.

    Made on the event loop its consumer waits on. Waiting is a bare future of
    that loop, not an asyncio.Event: Event.wait looks the running loop up on
    every call, which on Python 3.11 costs a getpid system call, once per
    observer per event of a fan-out.
    """

    def __init__(self, max_batches: int) -> None:
        self._max_batches = max_batches
        self._batches: deque[Sequence[AgentEvent]] = deque()
        self._loop = asyncio.get_running_loop()
        self._woken = False  # something happened since the consumer last found nothing
        self._waiter: asyncio.Future[None] | None = None
        self.demoted = False  # notifications were lost: the log must be read before going live
        # Heartbeats (see Heartbeats): the consumer sets `active` whenever it sends
        # something; a quiet interval sets `heartbeat_due` and wakes the consumer.
        self.active = False
        self.heartbeat_due = False
        self._quiet_ticks = 0

    # Listener

    def on_events(self, events: Sequence[AgentEvent]) -> None:
        if self.demoted:
            return
        if len(self._batches) >= self._max_batches:
            self._demote()
        else:
            self._batches.append(events)
            self._wake()

    def on_gap(self) -> None:
        self._demote()

    # Consumer side

    def resync(self) -> None:
        """Forget queued batches and listen afresh; call right before reading the log."""
        self._batches.clear()
        self.demoted = False

    def pop_all(self) -> list[Sequence[AgentEvent]]:
        """Every queued batch, oldest first ([] if none): sent on together, in one message."""
        if self._batches:
            batches = list(self._batches)
            self._batches.clear()
            return batches
        self._woken = False
        return []

    async def wait(self) -> None:
        """Until a batch is queued, the observer is demoted, a heartbeat is due, or `wake`
        is called, since pop_all last returned nothing."""
        if self._woken:
            return
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def wake(self) -> None:
        """Make `wait` return (the server is draining: the observer must look up)."""
        self._wake()

    def _wake(self) -> None:
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def tick(self, quiet_ticks: int) -> None:
        """One tick of Heartbeats: a heartbeat is due after `quiet_ticks` quiet ticks in a row."""
        if self.active:
            self.active = False
            self._quiet_ticks = 0
            return
        self._quiet_ticks += 1
        if self._quiet_ticks >= quiet_ticks:
            self._quiet_ticks = 0
            self.heartbeat_due = True
            self._wake()

    def _demote(self) -> None:
        if not self.demoted:
            metrics.OBSERVERS_DEMOTED.inc()
        self.demoted = True
        self._batches.clear()
        self._wake()


class Draining:
    """Set once when the server shuts down; wakes every waiting observer at once.

    One flag for the whole server instead of an asyncio.Event per wait: a
    quiet observer waits on its own queue alone, which keeps a fan-out to
    many observers cheap.
    """

    def __init__(self) -> None:
        self._set = False
        self._queues: weakref.WeakSet[LiveQueue] = weakref.WeakSet()

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        for queue in list(self._queues):
            queue.wake()

    def watch(self, queue: LiveQueue) -> None:
        """Wake `queue` when the server drains (held weakly: no need to unwatch)."""
        self._queues.add(queue)


class Heartbeats:
    """Tells the queues of quiet streams that a heartbeat is due, with one timer for all.

    Every interval / TICKS a timer ticks every watched queue; a queue that saw
    no activity (LiveQueue.active) for TICKS ticks in a row is due a heartbeat,
    so a stream quiet for the interval gets one within 1.25 intervals. This
    spares every wait of every stream a timer of its own, which a fan-out to
    many observers would otherwise arm and cancel once per observer per event.
    The timer runs only while some queue is watched.
    """

    TICKS = 4

    def __init__(self, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"heartbeat interval must be positive, got {interval_s}")
        self._tick_s = interval_s / self.TICKS
        self._queues: weakref.WeakSet[LiveQueue] = weakref.WeakSet()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, queue: LiveQueue) -> None:
        """Tick `queue` until it is gone (held weakly: no need to unwatch)."""
        self._queues.add(queue)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._tick_s, self._tick)

    def _tick(self) -> None:
        self._timer = None
        queues = list(self._queues)
        for queue in queues:
            queue.tick(self.TICKS)
        if queues:
            self._timer = asyncio.get_running_loop().call_later(self._tick_s, self._tick)
