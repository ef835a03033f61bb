"""The EventLog contract: every test runs against MemoryEventLog and RedisEventLog alike.

Tests at the end (marked Redis only) check what only the Redis implementation
has: its key layout and TTLs, its active set, its one pub/sub connection and
its one script call per batch.

Time-dependent tests let time pass with `log_clock.advance` (tests/conftest.py):
instant on memory, a real wait on Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import pytest
import redis.asyncio as aioredis
from keel.v1.agent_service_pb2 import AgentEvent, EventBatch, TextDelta

from server.errors import (
    ConcurrentModification,
    IndexConflict,
    OffsetExpired,
    RunNotFound,
    StaleEpoch,
    StoreUnavailable,
)
from server.events.codec import encode_batch, serialize_events
from server.events.keys import Keys, run_index_member
from server.events.log import EventLog, RunPageCursor, RunRecord, RunState
from server.events.redis import RedisEventLog

SHORT_TTL_S = 0.2
# Long enough that a lease renewed halfway cannot lapse under a loaded test machine.
RENEWED_LEASE_TTL_S = 0.6
BINARY = b"\x00\xff\xfe\x80not utf-8\x00\r\n" + bytes(range(256))


class DisposableRedis(Protocol):
    """The disposable_redis fixture (tests/conftest.py): a Redis of the test's own."""

    url: str

    def stop(self) -> None: ...


class OpenEventLog(Protocol):
    """The open_event_log fixture (tests/conftest.py): a log of the test's backend."""

    async def __call__(
        self, *, terminal_ttl_s: float = ..., retain_events: int = ..., lease_ttl_s: float = ...
    ) -> EventLog: ...


class LogClock(Protocol):
    """The log_clock fixture (tests/conftest.py): the time the test's logs see."""

    async def advance(self, seconds: float) -> None: ...


def make_record(
    run_id: str | None = None,
    *,
    agent_id: str = "echo",
    state: RunState = RunState.RUNNING,
    create_time_ms: int = 1_000,
    epoch: int = 1,
) -> RunRecord:
    return RunRecord(
        run_id=run_id or f"run-{uuid.uuid4().hex[:8]}",
        agent_id=agent_id,
        input="hello",
        request_id="req-1",
        state=state,
        create_time_ms=create_time_ms,
        update_time_ms=create_time_ms,
        epoch=epoch,
        owner="instance-a",
    )


def make_events(run_id: str, start: int, count: int, tag: str = "t") -> list[AgentEvent]:
    return [
        AgentEvent(
            run_id=run_id, index=i, step=1, attempt=1, text_delta=TextDelta(delta=f"{tag}{i}")
        )
        for i in range(start, start + count)
    ]


async def new_run(log: EventLog, **kwargs: object) -> RunRecord:
    record, created = await log.create_run(make_record(**kwargs))  # type: ignore[arg-type]
    assert created
    return record


def indices(events: Sequence[AgentEvent]) -> list[int]:
    return [e.index for e in events]


class Recorder:
    """A Listener that records what it is told."""

    def __init__(self) -> None:
        self.events: list[AgentEvent] = []
        self.gaps = 0
        self._changed = asyncio.Event()

    def on_events(self, events: Sequence[AgentEvent]) -> None:
        self.events.extend(events)
        self._changed.set()

    def on_gap(self) -> None:
        self.gaps += 1
        self._changed.set()

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


