"""Follow a run from an offset: catch up from the log, then live (etcd's watchable store).

1. Subscribe, read the run and validate the offset against it (expired ->
   OffsetExpired; past the end of an ended run -> OffsetBeyondEnd; below
   the head of a live-only run -> RunNotResumable), and yield a snapshot.
2. Unsynced: read the log in pages from next_offset (catchup.py: a page
   read takes one of the server's catch-up slots, and whole pages are shared
   between streams). The live queue is reset right before each read of the
   stream's own; such a read returning a short page means the log is
   exhausted for now.
3. Synced: take batches from the live queue, accepting only the exact next
   index: lower indices are duplicates (dropped), a higher one is a gap, and
   a gap or a demotion (queue overflow, lost pub/sub connection) sends the
   observer back to 2. Subscribing before the first read and resetting the
   queue before every read is what makes 2 -> 3 lossless.
4. On a quiet stream, yield a heartbeat and compare with the log's head: a
   notification lost without a demotion is caught here.
5. End right after a terminal event (or, with stop_at_suspend, right after a
   `suspended` event); end with ServerDraining when the server shuts down.

A log that goes back (its store came back with an older state,
events/lineage.py) is caught, never followed: a client that resumes names
the incarnation of the last event it holds, checked in 1; and the stream
reads the run's head and lineage again after every page it reads and at
every heartbeat, and ends with LogRolledBack once the log no longer holds
what it delivered. It tells the client of each newer incarnation with a
heartbeat before the first event that incarnation wrote, so the client
always knows the incarnation of its last event.

A live-only run keeps no events, so there is no step 2 for it: its observer
is synced from the start (subscribing before reading the run's head is what
makes that lossless), and anything that would send it back to 2 (a gap, a
demotion, a head ahead of it) ends the stream with RunNotResumable instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from keel.v1.agent_service_pb2 import AgentEvent

from server import metrics
from server.errors import OffsetBeyondEnd, OffsetExpired, RunNotResumable, ServerDraining
from server.events import lineage
from server.events.codec import Batch
from server.events.log import EventLog, RunRecord, RunState
from server.observe.catchup import CatchUp, until_end
from server.observe.observer import Draining, Heartbeats, LiveQueue

TERMINAL_PAYLOADS = frozenset({"finish", "abort", "error"})
END_OF_STREAM_PAYLOADS = TERMINAL_PAYLOADS | {"suspended"}  # with stop_at_suspend


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The run as it was when the stream opened."""

    run: RunRecord


@dataclass(slots=True)  # not frozen: made per observer per batch, and a frozen __init__ is slower
class Events:
    """Consecutive events, in index order."""

    events: Sequence[AgentEvent]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The stream is alive; `next_offset` is the index it will deliver next, and the
    events delivered so far were last written in `incarnation` (lineage.py)."""

    next_offset: int
    incarnation: str = ""


Item = Snapshot | Events | Heartbeat


@dataclass(frozen=True, slots=True)
class FollowLimits:
    """Tunables of followed streams (see server/settings.py); one server's streams share them."""

    page_size: int = 1000
    queue_size: int = 256
    heartbeat_interval_s: float = 5.0
    catch_up_concurrency: int = 4
    # Shared by every stream these limits are given to (one server's): the catch-up
    # reads (slots, shared pages) and the heartbeat timer.
    catch_up: CatchUp = field(init=False, repr=False, compare=False)
    heartbeats: Heartbeats = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        catch_up = CatchUp(self.catch_up_concurrency, self.page_size)
        object.__setattr__(self, "catch_up", catch_up)
        object.__setattr__(self, "heartbeats", Heartbeats(self.heartbeat_interval_s))


