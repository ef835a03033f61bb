"""One observer's live side: a bounded queue fed by the log's notifications.

After etcd's watcher: notification never blocks the writer. When the queue
is full, the observer is demoted (`demoted = True`, queue dropped) and goes
back to reading the log, so a slow consumer never slows the run or other
observers and never loses an event.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

from keel.v1.agent_service_pb2 import AgentEvent


class LiveQueue:
    """A Listener (server.events.log) holding up to `max_batches` committed batches."""

    def __init__(self, max_batches: int) -> None:
        self._max_batches = max_batches
        self._batches: deque[Sequence[AgentEvent]] = deque()
        self._wakeup = asyncio.Event()
        self.demoted = False  # notifications were lost: the log must be read before going live

    # Listener

    def on_events(self, events: Sequence[AgentEvent]) -> None:
        if self.demoted:
            return
        if len(self._batches) >= self._max_batches:
            self._demote()
        else:
            self._batches.append(events)
            self._wakeup.set()

    def on_gap(self) -> None:
        self._demote()

    # Consumer side

    def resync(self) -> None:
        """Forget queued batches and listen afresh; call right before reading the log."""
        self._batches.clear()
        self.demoted = False

    def pop(self) -> Sequence[AgentEvent] | None:
        """The oldest queued batch, or None."""
        if self._batches:
            return self._batches.popleft()
        self._wakeup.clear()
        return None

    async def wait(self) -> None:
        """Until a batch is queued or the observer is demoted."""
        await self._wakeup.wait()

    def _demote(self) -> None:
        self.demoted = True
        self._batches.clear()
        self._wakeup.set()