class CancelRecorder:
    """A ControlListener that records the reasons it is told."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self._changed = asyncio.Event()

    def on_cancel(self, reason: str) -> None:
        self.reasons.append(reason)
        self._changed.set()

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


# --- runs --------------------------------------------------------------------


async def test_create_run_is_idempotent_and_returns_the_first_record(event_log: EventLog) -> None:
    first = make_record(agent_id="echo")
    stored, created = await event_log.create_run(first)
    assert created and stored == first

    again, created_again = await event_log.create_run(
        make_record(first.run_id, agent_id="other", create_time_ms=9_999)
    )
    assert not created_again
    assert again == first
    assert await event_log.get_run(first.run_id) == first


async def test_unknown_run_raises_run_not_found_everywhere(event_log: EventLog) -> None:
    with pytest.raises(RunNotFound):
        await event_log.get_run("nope")
    with pytest.raises(RunNotFound):
        await event_log.read("nope", 0, 10)
    with pytest.raises(RunNotFound):
        await event_log.append("nope", 1, make_events("nope", 0, 1))
    with pytest.raises(RunNotFound):
        await event_log.incr_counter("nope", "k")
    with pytest.raises(RunNotFound):
        await event_log.incr_counter("nope", "k", once_key="call-1")
    with pytest.raises(RunNotFound):
        await event_log.journal_tool("nope", 1, "call-1", b"result")
    with pytest.raises(RunNotFound):
        await event_log.request_cancel("nope", "stop")
    # The ownership calls answer "no" rather than raise: a run may expire under a claimer.
    assert await event_log.claim("nope", "instance-b") is None
    assert await event_log.renew("nope", 1) is False
    await event_log.release("nope", 1)
    assert await event_log.journaled_tool("nope", "call-1") is None


# --- append and read ---------------------------------------------------------


async def test_append_keeps_dense_indices_and_read_pages_them_in_order(event_log: EventLog) -> None:
    run = await new_run(event_log)
    assert await event_log.append(run.run_id, 1, make_events(run.run_id, 0, 3)) == 3
    assert await event_log.append(run.run_id, 1, make_events(run.run_id, 3, 1)) == 4
    assert await event_log.append(run.run_id, 1, make_events(run.run_id, 4, 6)) == 10

    pages: list[list[AgentEvent]] = []
    offset = 0
    while page := await event_log.read(run.run_id, offset, 4):
        pages.append(page)
        offset = page[-1].index + 1
    assert [indices(p) for p in pages] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [e.text_delta.delta for p in pages for e in p] == [f"t{i}" for i in range(10)]
    assert (await event_log.get_run(run.run_id)).next_index == 10


async def test_read_at_or_past_the_head_returns_nothing(event_log: EventLog) -> None:
    run = await new_run(event_log)
    assert await event_log.read(run.run_id, 0, 10) == []
    await event_log.append(run.run_id, 1, make_events(run.run_id, 0, 2))
    assert await event_log.read(run.run_id, 2, 10) == []
    assert await event_log.read(run.run_id, 1_000, 10) == []


async def test_append_moves_the_state_with_or_without_events(event_log: EventLog) -> None:
    run = await new_run(event_log, state=RunState.QUEUED)
    assert await event_log.append(run.run_id, 1, [], state=RunState.RUNNING) == 0
    assert (await event_log.get_run(run.run_id)).state is RunState.RUNNING

    await event_log.append(
        run.run_id, 1, make_events(run.run_id, 0, 2), state=RunState.FAILED, error="boom"
    )
    stored = await event_log.get_run(run.run_id)
    assert (stored.state, stored.error, stored.next_index) == (RunState.FAILED, "boom", 2)
    assert stored.update_time_ms >= run.update_time_ms


async def test_append_with_a_stale_epoch_raises_and_writes_nothing(event_log: EventLog) -> None:
    run = await new_run(event_log, epoch=2)
    with pytest.raises(StaleEpoch) as raised:
        await event_log.append(
            run.run_id, 1, make_events(run.run_id, 0, 2), state=RunState.SUCCEEDED
        )
    assert (raised.value.epoch, raised.value.current_epoch) == (1, 2)
    assert await event_log.read(run.run_id, 0, 10) == []
    assert await event_log.get_run(run.run_id) == run


async def test_append_not_at_next_index_raises_index_conflict_and_writes_nothing(
    event_log: EventLog,
) -> None:
    run = await new_run(event_log)
    await event_log.append(run.run_id, 1, make_events(run.run_id, 0, 2))

    with pytest.raises(IndexConflict) as ahead:
        await event_log.append(run.run_id, 1, make_events(run.run_id, 3, 1), state=RunState.FAILED)
    assert (ahead.value.first_index, ahead.value.next_index) == (3, 2)
    with pytest.raises(IndexConflict):  # a second writer's different events at taken indices
        await event_log.append(run.run_id, 1, make_events(run.run_id, 1, 1, tag="other"))

    assert indices(await event_log.read(run.run_id, 0, 10)) == [0, 1]
    stored = await event_log.get_run(run.run_id)
    assert (stored.next_index, stored.state) == (2, RunState.RUNNING)


async def test_exact_replay_of_a_committed_batch_is_a_no_op(event_log: EventLog) -> None:
    """A writer retrying an append whose reply it lost must not see a conflict."""
    run = await new_run(event_log)
    batch = make_events(run.run_id, 0, 3)
    await event_log.append(run.run_id, 1, batch)
    await event_log.append(run.run_id, 1, make_events(run.run_id, 3, 1))

    assert await event_log.append(run.run_id, 1, batch) == 4
    assert indices(await event_log.read(run.run_id, 0, 10)) == [0, 1, 2, 3]


async def test_batch_with_non_consecutive_indices_is_rejected(event_log: EventLog) -> None:
    run = await new_run(event_log)
    bad = make_events(run.run_id, 0, 1) + make_events(run.run_id, 2, 1)
    with pytest.raises(ValueError):
        await event_log.append(run.run_id, 1, bad)
    assert await event_log.read(run.run_id, 0, 10) == []


# --- retention ---------------------------------------------------------------


async def test_terminal_state_expires_the_run_after_the_ttl(open_event_log: OpenEventLog) -> None:
    log = await open_event_log(terminal_ttl_s=SHORT_TTL_S)
    run = await new_run(log)
    await log.append(run.run_id, 1, make_events(run.run_id, 0, 2), state=RunState.SUCCEEDED)
    assert (await log.get_run(run.run_id)).state is RunState.SUCCEEDED

    await asyncio.sleep(SHORT_TTL_S * 2.5)
    with pytest.raises(RunNotFound):
        await log.get_run(run.run_id)
    with pytest.raises(RunNotFound):
        await log.read(run.run_id, 0, 10)
    # The id is free again: a new run may take it.
    assert (await log.create_run(make_record(run.run_id)))[1]


@pytest.mark.parametrize("state", [RunState.QUEUED, RunState.RUNNING, RunState.SUSPENDED])
async def test_nothing_expires_while_a_run_is_live(
    open_event_log: OpenEventLog, state: RunState
) -> None:
    log = await open_event_log(terminal_ttl_s=SHORT_TTL_S)
    run = await new_run(log, state=RunState.QUEUED)
    await log.append(run.run_id, 1, make_events(run.run_id, 0, 2), state=state)
    await log.incr_counter(run.run_id, "k")

    await asyncio.sleep(SHORT_TTL_S * 2.5)
    assert (await log.get_run(run.run_id)).state is state
    assert indices(await log.read(run.run_id, 0, 10)) == [0, 1]
    assert await log.get_counter(run.run_id, "k") == 1


async def test_retain_events_trims_and_read_below_earliest_raises_offset_expired(
    open_event_log: OpenEventLog,
) -> None:
    log = await open_event_log(retain_events=3)
    run = await new_run(log)
    await log.append(run.run_id, 1, make_events(run.run_id, 0, 2))
    assert (await log.get_run(run.run_id)).earliest_index == 0
    await log.append(run.run_id, 1, make_events(run.run_id, 2, 3))

    stored = await log.get_run(run.run_id)
    assert (stored.earliest_index, stored.next_index) == (2, 5)
    assert indices(await log.read(run.run_id, 2, 10)) == [2, 3, 4]
    with pytest.raises(OffsetExpired) as raised:
        await log.read(run.run_id, 1, 10)
    expired = raised.value
    assert (expired.offset, expired.earliest_offset, expired.next_offset) == (1, 2, 5)


# --- notifications -----------------------------------------------------------


async def test_listener_gets_each_appended_batch_in_order_until_closed(
    event_log: EventLog,
) -> None:
    run = await new_run(event_log)
    recorder, other = Recorder(), Recorder()
    subscription = await event_log.subscribe(run.run_id, recorder)
    other_subscription = await event_log.subscribe(run.run_id, other)

    await event_log.append(run.run_id, 1, make_events(run.run_id, 0, 2))
    await event_log.append(run.run_id, 1, [], state=RunState.SUSPENDED)  # announces nothing
    await event_log.append(run.run_id, 1, make_events(run.run_id, 2, 3))
    await recorder.wait_until(lambda: len(recorder.events) == 5)
    assert indices(recorder.events) == [0, 1, 2, 3, 4]
    assert recorder.events == await event_log.read(run.run_id, 0, 10)

    await subscription.close()
    await subscription.close()  # safe twice
    await event_log.append(run.run_id, 1, make_events(run.run_id, 5, 1))
    await other.wait_until(lambda: len(other.events) == 6)
    assert len(recorder.events) == 5
    await other_subscription.close()


async def test_subscribe_then_read_misses_nothing_while_a_writer_appends(
    event_log: EventLog,
) -> None:
    """The observer's recipe: subscribe, then read; live events continue where the log ends."""
    run = await new_run(event_log)
    total = 200
    await event_log.append(run.run_id, 1, make_events(run.run_id, 0, 10))

    async def writer() -> None:
        for index in range(10, total):
            await event_log.append(run.run_id, 1, make_events(run.run_id, index, 1))
            await asyncio.sleep(0)

    writing = asyncio.create_task(writer())
    # Subscribe mid-write: waiting on the log, not a timer, which a loaded machine can
    # overshoot until the writer is done (and no live event would come).
    while (await event_log.get_run(run.run_id)).next_index < 20:
        await asyncio.sleep(0)
    head_before = (await event_log.get_run(run.run_id)).next_index
    recorder = Recorder()
    subscription = await event_log.subscribe(run.run_id, recorder)
    caught_up: list[AgentEvent] = []
    while page := await event_log.read(run.run_id, len(caught_up), 50):
        caught_up.extend(page)
    await writing
    await recorder.wait_until(
        lambda: bool(recorder.events) and recorder.events[-1].index == total - 1
    )
    await subscription.close()

    live = indices(recorder.events)
    assert live == list(range(live[0], total)), "live events are consecutive and in order"
    assert live[0] >= head_before, "nothing committed before subscribe is announced"
    assert indices(caught_up) == list(range(len(caught_up)))
    assert len(caught_up) >= live[0], "the read reaches where live events start: no gap"


