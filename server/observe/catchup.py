"""Catch-up: reading the log a page at a time for the streams of one server.

Two things keep a crowd of observers that catch up at once (a deploy, a
network blip, a rejoin storm) from starving the runs producing events:

1. Slots. A page read takes one of `concurrency` slots (KEEL_CATCH_UP_CONCURRENCY);
   streams beyond that wait their turn, FIFO. A slot covers one page: the
   read (and its decoding), its encoding and one turn of the event loop (so a
   read that never suspends, as on the memory log, cannot let every stream
   read a page in the same turn); it is released before the page is sent, so
   a client whose sends wait on flow control never holds one.
2. Shared pages. The log's pages are aligned (page k holds indices
   [k * page_size, (k + 1) * page_size)), and a page that was whole when a
   stream opened is immutable: committed events never change. Such pages are
   kept, with their encoding, in a small LRU shared by every stream of the
   server, so observers of one run that catch up together read and encode
   each page once between them, not once each. A stream joining in the middle
   of a page gets the rest of it (a slice of the same encoding).

The last page of a catch-up is never shared: it is read from the stream's own
offset, right after the stream's live queue is reset, in the same slot; a
short page there is what tells the stream it may go live (server/observe/follow.py).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from keel.v1.agent_service_pb2 import AgentEvent

from server import metrics
from server.errors import OffsetExpired
from server.events.codec import Batch, event_starts
from server.events.log import EventLog, RunRecord
from server.observe.observer import LiveQueue

# Encoded bytes of the pages kept for sharing (their decoded events take about as much).
SHARED_PAGES_BYTES = 16 << 20


@dataclass(slots=True)
class Page:
    """What one step of a catch-up delivers."""

    events: Sequence[AgentEvent]  # consecutive, from the offset asked for; maybe none
    end: bool  # the last of `events` ends the stream (the page was cut right after it)
    more: bool  # the log may hold more; False: the stream may go live (see CatchUp.page)


def until_end(
    batch: Sequence[AgentEvent], ends: frozenset[str]
) -> tuple[Sequence[AgentEvent], bool]:
    """The events of `batch` up to and including the first one whose payload is in `ends`,
    and whether there was one (a page read from the log may go on past a suspension)."""
    for i, event in enumerate(batch):
        if event.WhichOneof("payload") in ends:
            # The whole batch when it ends there, as it usually does: it keeps its encoding.
            return (batch if i + 1 == len(batch) else batch[: i + 1]), True
    return batch, False


class _SharedPage:
    """A whole, committed page; where each of its events starts in the encoding, and where
    the events that end a stream are (each worked out once, for every stream)."""

    __slots__ = ("_starts", "_stops", "batch")

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self._starts: list[int] | None = None
        self._stops: dict[frozenset[str], list[int]] = {}

    def cut(self, skip: int, ends: frozenset[str]) -> tuple[Sequence[AgentEvent], bool]:
        """Its events from position `skip` on, up to and including the first whose payload
        is in `ends`, sharing the page's encoding; and whether there was one."""
        stops = self._stops.get(ends)
        if stops is None:
            stops = self._stops[ends] = [
                i for i, event in enumerate(self.batch) if event.WhichOneof("payload") in ends
            ]
        at = bisect.bisect_left(stops, skip)
        stop = stops[at] + 1 if at < len(stops) else len(self.batch)
        return self._slice(skip, stop), at < len(stops)

    def _slice(self, start: int, stop: int) -> Sequence[AgentEvent]:
        if start == 0 and stop == len(self.batch):
            return self.batch
        if self._starts is None:
            self._starts = event_starts(self.batch.encoded, len(self.batch))
        if not self._starts:
            return self.batch[start:stop]  # an encoding we cannot cut: encoded again when sent
        encoded = self.batch.encoded
        until = self._starts[stop] if stop < len(self.batch) else len(encoded)
        return Batch(self.batch[start:stop], encoded[self._starts[start] : until])


