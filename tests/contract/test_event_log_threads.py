"""The EventLog's thread contract: every test runs against MemoryEventLog and RedisEventLog.

Threads live in the log because a run on a thread changes its thread
atomically with its own record: its start decides against the thread's
state, and its terminal append adds its messages and hands the thread on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Sequence

import pytest
from keel.v1.agent_service_pb2 import AgentEvent, RunAbort, TextDelta

from server.errors import RunNotFound, RunNotResumable, ThreadBusy, ThreadNotFound
from server.events.log import (
    BusyPolicy,
    EventLog,
    RunRecord,
    RunState,
    ThreadPageCursor,
    ThreadRecord,
)
from tests.contract.test_event_log import CancelRecorder, LogClock, OpenEventLog, Recorder


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def thread_record(
    thread_id: str | None = None, *, resource_id: str = "user-1", create_time_ms: int | None = None
) -> ThreadRecord:
    created = _now_ms() if create_time_ms is None else create_time_ms
    return ThreadRecord(
        thread_id=thread_id or f"th-{uuid.uuid4().hex[:8]}",
        resource_id=resource_id,
        metadata={"title": "hello", "lang": "en"},
        request_id="",
        create_time_ms=created,
        update_time_ms=created,
    )


def run_on(thread_id: str, *, live_only: bool = False, terminal_ttl_ms: int = 0) -> RunRecord:
    now = _now_ms()
    return RunRecord(
        run_id=f"{thread_id}:{uuid.uuid4().hex}",
        agent_id="echo",
        input="hi",
        request_id="",
        state=RunState.QUEUED,
        create_time_ms=now,
        update_time_ms=now,
        owner="instance-a",
        thread_id=thread_id,
        live_only=live_only,
        terminal_ttl_ms=terminal_ttl_ms,
    )


def events(run_id: str, start: int, count: int) -> list[AgentEvent]:
    return [
        AgentEvent(run_id=run_id, index=i, text_delta=TextDelta(delta=f"t{i}"))
        for i in range(start, start + count)
    ]


def abort(run_id: str, index: int) -> list[AgentEvent]:
    return [AgentEvent(run_id=run_id, index=index, abort=RunAbort(reason="stop"))]


async def new_thread(log: EventLog, **kwargs: object) -> ThreadRecord:
    record, created = await log.create_thread(thread_record(**kwargs))  # type: ignore[arg-type]
    assert created
    return record


async def finish(
    log: EventLog, run: RunRecord, messages: Sequence[bytes], state: RunState = RunState.SUCCEEDED
) -> None:
    """Take the run from its start to `state` in one append carrying `messages`."""
    current = await log.get_run(run.run_id)
    await log.append(
        run.run_id,
        current.epoch,
        events(run.run_id, current.next_index, 1),
        state=state,
        thread_messages=messages,
    )


async def test_a_thread_is_created_once_and_read_back_whole(event_log: EventLog) -> None:
    record = thread_record()
    stored, created = await event_log.create_thread(record)
    assert created and stored == record
    again, created_again = await event_log.create_thread(
        dataclasses.replace(record, resource_id="someone-else")
    )
    assert not created_again and again.resource_id == "user-1"
    read = await event_log.get_thread(record.thread_id)
    assert (read.metadata, read.active_run_id, read.queued_run_ids, read.message_count) == (
        {"title": "hello", "lang": "en"},
        "",
        (),
        0,
    )
    with pytest.raises(ThreadNotFound):
        await event_log.get_thread("no-such-thread")


async def test_list_threads_is_newest_first_paged_and_filtered_by_resource(
    event_log: EventLog,
) -> None:
    owner = f"user-{uuid.uuid4().hex[:6]}"
    mine = [
        await new_thread(event_log, resource_id=owner, create_time_ms=1_000 + n) for n in range(5)
    ]
    await new_thread(event_log, resource_id="another-user", create_time_ms=1_002)
    first = await event_log.list_threads(resource_id=owner, limit=3)
    assert [t.thread_id for t in first] == [t.thread_id for t in mine[::-1][:3]]
    cursor = ThreadPageCursor(first[-1].create_time_ms, first[-1].thread_id)
    rest = await event_log.list_threads(resource_id=owner, limit=3, after=cursor)
    assert [t.thread_id for t in rest] == [mine[1].thread_id, mine[0].thread_id]
    everyone = await event_log.list_threads(limit=1000)
    assert {t.thread_id for t in mine} <= {t.thread_id for t in everyone}
    busy = mine[0]
    active, waiting = run_on(busy.thread_id), run_on(busy.thread_id)
    await event_log.start_thread_run(active, BusyPolicy.REJECT)
    await event_log.start_thread_run(waiting, BusyPolicy.ENQUEUE)
    await finish(event_log, active, [b"a", b"b"])
    [listed] = [
        t
        for t in await event_log.list_threads(limit=1000)
        if t == busy or t.thread_id == busy.thread_id
    ]
    assert (listed.active_run_id, listed.queued_run_ids, listed.message_count) == (
        waiting.run_id,
        (),
        2,
    )


async def test_the_first_run_on_an_idle_thread_becomes_its_active_run(
    event_log: EventLog,
) -> None:
    thread = await new_thread(event_log)
    run = run_on(thread.thread_id)
    started = await event_log.start_thread_run(run, BusyPolicy.REJECT)
    assert started.created and started.run.state is RunState.QUEUED
    assert (await event_log.get_thread(thread.thread_id)).active_run_id == run.run_id
    assert await event_log.claim(run.run_id, "thief") is None  # its creator holds the lease
    again = await event_log.start_thread_run(run, BusyPolicy.REJECT)  # a retried request
    assert not again.created and again.run.run_id == run.run_id
    with pytest.raises(ThreadNotFound):
        await event_log.start_thread_run(run_on("no-such-thread"), BusyPolicy.ENQUEUE)


async def test_reject_refuses_a_second_run_and_stores_nothing(event_log: EventLog) -> None:
    thread = await new_thread(event_log)
    active = run_on(thread.thread_id)
    await event_log.start_thread_run(active, BusyPolicy.REJECT)
    refused = run_on(thread.thread_id)
    with pytest.raises(ThreadBusy) as caught:
        await event_log.start_thread_run(refused, BusyPolicy.REJECT)
    assert caught.value.active_run_id == active.run_id
    assert refused.run_id not in await event_log.claimable(1000)
    with pytest.raises(RunNotFound):
        await event_log.get_run(refused.run_id)


async def test_two_runs_racing_for_an_idle_thread_start_exactly_one(event_log: EventLog) -> None:
    thread = await new_thread(event_log)
    outcomes = await asyncio.gather(
        *(
            event_log.start_thread_run(run_on(thread.thread_id), BusyPolicy.REJECT)
            for _ in range(8)
        ),
        return_exceptions=True,
    )
    started = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, ThreadBusy)]
    assert len(started) == 1 and len(refused) == 7
    assert all(r.active_run_id == started[0].run.run_id for r in refused)


async def test_enqueued_runs_wait_ownerless_and_start_in_order_as_each_one_ends(
    event_log: EventLog,
) -> None:
    thread = await new_thread(event_log)
    active = run_on(thread.thread_id)
    await event_log.start_thread_run(active, BusyPolicy.REJECT)
    waiting = [run_on(thread.thread_id) for _ in range(3)]
    for run in waiting:
        started = await event_log.start_thread_run(run, BusyPolicy.ENQUEUE)
        assert started.created and started.run.state is RunState.ENQUEUED
        assert started.run.owner == ""
    state = await event_log.get_thread(thread.thread_id)
    assert state.queued_run_ids == tuple(r.run_id for r in waiting)
    assert not set(await event_log.claimable(1000)) & {r.run_id for r in waiting}
    for run in waiting:
        assert await event_log.claim(run.run_id, "eager") is None  # not runnable yet

    previous = active
    for n, run in enumerate(waiting):
        await finish(event_log, previous, [f"m{n}".encode()])
        promoted = await event_log.get_run(run.run_id)
        assert promoted.state is RunState.QUEUED  # runnable, and nobody owns it yet
        assert run.run_id in await event_log.claimable(1000)
        claimed = await event_log.claim(run.run_id, "next-owner")
        assert claimed is not None
        await event_log.append(run.run_id, claimed.epoch, events(run.run_id, 0, 1))
        thread_now = await event_log.get_thread(thread.thread_id)
        assert thread_now.active_run_id == run.run_id
        assert thread_now.queued_run_ids == tuple(r.run_id for r in waiting[n + 1 :])
        previous = await event_log.get_run(run.run_id)
    await finish(event_log, previous, [b"last"])
    idle = await event_log.get_thread(thread.thread_id)
    assert (idle.active_run_id, idle.queued_run_ids) == ("", ())
    assert await event_log.thread_messages(thread.thread_id, 0, 100) == [
        b"m0",
        b"m1",
        b"m2",
        b"last",
    ]


async def test_a_terminal_append_adds_the_runs_messages_atomically(event_log: EventLog) -> None:
    thread = await new_thread(event_log)
    run = run_on(thread.thread_id)
    await event_log.start_thread_run(run, BusyPolicy.REJECT)
    # Appends before the end, even with messages, leave the thread alone.
    await event_log.append(run.run_id, 1, events(run.run_id, 0, 2), thread_messages=[b"early"])
    assert (await event_log.get_thread(thread.thread_id)).message_count == 0
    await event_log.append(
        run.run_id, 1, events(run.run_id, 2, 1), state=RunState.SUSPENDED, thread_messages=[b"x"]
    )
    assert (await event_log.get_thread(thread.thread_id)).message_count == 0
    suspended = await event_log.get_thread(thread.thread_id)
    assert suspended.active_run_id == run.run_id  # a suspended run keeps its thread
    entries = [f"entry-{n}".encode() for n in range(2500)]  # more than one RPUSH chunk
    resumed = await event_log.decide(
        run.run_id, expected_epoch=1, decisions=b"{}", owner="instance-a", resume=True
    )
    await event_log.append(
        run.run_id,
        resumed.epoch,
        events(run.run_id, 3, 1),
        state=RunState.FAILED,
        thread_messages=entries,
    )
    thread_now = await event_log.get_thread(thread.thread_id)
    assert (thread_now.active_run_id, thread_now.message_count) == ("", 2500)
    assert await event_log.thread_messages(thread.thread_id, 2498, 2600) == entries[2498:]
    assert await event_log.thread_messages(thread.thread_id, 5000, 5001) == []


async def test_interrupt_asks_the_active_run_to_stop_and_names_the_new_run(
    event_log: EventLog,
) -> None:
    thread = await new_thread(event_log)
    active = run_on(thread.thread_id)
    await event_log.start_thread_run(active, BusyPolicy.REJECT)
    cancels = CancelRecorder()
    control = await event_log.subscribe_control(active.run_id, cancels)
    newer = run_on(thread.thread_id)
    started = await event_log.start_thread_run(newer, BusyPolicy.INTERRUPT)
    assert started.interrupted_run_id == active.run_id
    asked = await event_log.get_run(active.run_id)
    assert asked.cancel_reason == f"interrupted by run {newer.run_id}"
    assert (asked.interrupted_by, asked.rollback) == (newer.run_id, False)
    await cancels.wait_until(lambda: bool(cancels.reasons))
    assert cancels.reasons == [asked.cancel_reason]
    await control.close()
    await finish(event_log, active, [b"kept"], RunState.CANCELLED)
    assert await event_log.thread_messages(thread.thread_id, 0, 10) == [b"kept"]
    assert (await event_log.get_run(newer.run_id)).state is RunState.QUEUED


async def test_rollback_drops_the_active_runs_messages_whatever_it_ends_with(
    event_log: EventLog,
) -> None:
    thread = await new_thread(event_log)
    first = run_on(thread.thread_id)
    await event_log.start_thread_run(first, BusyPolicy.REJECT)
    await finish(event_log, first, [b"turn-1"])
    active = run_on(thread.thread_id)
    await event_log.start_thread_run(active, BusyPolicy.REJECT)
    newer = run_on(thread.thread_id)
    await event_log.start_thread_run(newer, BusyPolicy.ROLLBACK)
    asked = await event_log.get_run(active.run_id)
    assert asked.rollback and asked.interrupted_by == newer.run_id
    # The rollback was decided first: even a finish that beat the abort adds nothing.
    await finish(event_log, active, [b"dropped"])
    assert await event_log.thread_messages(thread.thread_id, 0, 10) == [b"turn-1"]
    assert (await event_log.get_thread(thread.thread_id)).active_run_id == newer.run_id


async def test_interrupting_a_suspended_run_makes_it_claimable_to_write_its_abort(
    event_log: EventLog,
) -> None:
    thread = await new_thread(event_log)
    active = run_on(thread.thread_id)
    await event_log.start_thread_run(active, BusyPolicy.REJECT)
    await event_log.append(active.run_id, 1, events(active.run_id, 0, 1), state=RunState.SUSPENDED)
    assert active.run_id not in await event_log.claimable(1000)
    await event_log.start_thread_run(run_on(thread.thread_id), BusyPolicy.INTERRUPT)
    assert (await event_log.get_run(active.run_id)).state is RunState.QUEUED
    assert active.run_id in await event_log.claimable(1000)
    assert await event_log.claim(active.run_id, "canceller") is not None


async def test_a_cancelled_queued_run_leaves_the_queue_and_is_never_promoted(
    event_log: EventLog,
) -> None:
    thread = await new_thread(event_log)
    active = run_on(thread.thread_id)
    await event_log.start_thread_run(active, BusyPolicy.REJECT)
    doomed, kept = run_on(thread.thread_id), run_on(thread.thread_id)
    await event_log.start_thread_run(doomed, BusyPolicy.ENQUEUE)
    await event_log.start_thread_run(kept, BusyPolicy.ENQUEUE)
    cancelled = await event_log.request_cancel(doomed.run_id, "never mind")
    assert cancelled.state is RunState.QUEUED  # runnable: some instance writes its abort
    claimed = await event_log.claim(doomed.run_id, "canceller")
    assert claimed is not None
    await event_log.append(
        doomed.run_id, claimed.epoch, abort(doomed.run_id, 0), state=RunState.CANCELLED
    )
    assert (await event_log.get_thread(thread.thread_id)).queued_run_ids == (kept.run_id,)
    await finish(event_log, active, [])
    assert (await event_log.get_thread(thread.thread_id)).active_run_id == kept.run_id


async def test_a_promotion_skips_a_queued_run_whose_cancel_came_first(
    event_log: EventLog,
) -> None:
    thread = await new_thread(event_log)
    active = run_on(thread.thread_id)
    await event_log.start_thread_run(active, BusyPolicy.REJECT)
    doomed, kept = run_on(thread.thread_id), run_on(thread.thread_id)
    await event_log.start_thread_run(doomed, BusyPolicy.ENQUEUE)
    await event_log.start_thread_run(kept, BusyPolicy.ENQUEUE)
    await event_log.request_cancel(doomed.run_id, "never mind")
    await finish(event_log, active, [])  # before the doomed run's abort is written
    thread_now = await event_log.get_thread(thread.thread_id)
    assert (thread_now.active_run_id, thread_now.queued_run_ids) == (kept.run_id, ())


async def test_delete_thread_refuses_a_busy_thread(event_log: EventLog) -> None:
    thread = await new_thread(event_log)
    active = run_on(thread.thread_id)
    await event_log.start_thread_run(active, BusyPolicy.REJECT)
    with pytest.raises(ThreadBusy):
        await event_log.delete_thread(thread.thread_id)
    await finish(event_log, active, [b"m"])
    await event_log.delete_thread(thread.thread_id)
    with pytest.raises(ThreadNotFound):
        await event_log.get_thread(thread.thread_id)
    with pytest.raises(ThreadNotFound):
        await event_log.thread_messages(thread.thread_id, 0, 10)
    with pytest.raises(ThreadNotFound):
        await event_log.delete_thread(thread.thread_id)
    assert thread.thread_id not in {t.thread_id for t in await event_log.list_threads(limit=1000)}
    # The ended run stays, until its own retention time passes.
    assert (await event_log.get_run(active.run_id)).thread_id == thread.thread_id


async def test_list_runs_by_thread_lists_only_that_threads_runs(event_log: EventLog) -> None:
    thread, other = await new_thread(event_log), await new_thread(event_log)
    mine = []
    for _ in range(3):
        run = run_on(thread.thread_id)
        await event_log.start_thread_run(run, BusyPolicy.ENQUEUE)
        mine.append(run.run_id)
    await event_log.start_thread_run(run_on(other.thread_id), BusyPolicy.REJECT)
    listed = await event_log.list_runs(thread_id=thread.thread_id, limit=10)
    assert sorted(r.run_id for r in listed) == sorted(mine)
    assert {r.state for r in listed} == {RunState.QUEUED, RunState.ENQUEUED}
    only_waiting = await event_log.list_runs(
        thread_id=thread.thread_id, states=frozenset({RunState.ENQUEUED}), limit=10
    )
    assert len(only_waiting) == 2


async def test_a_live_only_run_publishes_its_events_and_keeps_none(event_log: EventLog) -> None:
    thread = await new_thread(event_log)
    run = run_on(thread.thread_id, live_only=True)
    await event_log.start_thread_run(run, BusyPolicy.REJECT)
    heard = Recorder()
    subscription = await event_log.subscribe(run.run_id, heard)
    assert await event_log.append(run.run_id, 1, events(run.run_id, 0, 3)) == 3
    await heard.wait_until(lambda: len(heard.events) == 3)
    assert [e.index for e in heard.events] == [0, 1, 2]
    with pytest.raises(RunNotResumable) as caught:
        await event_log.read(run.run_id, 0, 10)
    assert caught.value.next_offset == 3
    assert await event_log.read(run.run_id, 3, 10) == []  # the head: nothing to read yet
    stepped = events(run.run_id, 3, 2)
    stepped[-1].step, stepped[-1].attempt = 4, 2
    await event_log.append(run.run_id, 1, stepped)
    record = await event_log.get_run(run.run_id)
    # In place of the events: what a takeover needs to name the attempt it supersedes.
    assert (record.live_only, record.last_step, record.last_attempt) == (True, 4, 2)
    await subscription.close()


async def test_a_runs_own_retention_overrides_the_logs(
    open_event_log: OpenEventLog, log_clock: LogClock
) -> None:
    log = await open_event_log(terminal_ttl_s=60)
    thread = await new_thread(log)
    brief = run_on(thread.thread_id, terminal_ttl_ms=200)
    await log.start_thread_run(brief, BusyPolicy.REJECT)
    await finish(log, brief, [])
    usual = run_on(thread.thread_id)
    await log.start_thread_run(usual, BusyPolicy.REJECT)
    await finish(log, usual, [])
    await log_clock.advance(0.5)
    with pytest.raises(RunNotFound):
        await log.get_run(brief.run_id)
    assert (await log.get_run(usual.run_id)).state is RunState.SUCCEEDED


async def test_an_idle_thread_expires_and_a_busy_one_does_not(
    open_event_log: OpenEventLog, log_clock: LogClock
) -> None:
    log = await open_event_log(thread_idle_ttl_s=0.3)
    never_used = await new_thread(log)
    busy = await new_thread(log)
    run = run_on(busy.thread_id)
    await log.start_thread_run(run, BusyPolicy.REJECT)
    await log_clock.advance(0.6)
    with pytest.raises(ThreadNotFound):
        await log.get_thread(never_used.thread_id)
    assert (await log.get_thread(busy.thread_id)).active_run_id == run.run_id
    await finish(log, run, [b"m"])
    assert (await log.get_thread(busy.thread_id)).message_count == 1
    await log_clock.advance(0.6)
    with pytest.raises(ThreadNotFound):
        await log.get_thread(busy.thread_id)
    with pytest.raises(ThreadNotFound):
        await log.thread_messages(busy.thread_id, 0, 10)