async def test_subscribing_to_a_run_before_it_exists_is_allowed(event_log: EventLog) -> None:
    recorder = Recorder()
    subscription = await event_log.subscribe("later", recorder)
    run = await new_run(event_log, run_id="later")
    await event_log.append(run.run_id, 1, make_events(run.run_id, 0, 1))
    await recorder.wait_until(lambda: len(recorder.events) == 1)
    await subscription.close()


# --- listing -----------------------------------------------------------------


async def test_list_runs_newest_first_with_filters_and_cursor_paging(event_log: EventLog) -> None:
    specs = [
        ("r1", "echo", RunState.SUCCEEDED, 1_000),
        ("r2", "scripted", RunState.RUNNING, 2_000),
        ("r3a", "echo", RunState.RUNNING, 3_000),
        ("r3b", "echo", RunState.SUSPENDED, 3_000),  # same time: ordered by run_id
        ("r4", "scripted", RunState.FAILED, 4_000),
    ]
    for run_id, agent_id, state, create_time_ms in specs:
        await new_run(event_log, run_id=run_id, agent_id=agent_id, create_time_ms=create_time_ms)
        if state is not RunState.RUNNING:
            await event_log.append(run_id, 1, [], state=state)

    def ids(runs: list[RunRecord]) -> list[str]:
        return [r.run_id for r in runs]

    assert ids(await event_log.list_runs(limit=10)) == ["r4", "r3b", "r3a", "r2", "r1"]
    assert ids(await event_log.list_runs(agent_id="echo", limit=10)) == ["r3b", "r3a", "r1"]
    live = frozenset({RunState.RUNNING, RunState.SUSPENDED})
    assert ids(await event_log.list_runs(states=live, limit=10)) == ["r3b", "r3a", "r2"]
    assert ids(await event_log.list_runs(agent_id="echo", states=live, limit=10)) == [
        "r3b",
        "r3a",
    ]

    seen: list[str] = []
    cursor: RunPageCursor | None = None
    while page := await event_log.list_runs(limit=2, after=cursor):
        seen.extend(ids(page))
        cursor = RunPageCursor(page[-1].create_time_ms, page[-1].run_id)
    assert seen == ["r4", "r3b", "r3a", "r2", "r1"]
    page = await event_log.list_runs(agent_id="echo", limit=1, after=RunPageCursor(3_000, "r3b"))
    assert ids(page) == ["r3a"]


async def test_list_runs_omits_expired_runs(open_event_log: OpenEventLog) -> None:
    log = await open_event_log(terminal_ttl_s=SHORT_TTL_S)
    await new_run(log, run_id="old", create_time_ms=1_000)
    await log.append("old", 1, [], state=RunState.CANCELLED)
    await new_run(log, run_id="live", create_time_ms=2_000)
    await asyncio.sleep(SHORT_TTL_S * 2.5)

    assert [r.run_id for r in await log.list_runs(limit=10)] == ["live"]
    # A new run under the expired id is listed once, at its own time.
    await new_run(log, run_id="old", create_time_ms=3_000)
    assert [r.run_id for r in await log.list_runs(limit=10)] == ["old", "live"]


# --- checkpoints -------------------------------------------------------------


async def test_checkpoint_is_committed_with_its_events(event_log: EventLog) -> None:
    run = await new_run(event_log)
    assert run.checkpoint == b""
    await event_log.append(run.run_id, 1, make_events(run.run_id, 0, 2), checkpoint=BINARY)
    stored = await event_log.get_run(run.run_id)
    assert (stored.checkpoint, stored.next_index) == (BINARY, 2)

    # Without a checkpoint an append keeps the stored one; a fenced one stores nothing.
    await event_log.append(run.run_id, 1, make_events(run.run_id, 2, 1))
    assert (await event_log.get_run(run.run_id)).checkpoint == BINARY
    with pytest.raises(StaleEpoch):
        await event_log.append(run.run_id, 0, make_events(run.run_id, 3, 1), checkpoint=b"stale")
    assert (await event_log.get_run(run.run_id)).checkpoint == BINARY

    # With the state, with or without events; an empty checkpoint is a checkpoint too.
    await event_log.append(run.run_id, 1, [], state=RunState.SUSPENDED, checkpoint=b"second")
    stored = await event_log.get_run(run.run_id)
    assert (stored.checkpoint, stored.state, stored.next_index) == (
        b"second",
        RunState.SUSPENDED,
        3,
    )
    await event_log.append(run.run_id, 1, [], checkpoint=b"")
    assert (await event_log.get_run(run.run_id)).checkpoint == b""