async def follow(
    log: EventLog,
    run_id: str,
    offset: int,
    *,
    limits: FollowLimits,
    draining: Draining,
    stop_at_suspend: bool = False,
    on_subscribed: Callable[[], None] | None = None,
    check: Callable[[RunRecord], None] | None = None,
    incarnation: str = "",
) -> AsyncIterator[Item]:
    """Every event of the run with index >= offset, exactly once, in order; see the module doc.

    `on_subscribed` is called once the stream listens to the run, before the
    snapshot is yielded (a Stream starts its new run's execution there).
    `check` sees the run first and may refuse it by raising (the caller's tenant).
    `incarnation`: the incarnation of the last event the client holds (index
    offset - 1), if it says; the log must still hold that history.
    """
    queue = LiveQueue(limits.queue_size)
    draining.watch(queue)
    limits.heartbeats.watch(queue)
    subscription = await log.subscribe(run_id, queue)
    ends = END_OF_STREAM_PAYLOADS if stop_at_suspend else TERMINAL_PAYLOADS
    try:
        record = await log.get_run(run_id)
        if check is not None:
            check(record)
        lineage.check(run_id, record.lineage, incarnation, offset, record.next_index)
        check_offset(record, offset)
        if on_subscribed is not None:
            on_subscribed()
        yield Snapshot(record)
        at_head = offset == record.next_index
        if at_head and (
            record.state.terminal or (stop_at_suspend and record.state is RunState.SUSPENDED)
        ):
            return
        next_offset = offset
        told = History(run_id, record.lineage)  # the snapshot tells its latest incarnation
        lost_sync = False
        while True:
            if record.live_only:
                # No log to read: synced from the start, and losing sync ends the stream.
                if lost_sync:
                    raise RunNotResumable(run_id, next_offset, await log.head(run_id))
                lost_sync = True
            else:
                # 2. Unsynced: catch up from the log, a page at a time (catchup.py).
                while True:
                    page = await limits.catch_up.page(log, record, next_offset, queue, ends)
                    if page.events or told.resynced:
                        # Read after the page: its events' incarnations are in the lineage.
                        await told.update(log, next_offset)
                    if page.events:
                        metrics.EVENTS_SERVED_LOG.inc(len(page.events))
                        for item in told.split(page.events):
                            yield item
                        next_offset = page.events[-1].index + 1
                        queue.active = True
                        if page.end:
                            return
                    if not page.more:
                        break
                told.resynced = True  # from now on catch-up follows a gap: read the lineage
            # 3. Synced: live batches while nothing is lost.
            told.live_checked = False
            while not queue.demoted:
                batches = queue.pop_all()
                if not batches:
                    if draining.is_set():
                        raise ServerDraining()
                    if queue.heartbeat_due:  # quiet for a heartbeat interval (Heartbeats)
                        queue.heartbeat_due = False
                        yield Heartbeat(next_offset, told.latest)
                        if await told.update(log, next_offset) > next_offset:
                            break  # 4. a notification went missing: read the log
                        continue
                    await queue.wait()  # a batch, a demotion, a heartbeat due, or draining
                    if draining.is_set():
                        raise ServerDraining()
                    continue
                # Batches that queued up while the last message was sent travel together.
                merged = batches[0] if len(batches) == 1 else _merge(batches)
                fresh = _from(merged, next_offset)
                if not fresh:
                    continue  # duplicates only
                if fresh[0].index != next_offset or not _consecutive(fresh):
                    break  # a gap: read the log
                fresh, end = until_end(fresh, ends)
                metrics.EVENTS_SERVED_LIVE.inc(len(fresh))
                if not told.live_checked:
                    # The first live events since the stream synced: learn the incarnation
                    # that writes them (a newer one than the stream knows, if the store
                    # restarted before they came). Another cannot start without a gap.
                    await told.update(log, next_offset)
                    told.live_checked = True
                for item in told.split(fresh):
                    yield item
                next_offset = fresh[-1].index + 1
                queue.active = True
                if end:
                    return
    finally:
        await subscription.close()


class History:
    """What a stream knows of its run's lineage, and which incarnation it told the client."""

    __slots__ = ("latest", "lineage", "live_checked", "resynced", "run_id", "text")

    def __init__(self, run_id: str, text: str) -> None:
        self.run_id = run_id
        self.text = text
        self.lineage = lineage.parse(text)
        self.latest = lineage.latest(text)  # what the client was told last
        # Catch-up after the first: a gap or a demotion came first, perhaps a restart.
        self.resynced = False
        self.live_checked = False  # the lineage was read since the stream last synced

    async def update(self, log: EventLog, next_offset: int) -> int:
        """Read the run's head and lineage again; raise LogRolledBack if the log no longer
        holds what the stream delivered (events below next_offset). The head."""
        head, text = await log.history(self.run_id)
        lineage.check(self.run_id, text, self.latest, next_offset, head)
        if text != self.text:
            self.text, self.lineage = text, lineage.parse(text)
        return head

    def split(self, events: Sequence[AgentEvent]) -> list[Item]:
        """`events`, each incarnation newer than the one told announced by a heartbeat
        before its first event."""
        if not self.lineage or self.lineage[-1][0] == self.latest:
            return [Events(events)]  # the client knows the latest incarnation: all of them
        items: list[Item] = []
        names = [name for name, _ in self.lineage]
        # The last stretch of the incarnation told (update checked that it is there).
        told = len(names) - 1 - names[::-1].index(self.latest) if self.latest else -1
        start = 0
        for name, first in self.lineage[told + 1 :]:
            if first > events[-1].index:
                break
            cut = max(first - events[0].index, start)
            if cut > start:
                items.append(Events(events[start:cut]))
            items.append(Heartbeat(events[0].index + cut, name))
            self.latest, start = name, cut
        items.append(Events(events[start:] if start else events))
        return items


def check_offset(record: RunRecord, offset: int) -> None:
    if record.live_only and offset < record.next_index:
        raise RunNotResumable(record.run_id, offset, record.next_index)
    if offset < record.earliest_index:
        raise OffsetExpired(record.run_id, offset, record.earliest_index, record.next_index)
    if record.state.terminal and offset > record.next_index:
        raise OffsetBeyondEnd(record.run_id, offset, record.next_index)


def _merge(batches: list[Sequence[AgentEvent]]) -> Sequence[AgentEvent]:
    events = [event for batch in batches for event in batch]
    if all(isinstance(batch, Batch) for batch in batches):
        # EventBatch encodings concatenate: the merged batch needs no new serialization.
        return Batch(events, b"".join(cast(Batch, batch).encoded for batch in batches))
    return events


def _consecutive(events: Sequence[AgentEvent]) -> bool:
    # Each committed batch is consecutive; merged ones are unless a notification was lost.
    return events[-1].index - events[0].index + 1 == len(events)


def _from(batch: Sequence[AgentEvent], offset: int) -> Sequence[AgentEvent]:
    """The events of `batch` with index >= offset (batches hold consecutive indices)."""
    if not batch or batch[0].index >= offset:
        return batch
    skip = offset - batch[0].index
    return batch[skip:]