class CatchUp:
    """The catch-up reads of one server's streams: slots and shared pages (see the module doc)."""

    def __init__(
        self, concurrency: int, page_size: int, *, shared_bytes: int = SHARED_PAGES_BYTES
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"catch-up concurrency must be at least 1, got {concurrency}")
        if page_size < 1:
            raise ValueError(f"catch-up page size must be at least 1, got {page_size}")
        self.concurrency = concurrency
        self.page_size = page_size
        # Bound to the running loop at its first contended acquire, not here.
        self._semaphore = asyncio.Semaphore(concurrency)
        self._shared: OrderedDict[tuple[str, int, int], _SharedPage] = OrderedDict()
        self._shared_bytes = 0
        self._max_shared_bytes = shared_bytes
        self._reading: dict[tuple[str, int, int], asyncio.Event] = {}  # pages being read

    async def page(
        self,
        log: EventLog,
        run: RunRecord,
        offset: int,
        queue: LiveQueue,
        ends: frozenset[str],
    ) -> Page:
        """The run's events from `offset` on: at most a page, cut after the first event whose
        payload is in `ends`. `more` False means the page was short, read after `queue` was
        reset: every event committed since is in the queue (or the queue was demoted).

        `run` is the run's record as the stream read it when it opened: every page
        below its `next_index` was committed then.
        """
        size = self.page_size
        start = offset - offset % size
        if start + size <= run.next_index:
            shared = await self._shared_page(log, run, start)
            if shared is not None:
                events, end = shared.cut(offset - start, ends)
                return Page(events, end, more=True)
        async with self._slot():
            # Reset right before the read (not once before the first page): the queue
            # does not overflow while the stream waits for a slot, and the last reset
            # is still before the last read, which is what makes going live lossless.
            queue.resync()
            page = await log.read(run.run_id, offset, size)
            if isinstance(page, Batch):
                page.encoded  # noqa: B018 - encoded (once) while the slot is held
            await asyncio.sleep(0)  # see the module doc, 1.
        metrics.CATCH_UP_PAGES.inc()
        events, end = until_end(page, ends)
        return Page(events, end, more=len(page) == size)

    async def _shared_page(self, log: EventLog, run: RunRecord, start: int) -> _SharedPage | None:
        """The whole page at `start`, shared; read now if no stream read it lately (one
        stream reads, the others wait for it); None if it cannot be read whole (trimmed by
        retention meanwhile)."""
        key = (run.run_id, run.create_time_ms, start)
        while True:
            shared = self._take(key)
            if shared is not None:
                return shared
            reading = self._reading.get(key)
            if reading is None:
                break
            await reading.wait()  # then take what it read, or read it if it could not
        done = self._reading[key] = asyncio.Event()
        try:
            async with self._slot():
                try:
                    page = await log.read(run.run_id, start, self.page_size)
                except OffsetExpired:
                    return None  # the stream's own offset may still be there: read from it
                metrics.CATCH_UP_PAGES.inc()
                if len(page) != self.page_size:
                    return None  # not whole after all (the run's log was replaced): not kept
                shared = _SharedPage(page if isinstance(page, Batch) else Batch(page))
                self._keep(key, shared)  # encodes it, while the slot is held
                await asyncio.sleep(0)  # see the module doc, 1.
            return shared
        finally:
            del self._reading[key]
            done.set()

    def _take(self, key: tuple[str, int, int]) -> _SharedPage | None:
        shared = self._shared.get(key)
        if shared is not None:
            self._shared.move_to_end(key)
            metrics.CATCH_UP_PAGES_SHARED.inc()
        return shared

    def _keep(self, key: tuple[str, int, int], shared: _SharedPage) -> None:
        size = len(shared.batch.encoded)
        if size > self._max_shared_bytes:
            return
        self._shared[key] = shared
        self._shared_bytes += size
        while self._shared_bytes > self._max_shared_bytes:
            _, evicted = self._shared.popitem(last=False)
            self._shared_bytes -= len(evicted.batch.encoded)

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """Hold one of the slots: wait for it (FIFO) if all are taken."""
        if self._semaphore.locked():
            metrics.CATCH_UP_READS_WAITED.inc()
            metrics.CATCH_UP_READS_WAITING.inc()
            try:
                await self._semaphore.acquire()
            finally:
                metrics.CATCH_UP_READS_WAITING.dec()
        else:
            await self._semaphore.acquire()  # free: returns at once
        try:
            yield
        finally:
            self._semaphore.release()