async def test_list_runs_leaves_the_checkpoint_out(event_log: EventLog) -> None:
    run = await new_run(event_log)
    await event_log.append(run.run_id, 1, [], checkpoint=BINARY)
    (listed,) = await event_log.list_runs(limit=10)
    assert (listed.run_id, listed.checkpoint) == (run.run_id, b"")
    assert listed == dataclasses.replace(await event_log.get_run(run.run_id), checkpoint=b"")


# --- leases and fencing ------------------------------------------------------


@pytest.mark.parametrize("state", [RunState.QUEUED, RunState.RUNNING])
async def test_creator_holds_the_lease_so_nobody_can_claim(
    event_log: EventLog, state: RunState
) -> None:
    run = await new_run(event_log, state=state)
    assert await event_log.claim(run.run_id, "instance-b") is None
    assert await event_log.claimable(10) == []
    assert await event_log.renew(run.run_id, 1)
    assert await event_log.get_run(run.run_id) == run


async def test_claim_after_the_lease_lapses_bumps_the_epoch_and_fences_the_old_owner(
    open_event_log: OpenEventLog, log_clock: LogClock
) -> None:
    log = await open_event_log(lease_ttl_s=SHORT_TTL_S)
    run = await new_run(log)
    await log.append(run.run_id, 1, make_events(run.run_id, 0, 2), checkpoint=b"cp")
    await log_clock.advance(SHORT_TTL_S * 2.5)
    assert await log.claimable(10) == [run.run_id]
    # Creating it again (a retried request) neither takes the run back nor renews the lease.
    assert not (await log.create_run(make_record(run.run_id)))[1]
    assert await log.claimable(10) == [run.run_id]

    claimed = await log.claim(run.run_id, "instance-b")
    assert claimed is not None
    assert (claimed.epoch, claimed.owner, claimed.state) == (2, "instance-b", RunState.RUNNING)
    assert (claimed.next_index, claimed.checkpoint) == (2, b"cp"), "the new owner resumes here"
    assert await log.get_run(run.run_id) == claimed

    with pytest.raises(StaleEpoch) as raised:
        await log.append(run.run_id, 1, make_events(run.run_id, 2, 1), state=RunState.SUCCEEDED)
    assert (raised.value.epoch, raised.value.current_epoch) == (1, 2)
    with pytest.raises(StaleEpoch):
        await log.journal_tool(run.run_id, 1, "call-1", b"old owner")
    assert await log.renew(run.run_id, 1) is False
    await log.release(run.run_id, 1)  # the old owner's release must not free the new lease

    assert await log.claim(run.run_id, "instance-c") is None
    assert await log.claimable(10) == []
    assert await log.append(run.run_id, 2, make_events(run.run_id, 2, 1)) == 3
    assert await log.journaled_tool(run.run_id, "call-1") is None


async def test_two_claimers_one_wins(open_event_log: OpenEventLog, log_clock: LogClock) -> None:
    log = await open_event_log(lease_ttl_s=SHORT_TTL_S)
    run = await new_run(log)
    await log_clock.advance(SHORT_TTL_S * 2.5)

    claims = await asyncio.gather(*(log.claim(run.run_id, f"instance-{i}") for i in range(5)))
    winners = [c for c in claims if c is not None]
    assert len(winners) == 1
    assert winners[0].epoch == 2
    assert await log.get_run(run.run_id) == winners[0]


async def test_release_lets_another_instance_claim_at_once(event_log: EventLog) -> None:
    run = await new_run(event_log)
    await event_log.release(run.run_id, 7)  # not the lease's epoch: a no-op
    assert await event_log.claim(run.run_id, "instance-b") is None

    await event_log.release(run.run_id, 1)
    assert await event_log.claimable(10) == [run.run_id]
    claimed = await event_log.claim(run.run_id, "instance-b")
    assert claimed is not None and (claimed.epoch, claimed.owner) == (2, "instance-b")


async def test_renew_keeps_the_lease(open_event_log: OpenEventLog, log_clock: LogClock) -> None:
    log = await open_event_log(lease_ttl_s=RENEWED_LEASE_TTL_S)
    run = await new_run(log)
    for _ in range(2):  # together longer than the TTL
        await log_clock.advance(RENEWED_LEASE_TTL_S * 0.6)
        assert await log.renew(run.run_id, 1)
    assert await log.claim(run.run_id, "instance-b") is None
    assert await log.claimable(10) == []


async def test_renew_after_a_lapse_retakes_the_lease_unless_someone_claimed(
    open_event_log: OpenEventLog, log_clock: LogClock
) -> None:
    log = await open_event_log(lease_ttl_s=SHORT_TTL_S)
    first, second = await new_run(log), await new_run(log)
    await log_clock.advance(SHORT_TTL_S * 2.5)

    assert await log.renew(first.run_id, 1), "nobody claimed: the epoch is still valid"
    assert await log.claim(first.run_id, "instance-b") is None
    assert await log.claim(second.run_id, "instance-b") is not None
    assert await log.renew(second.run_id, 1) is False


async def test_ended_runs_are_never_claimable_and_leave_the_active_set(
    open_event_log: OpenEventLog, log_clock: LogClock
) -> None:
    log = await open_event_log(lease_ttl_s=SHORT_TTL_S)
    not_runnable = []
    for state in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.SUSPENDED):
        run = await new_run(log)
        await log.append(run.run_id, 1, make_events(run.run_id, 0, 1), state=state)
        not_runnable.append(run.run_id)
    live = await new_run(log, state=RunState.QUEUED)
    await log_clock.advance(SHORT_TTL_S * 2.5)

    assert await log.claimable(10) == [live.run_id]
    for run_id in not_runnable:
        assert await log.claim(run_id, "instance-b") is None
        assert await log.renew(run_id, 1) is False, "its owner must stop executing it"
    assert await log.claimable(10) == [live.run_id]


async def test_suspending_drops_the_lease_and_resuming_makes_the_run_claimable_at_once(
    event_log: EventLog,
) -> None:
    run = await new_run(event_log)
    await event_log.append(run.run_id, 1, make_events(run.run_id, 0, 1), state=RunState.SUSPENDED)
    assert await event_log.claimable(10) == []  # and on Redis, leaves the active set

    # A Resume, through any instance, commits its events at the run's epoch...
    await event_log.append(run.run_id, 1, make_events(run.run_id, 1, 1), state=RunState.QUEUED)
    assert await event_log.claimable(10) == [run.run_id]
    # ... and the instance that executes it next claims it without waiting for a lease.
    claimed = await event_log.claim(run.run_id, "instance-b")
    assert claimed is not None and claimed.epoch == 2


