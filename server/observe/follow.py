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
    """The stream is alive; `next_offset` is the index it will deliver next."""

    next_offset: int


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
) -> AsyncIterator[Item]:
    """Every event of the run with index >= offset, exactly once, in order; see the module doc.

    `on_subscribed` is called once the stream listens to the run, before the
    snapshot is yielded (a Stream starts its new run's execution there).
    `check` sees the run first and may refuse it by raising (the caller's tenant).
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
                    if page.events:
                        metrics.EVENTS_SERVED_LOG.inc(len(page.events))
                        next_offset = page.events[-1].index + 1
                        queue.active = True
                        yield Events(page.events)
                        if page.end:
                            return
                    if not page.more:
                        break
            # 3. Synced: live batches while nothing is lost.
            while not queue.demoted:
                batches = queue.pop_all()
                if not batches:
                    if draining.is_set():
                        raise ServerDraining()
                    if queue.heartbeat_due:  # quiet for a heartbeat interval (Heartbeats)
                        queue.heartbeat_due = False
                        yield Heartbeat(next_offset)
                        if await log.head(run_id) > next_offset:
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
                next_offset = fresh[-1].index + 1
                queue.active = True
                yield Events(fresh)
                if end:
                    return
    finally:
        await subscription.close()


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