async def test_claimable_returns_at_most_limit_distinct_runs(event_log: EventLog) -> None:
    runs = [await new_run(event_log) for _ in range(5)]
    for run in runs:
        await event_log.release(run.run_id, 1)
    some = await event_log.claimable(3)
    assert len(some) == len(set(some)) == 3
    assert set(some) <= {r.run_id for r in runs}
    assert sorted(await event_log.claimable(10)) == sorted(r.run_id for r in runs)
    with pytest.raises(ValueError):
        await event_log.claimable(0)


async def test_claimable_filters_by_agent_so_other_agents_never_crowd_the_page(
    event_log: EventLog,
) -> None:
    theirs = [await new_run(event_log, agent_id="theirs") for _ in range(3)]
    ours = await new_run(event_log, agent_id="ours")
    for run in [*theirs, ours]:
        await event_log.release(run.run_id, 1)
    assert await event_log.claimable(1, agent_ids=frozenset({"ours"})) == [ours.run_id]
    mine = await event_log.claimable(10, agent_ids=frozenset({"theirs", "absent"}))
    assert sorted(mine) == sorted(r.run_id for r in theirs)


# --- the tool journal --------------------------------------------------------


async def test_journal_first_write_wins_and_is_fenced(event_log: EventLog) -> None:
    run = await new_run(event_log)
    assert await event_log.journaled_tool(run.run_id, "call-1") is None
    await event_log.journal_tool(run.run_id, 1, "call-1", BINARY)
    await event_log.journal_tool(run.run_id, 1, "call-1", b"a re-run's different result")
    assert await event_log.journaled_tool(run.run_id, "call-1") == BINARY
    assert await event_log.journaled_tool(run.run_id, "call-2") is None

    await event_log.release(run.run_id, 1)
    claimed = await event_log.claim(run.run_id, "instance-b")
    assert claimed is not None
    with pytest.raises(StaleEpoch):
        await event_log.journal_tool(run.run_id, 1, "call-2", b"fenced")
    assert await event_log.journaled_tool(run.run_id, "call-2") is None
    await event_log.journal_tool(run.run_id, claimed.epoch, "call-2", b"")
    assert await event_log.journaled_tool(run.run_id, "call-2") == b""


# --- cancellation ------------------------------------------------------------


async def test_cancel_request_is_durable_and_notified(event_log: EventLog) -> None:
    run = await new_run(event_log)
    recorder = CancelRecorder()
    subscription = await event_log.subscribe_control(run.run_id, recorder)

    stored = await event_log.request_cancel(run.run_id, "user asked ✋")
    assert (stored.cancel_reason, stored.state) == ("user asked ✋", RunState.RUNNING)
    await recorder.wait_until(lambda: recorder.reasons == ["user asked ✋"])
    assert (await event_log.get_run(run.run_id)).cancel_reason == "user asked ✋"

    # The first reason wins; asking again notifies again, with it.
    again = await event_log.request_cancel(run.run_id, "second thoughts")
    assert again.cancel_reason == "user asked ✋"
    await recorder.wait_until(lambda: len(recorder.reasons) == 2)
    assert recorder.reasons == ["user asked ✋", "user asked ✋"]

    # An owner that takes the run over later still sees the request.
    await event_log.release(run.run_id, 1)
    claimed = await event_log.claim(run.run_id, "instance-b")
    assert claimed is not None and claimed.cancel_reason == "user asked ✋"
    await subscription.close()
    await subscription.close()

    with pytest.raises(ValueError):
        await event_log.request_cancel(run.run_id, "")


async def test_cancel_request_on_an_ended_run_is_a_no_op(event_log: EventLog) -> None:
    ended, live = await new_run(event_log), await new_run(event_log)
    await event_log.append(ended.run_id, 1, [], state=RunState.SUCCEEDED)
    before = await event_log.get_run(ended.run_id)
    recorder = CancelRecorder()
    await event_log.subscribe_control(ended.run_id, recorder)
    await event_log.subscribe_control(live.run_id, recorder)

    assert await event_log.request_cancel(ended.run_id, "too late") == before
    assert await event_log.get_run(ended.run_id) == before
    # Notifications of one process arrive in order: had the first been sent, it came first.
    await event_log.request_cancel(live.run_id, "in time")
    await recorder.wait_until(lambda: bool(recorder.reasons))
    assert recorder.reasons == ["in time"]


async def test_closed_control_subscription_hears_nothing(event_log: EventLog) -> None:
    first, second = await new_run(event_log), await new_run(event_log)
    closed, open_ = CancelRecorder(), CancelRecorder()
    subscription = await event_log.subscribe_control(first.run_id, closed)
    await event_log.subscribe_control(first.run_id, open_)
    await event_log.subscribe_control(second.run_id, closed)
    await subscription.close()

    await event_log.request_cancel(first.run_id, "stop")
    await event_log.request_cancel(second.run_id, "stop too")
    await open_.wait_until(lambda: open_.reasons == ["stop"])
    await closed.wait_until(lambda: bool(closed.reasons))
    assert closed.reasons == ["stop too"]


# --- counters and health -----------------------------------------------------


async def test_counters_count_per_run_and_key(event_log: EventLog) -> None:
    a, b = await new_run(event_log), await new_run(event_log)
    assert await event_log.get_counter(a.run_id, "k") == 0
    assert [await event_log.incr_counter(a.run_id, "k") for _ in range(3)] == [1, 2, 3]
    assert await event_log.incr_counter(a.run_id, "other") == 1
    assert await event_log.incr_counter(b.run_id, "k") == 1
    assert await event_log.get_counter(a.run_id, "k") == 3
    assert await event_log.get_counter("nope", "k") == 0


async def test_counter_once_key_increments_once(event_log: EventLog) -> None:
    run = await new_run(event_log)
    assert await event_log.incr_counter(run.run_id, "k", once_key="call-1") == 1
    assert await event_log.incr_counter(run.run_id, "k", once_key="call-1") == 1
    assert await event_log.incr_counter(run.run_id, "k", once_key="call-2") == 2
    assert await event_log.incr_counter(run.run_id, "k") == 3
    assert await event_log.incr_counter(run.run_id, "k", once_key="call-1") == 3
    assert await event_log.incr_counter(run.run_id, "fresh", once_key="call-1") == 0
    assert await event_log.get_counter(run.run_id, "k") == 3


async def test_ping_succeeds_and_close_is_safe_twice(open_event_log: OpenEventLog) -> None:
    log = await open_event_log()
    await log.ping()
    await log.close()
    await log.close()


def test_published_batch_encoding_matches_protobuf() -> None:
    # Sizes on both sides of one- and two-byte lengths and of the precomputed prefixes.
    events = [
        AgentEvent(run_id="r", index=i, text_delta=TextDelta(delta="x" * size))
        for i, size in enumerate([0, 100, 300, 4_100, 20_000])
    ]
    members = serialize_events(events)
    assert encode_batch(members) == EventBatch(events=events).SerializeToString()
    assert list(EventBatch.FromString(encode_batch(members)).events) == events


# --- Redis only --------------------------------------------------------------


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client to inspect what RedisEventLog stored."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=False)
    yield client
    await client.aclose()


async def test_redis_live_run_keys_have_no_ttl_and_terminal_state_sets_it_on_every_key(
    redis_url: str, key_prefix: str, raw_redis: aioredis.Redis
) -> None:
    keys = Keys(key_prefix)
    log = await RedisEventLog.connect(
        redis_url, key_prefix=key_prefix, terminal_ttl_s=60, lease_ttl_s=30
    )
    try:
        run = await new_run(log)
        # The run's task keys exist once it has background tasks (tests of the task store).
        no_tasks = {keys.run_tasks(run.run_id), keys.task_log(run.run_id)}
        run_keys = [key for key in keys.run_keys(run.run_id) if key not in no_tasks]
        lease = keys.lease(run.run_id)
        await log.append(run.run_id, 1, make_events(run.run_id, 0, 2), checkpoint=b"cp")
        await log.incr_counter(run.run_id, "k", once_key="call-1")
        await log.journal_tool(run.run_id, 1, "call-1", b"result")
        for key in run_keys:
            if key != keys.resumes(run.run_id):  # written by the first Resume, below
                assert await raw_redis.ttl(key) == -1, key
        assert 0 < await raw_redis.pttl(lease) <= 30_000  # only the lease expires by itself
        await log.append(run.run_id, 1, [], state=RunState.SUSPENDED)
        await log.decide(  # a partial Resume: the run stays suspended, at epoch 2
            run.run_id, expected_epoch=1, decisions=b"{}", owner="x", resume=False,
            request_id="req", request_record=b"r",
        )  # fmt: skip
        for key in run_keys:
            assert await raw_redis.ttl(key) == -1, key
        assert await raw_redis.exists(lease) == 0  # nobody executes a suspended run

        await log.append(run.run_id, 2, make_events(run.run_id, 2, 1), state=RunState.SUCCEEDED)
        for key in run_keys:
            assert 0 < await raw_redis.ttl(key) <= 60, key
        assert await raw_redis.exists(lease) == 0
        # Hashes written after the end keep the run's deadline.
        await raw_redis.delete(keys.counters(run.run_id), keys.once(run.run_id))
        await raw_redis.delete(keys.tools(run.run_id))
        await log.incr_counter(run.run_id, "late", once_key="call-2")
        await log.journal_tool(run.run_id, 2, "call-2", b"late")
        for key in (keys.counters(run.run_id), keys.once(run.run_id), keys.tools(run.run_id)):
            assert 0 < await raw_redis.ttl(key) <= 60, key
    finally:
        await log.close()


async def test_redis_every_key_and_channel_of_a_run_shares_its_hash_slot(
    redis_url: str, key_prefix: str, raw_redis: aioredis.Redis
) -> None:
    """Lua scripts may only touch one slot on Redis Cluster: each name carries the {run_id} tag."""
    keys = Keys(key_prefix)
    log = await RedisEventLog.connect(redis_url, key_prefix=key_prefix)
    try:
        run = await new_run(log)
        await log.append(run.run_id, 1, make_events(run.run_id, 0, 1), checkpoint=b"cp")
        await log.incr_counter(run.run_id, "k", once_key="call-1")
        await log.journal_tool(run.run_id, 1, "call-1", b"result")
        await log.append(run.run_id, 1, [], state=RunState.SUSPENDED)
        await log.decide(
            run.run_id, expected_epoch=1, decisions=b"{}", owner="x", resume=True,
            request_id="req", request_record=b"r",
        )  # fmt: skip
        stored = {key.decode() for key in await raw_redis.keys(f"{key_prefix}:{{{run.run_id}}}:*")}
        task_id = f"{run.run_id}.{'0' * 16}"
        names = {
            *keys.run_keys(run.run_id),
            keys.lease(run.run_id),
            keys.live(run.run_id),
            keys.control(run.run_id),
            keys.task(task_id),
            keys.task_lease(task_id),
            keys.task_events(run.run_id),
        }
        # Its task keys exist once it has background tasks (tests of the task store).
        no_tasks = {keys.run_tasks(run.run_id), keys.task_log(run.run_id)}
        assert stored == {*keys.run_keys(run.run_id), keys.lease(run.run_id)} - no_tasks
        for name in names:
            tag = name[name.index("{") + 1 : name.index("}")]  # what Redis Cluster hashes
            assert tag == run.run_id, name
    finally:
        await log.close()


async def test_redis_claimable_removes_ended_suspended_and_gone_runs_from_the_active_set(
    redis_url: str, key_prefix: str, raw_redis: aioredis.Redis
) -> None:
    keys = Keys(key_prefix)
    log = await RedisEventLog.connect(redis_url, key_prefix=key_prefix, lease_ttl_s=SHORT_TTL_S)

    async def active() -> set[str]:
        return {m.decode() for m in await raw_redis.smembers(keys.active_runs)}

    try:
        ended, suspended, leased, lapsed = [await new_run(log) for _ in range(4)]
        assert await active() == {ended.run_id, suspended.run_id, leased.run_id, lapsed.run_id}
        await log.append(ended.run_id, 1, [], state=RunState.FAILED)
        assert ended.run_id not in await active(), "a terminal append removes it at once"
        await log.append(suspended.run_id, 1, [], state=RunState.SUSPENDED)
        await raw_redis.sadd(keys.active_runs, ended.run_id, "gone")  # as if a removal was lost

        await log.release(lapsed.run_id, 1)
        assert await log.claimable(10) == [lapsed.run_id]
        assert await active() == {leased.run_id, lapsed.run_id}

        # A Resume lists it again; so does creating a run again (healing a lost addition).
        await log.append(suspended.run_id, 1, [], state=RunState.RUNNING)
        await raw_redis.srem(keys.active_runs, leased.run_id)
        await log.create_run(make_record(leased.run_id))
        assert await active() == {leased.run_id, lapsed.run_id, suspended.run_id}
    finally:
        await log.close()


async def test_redis_control_messages_share_the_one_pubsub_connection(
    redis_url: str, key_prefix: str, raw_redis: aioredis.Redis
) -> None:
    log = await RedisEventLog.connect(redis_url, key_prefix=key_prefix)
    name = Keys(key_prefix).pubsub_client_name
    try:
        run = await new_run(log)
        events, cancels = Recorder(), CancelRecorder()
        await log.subscribe(run.run_id, events)
        await log.subscribe_control(run.run_id, cancels)
        await log.subscribe_control(run.run_id, CancelRecorder())
        clients = [c for c in await raw_redis.client_list() if c["name"] == name]
        assert [c["sub"] for c in clients] == ["2"], "one connection: live and control channels"

        await raw_redis.execute_command(  # type: ignore[no-untyped-call]
            "CLIENT", "KILL", "TYPE", "pubsub"
        )
        await events.wait_until(lambda: events.gaps == 1)  # resubscribed: both channels
        await log.request_cancel(run.run_id, "after the reconnect")
        await cancels.wait_until(lambda: cancels.reasons == ["after the reconnect"])
        await log.append(run.run_id, 1, make_events(run.run_id, 0, 1))
        await events.wait_until(lambda: len(events.events) == 1)
    finally:
        await log.close()


async def test_redis_list_runs_removes_index_members_of_expired_runs(
    redis_url: str, key_prefix: str, raw_redis: aioredis.Redis
) -> None:
    keys = Keys(key_prefix)
    log = await RedisEventLog.connect(redis_url, key_prefix=key_prefix, terminal_ttl_s=SHORT_TTL_S)
    try:
        await new_run(log, run_id="gone", create_time_ms=1_000)
        await log.append("gone", 1, [], state=RunState.FAILED)
        await asyncio.sleep(SHORT_TTL_S * 2.5)
        assert await log.list_runs(limit=10) == []
        assert await raw_redis.zrange(keys.run_index, 0, -1) == []
        assert run_index_member(1_000, "gone") == "000000000001000:gone"
    finally:
        await log.close()


async def test_redis_pubsub_connection_killed_gives_on_gap_then_delivers_again(
    redis_url: str, key_prefix: str, raw_redis: aioredis.Redis
) -> None:
    log = await RedisEventLog.connect(redis_url, key_prefix=key_prefix)
    try:
        run = await new_run(log)
        recorder = Recorder()
        subscription = await log.subscribe(run.run_id, recorder)
        await log.append(run.run_id, 1, make_events(run.run_id, 0, 3))
        await recorder.wait_until(lambda: len(recorder.events) == 3)

        killed = await raw_redis.execute_command(  # type: ignore[no-untyped-call]
            "CLIENT", "KILL", "TYPE", "pubsub"
        )
        assert killed >= 1
        await recorder.wait_until(lambda: recorder.gaps == 1)
        await log.append(run.run_id, 1, make_events(run.run_id, 3, 2))
        await recorder.wait_until(lambda: len(recorder.events) == 5)
        assert indices(recorder.events) == [0, 1, 2, 3, 4]
        assert recorder.gaps == 1
        await subscription.close()
    finally:
        await log.close()


async def test_redis_subscribe_while_the_pubsub_connection_is_down_waits_for_resubscription(
    redis_url: str, key_prefix: str, raw_redis: aioredis.Redis
) -> None:
    log = await RedisEventLog.connect(redis_url, key_prefix=key_prefix)
    try:
        first, second = await new_run(log), await new_run(log)
        early = Recorder()
        await log.subscribe(first.run_id, early)
        await raw_redis.execute_command(  # type: ignore[no-untyped-call]
            "CLIENT", "KILL", "TYPE", "pubsub"
        )
        late = Recorder()
        await log.subscribe(second.run_id, late)  # before or after the reader notices the kill
        await log.append(second.run_id, 1, make_events(second.run_id, 0, 2))
        await late.wait_until(lambda: len(late.events) == 2)
        await early.wait_until(lambda: early.gaps == 1)
        assert late.gaps == 0, "a listener that was never live has nothing to re-read"
    finally:
        await log.close()


async def test_redis_quiet_pubsub_connection_survives_health_checks(
    redis_url: str, key_prefix: str
) -> None:
    log = await RedisEventLog.connect(
        redis_url, key_prefix=key_prefix, health_check_interval_s=0.05
    )
    try:
        run = await new_run(log)
        recorder = Recorder()
        await log.subscribe(run.run_id, recorder)
        await asyncio.sleep(0.5)  # many PINGs, each answered
        await log.append(run.run_id, 1, make_events(run.run_id, 0, 1))
        await recorder.wait_until(lambda: len(recorder.events) == 1)
        assert recorder.gaps == 0
    finally:
        await log.close()


async def test_redis_uses_one_pubsub_connection_however_many_listeners(
    redis_url: str, key_prefix: str, raw_redis: aioredis.Redis
) -> None:
    log = await RedisEventLog.connect(redis_url, key_prefix=key_prefix)
    name = Keys(key_prefix).pubsub_client_name

    async def ours(client_type: str | None = None) -> list[dict[str, str]]:
        clients = await raw_redis.client_list(_type=client_type)
        return [c for c in clients if c["name"] == name]

    try:
        runs = [await new_run(log) for _ in range(3)]
        recorders = [Recorder() for _ in range(12)]
        subscriptions = [
            await log.subscribe(runs[i % 3].run_id, recorder)
            for i, recorder in enumerate(recorders)
        ]
        (connection,) = await ours("pubsub")
        assert connection["sub"] == "3"  # one Redis subscription per run, not per listener

        await log.append(runs[0].run_id, 1, make_events(runs[0].run_id, 0, 1))
        for recorder in recorders[::3]:
            await recorder.wait_until(lambda r=recorder: len(r.events) == 1)  # type: ignore[misc]

        for subscription in subscriptions:
            await subscription.close()
        (connection,) = await ours()  # kept for the next subscribe, out of pub/sub mode
        assert connection["sub"] == "0"  # the last listener of each run unsubscribed
    finally:
        await log.close()
    assert await ours() == []


async def test_redis_append_is_one_script_call_per_batch(
    redis_url: str, key_prefix: str, raw_redis: aioredis.Redis
) -> None:
    log = await RedisEventLog.connect(redis_url, key_prefix=key_prefix)

    async def calls() -> dict[str, int]:
        stats = await raw_redis.info("commandstats")
        return {name: stat["calls"] for name, stat in stats.items()}

    try:
        run = await new_run(log)
        await log.append(run.run_id, 1, make_events(run.run_id, 0, 1))  # loads the script
        before = await calls()
        await log.append(run.run_id, 1, make_events(run.run_id, 1, 500), state=RunState.SUCCEEDED)
        after = await calls()
        assert after["cmdstat_evalsha"] - before["cmdstat_evalsha"] == 1
        assert after.get("cmdstat_eval", 0) == before.get("cmdstat_eval", 0)
        assert indices(await log.read(run.run_id, 0, 1_000)) == list(range(501))
    finally:
        await log.close()


async def test_redis_outage_raises_store_unavailable_and_close_still_returns(
    disposable_redis: DisposableRedis,
) -> None:
    log = await RedisEventLog.connect(disposable_redis.url, socket_timeout_s=1)
    run = await new_run(log)
    await log.subscribe(run.run_id, Recorder())
    disposable_redis.stop()

    with pytest.raises(StoreUnavailable):
        await log.ping()
    with pytest.raises(StoreUnavailable):
        await log.append(run.run_id, 1, make_events(run.run_id, 0, 1))
    with pytest.raises(StoreUnavailable):
        await log.read(run.run_id, 0, 10)
    with pytest.raises(StoreUnavailable):
        await log.subscribe("other", Recorder())  # no acknowledgement can come
    await asyncio.wait_for(log.close(), 2)  # the reader is reconnecting in a loop


async def test_redis_unreachable_raises_store_unavailable() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await RedisEventLog.connect(f"redis://127.0.0.1:{port}/0", socket_timeout_s=1)
    assert time.monotonic() - started < 5


async def test_head_is_the_next_index_and_unknown_runs_are_not_found(event_log: EventLog) -> None:
    record = await new_run(event_log)
    assert await event_log.head(record.run_id) == 0
    await event_log.append(record.run_id, record.epoch, make_events(record.run_id, 0, 3))
    assert await event_log.head(record.run_id) == 3
    with pytest.raises(RunNotFound):
        await event_log.head("no-such-run")


async def _suspended_run(log: EventLog) -> RunRecord:
    record = await new_run(log)
    await log.append(
        record.run_id, record.epoch, make_events(record.run_id, 0, 2), state=RunState.SUSPENDED
    )
    return await log.get_run(record.run_id)


async def test_decide_is_a_compare_and_set_on_the_epoch(event_log: EventLog) -> None:
    suspended = await _suspended_run(event_log)
    run_id = suspended.run_id
    partial = await event_log.decide(
        run_id, expected_epoch=suspended.epoch, decisions=b'{"a":1}', owner="x", resume=False
    )
    assert partial.state is RunState.SUSPENDED and partial.decisions == b'{"a":1}'
    assert partial.epoch == suspended.epoch + 1
    with pytest.raises(ConcurrentModification):  # a racer that read the old epoch loses
        await event_log.decide(
            run_id, expected_epoch=suspended.epoch, decisions=b"{}", owner="y", resume=True
        )
    assert (await event_log.get_run(run_id)).decisions == b'{"a":1}'


async def test_decide_with_resume_makes_the_run_queued_and_owned(event_log: EventLog) -> None:
    suspended = await _suspended_run(event_log)
    run_id = suspended.run_id
    assert await event_log.claimable(10) == []
    resumed = await event_log.decide(
        run_id,
        expected_epoch=suspended.epoch,
        decisions=b'{"a":1,"b":2}',
        owner="resumer",
        resume=True,
        request_id="req-9",
        request_record=b"\x00remembered",
    )
    assert (resumed.state, resumed.owner) == (RunState.QUEUED, "resumer")
    assert await event_log.claim(run_id, "thief") is None  # the resumer holds the lease
    assert await event_log.resume_request(run_id, "req-9") == b"\x00remembered"
    assert await event_log.resume_request(run_id, "other") is None
    with pytest.raises(ConcurrentModification):  # not suspended any more
        await event_log.decide(
            run_id, expected_epoch=resumed.epoch, decisions=b"{}", owner="y", resume=True
        )
    await event_log.append(run_id, resumed.epoch, make_events(run_id, 2, 1))  # it may write


async def test_a_suspended_run_is_claimable_only_once_a_cancel_was_requested(
    event_log: EventLog,
) -> None:
    suspended = await _suspended_run(event_log)
    assert await event_log.claim(suspended.run_id, "canceller") is None
    assert suspended.run_id not in await event_log.claimable(100)
    cancelled = await event_log.request_cancel(suspended.run_id, "no longer wanted")
    assert cancelled.state is RunState.QUEUED  # nobody executes it: some instance must abort it
    assert suspended.run_id in await event_log.claimable(100)
    taken = await event_log.claim(suspended.run_id, "canceller")
    assert taken is not None and taken.epoch == suspended.epoch + 1
    assert taken.cancel_reason == "no longer wanted"
    with pytest.raises(RunNotFound):
        await event_log.decide("nope", expected_epoch=1, decisions=b"", owner="x", resume=False)


async def test_concurrent_appends_of_many_runs_each_get_their_own_reply(
    event_log: EventLog,
) -> None:
    """On Redis they share one pipeline (server/events/batcher.py): replies must not mix."""
    runs = [await new_run(event_log) for _ in range(6)]
    stale = runs[0]
    outcomes = await asyncio.gather(
        *(
            event_log.append(
                run.run_id, 9 if run is stale else 1, make_events(run.run_id, 0, 3 + n)
            )
            for n, run in enumerate(runs)
        ),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], StaleEpoch)
    assert outcomes[1:] == [3 + n for n in range(1, 6)]
    for n, run in enumerate(runs[1:], start=1):
        assert indices(await event_log.read(run.run_id, 0, 100)) == list(range(3 + n))
    assert await event_log.read(stale.run_id, 0, 100) == []
