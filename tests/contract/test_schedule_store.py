"""The ScheduleStore contract: every test runs against the memory, Redis and PostgreSQL stores
alike."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from server.errors import ScheduleChanged, ScheduleNotFound
from server.events.postgres import PostgresEventLog
from server.events.redis import RedisEventLog
from server.schedules.factory import schedule_store_for
from server.schedules.records import (
    FIRINGS_KEPT,
    Firing,
    Outcome,
    Overlap,
    Pending,
    SchedulePageCursor,
    ScheduleRecord,
    ThreadMode,
)
from server.schedules.store import ScheduleStore
from tests.contract.test_event_log import OpenEventLog


@pytest.fixture
async def store(open_event_log: OpenEventLog) -> ScheduleStore:
    return schedule_store_for(await open_event_log())


def schedule(schedule_id: str = "s1", **fields: object) -> ScheduleRecord:
    values: dict[str, object] = {
        "schedule_id": schedule_id,
        "agent_id": "scripted",
        "cron": "* * * * *",
        "timezone": "UTC",
        "input": "{}",
        "thread_mode": ThreadMode.THREADLESS,
        "overlap": Overlap.SKIP,
        "catch_up_window_ms": 60_000,
        "paused": False,
        "request_id": "",
        "thread_id": "",
        "goal": "",
        "create_time_ms": 1_000,
        "update_time_ms": 1_000,
        "next_tick_ms": 60_000,
    }
    values.update(fields)
    return ScheduleRecord(**values)  # type: ignore[arg-type]


def firings(first_seq: int, count: int) -> list[Firing]:
    return [
        Firing(seq, seq * 1000, Outcome.STARTED, seq * 1000 + 5, run_id=f"r{seq}")
        for seq in range(first_seq, first_seq + count)
    ]


async def test_create_is_once_per_id_and_get_returns_it(store: ScheduleStore) -> None:
    created, made = await store.create(schedule(input="first"))
    assert made and created.version == 1
    again, made_again = await store.create(schedule(input="second"))
    assert not made_again and again == created  # the first one, unchanged
    assert await store.get("s1") == created
    with pytest.raises(ScheduleNotFound):
        await store.get("nope")


async def test_a_record_round_trips_every_field(store: ScheduleStore) -> None:
    pending = Pending(
        from_tick_ms=60_000,
        next_tick_ms=120_000,
        decided_ms=61_000,
        tick_ms=60_000,
        outcome=Outcome.STARTED,
        run_id="t:r",
        thread_id="t",
        request_id="schedule:s1:60000",
        missed=(50_000, 40_000),
    )
    record = schedule(
        thread_mode=ThreadMode.THREADED,
        overlap=Overlap.ENQUEUE,
        thread_id="t",
        goal='{"objective":"x"}',
        paused=True,
        pending=pending,
        last_run_id="t:q",
        firing_seq=7,
        extra={"from_a_newer_keel": [1, 2]},
    )
    created, _ = await store.create(record)
    assert created == dataclasses.replace(record, version=1)
    assert await store.get("s1") == created


async def test_put_is_a_compare_and_set_on_the_version(store: ScheduleStore) -> None:
    created, _ = await store.create(schedule())
    changed = await store.put(
        dataclasses.replace(created, input="new"), expected_version=created.version
    )
    assert changed.version == 2 and (await store.get("s1")).input == "new"
    with pytest.raises(ScheduleChanged):
        await store.put(dataclasses.replace(created, input="stale"), expected_version=1)
    assert (await store.get("s1")).input == "new"
    with pytest.raises(ScheduleNotFound):
        await store.put(schedule("nope"), expected_version=1)


async def test_racing_puts_at_one_version_let_exactly_one_win(store: ScheduleStore) -> None:
    created, _ = await store.create(schedule())
    outcomes = await asyncio.gather(
        *(
            store.put(dataclasses.replace(created, input=f"w{i}"), expected_version=1)
            for i in range(8)
        ),
        return_exceptions=True,
    )
    won = [o for o in outcomes if isinstance(o, ScheduleRecord)]
    assert len(won) == 1
    assert all(isinstance(o, ScheduleChanged) for o in outcomes if o not in won)
    assert (await store.get("s1")).input == won[0].input


async def test_due_follows_next_tick_pending_and_pause(store: ScheduleStore) -> None:
    await store.create(schedule("a", next_tick_ms=5_000))
    b, _ = await store.create(schedule("b", next_tick_ms=3_000))
    await store.create(schedule("c", next_tick_ms=1_000, paused=True))
    assert await store.due(4_000, 10) == ["b"]
    assert await store.due(9_000, 10) == ["b", "a"]  # earliest first
    assert await store.due(9_000, 1) == ["b"]
    assert await store.next_due_ms() == 3_000
    # A decided firing is due at once (its decision time), whatever its next tick.
    pending = Pending(from_tick_ms=3_000, next_tick_ms=9_000, decided_ms=3_100, tick_ms=3_000)
    b = await store.put(
        dataclasses.replace(b, next_tick_ms=8_000, pending=pending), expected_version=b.version
    )
    assert await store.due(4_000, 10) == ["b"]
    # Paused and without pending: never due.
    await store.put(dataclasses.replace(b, paused=True, pending=None), expected_version=b.version)
    assert await store.due(10**13, 10) == ["a"]
    assert await store.next_due_ms() == 5_000


async def test_firings_are_kept_newest_first_up_to_the_limit(store: ScheduleStore) -> None:
    record, _ = await store.create(schedule())
    assert await store.firings("s1", limit=10) == []
    record = await store.put(record, expected_version=record.version, firings=firings(1, 3))
    assert [f.seq for f in await store.firings("s1", limit=10)] == [3, 2, 1]
    assert await store.firings("s1", limit=10) == list(reversed(firings(1, 3)))
    await store.put(record, expected_version=record.version, firings=firings(4, FIRINGS_KEPT))
    kept = await store.firings("s1", limit=1000)
    assert [f.seq for f in kept] == list(range(FIRINGS_KEPT + 3, 3, -1))  # the oldest dropped
    page = await store.firings("s1", limit=2, before_seq=10)
    assert [f.seq for f in page] == [9, 8]
    with pytest.raises(ScheduleNotFound):
        await store.firings("nope", limit=1)


async def test_page_lists_newest_first_by_agent(store: ScheduleStore) -> None:
    for n in range(5):
        await store.create(
            schedule(f"s{n}", create_time_ms=1_000 + n, agent_id="a" if n % 2 else "b")
        )
    everything = await store.page(limit=10)
    assert [r.schedule_id for r in everything] == ["s4", "s3", "s2", "s1", "s0"]
    first = await store.page(limit=2)
    rest = await store.page(
        limit=10, after=SchedulePageCursor(first[-1].create_time_ms, first[-1].schedule_id)
    )
    assert [r.schedule_id for r in first + rest] == ["s4", "s3", "s2", "s1", "s0"]
    assert [r.schedule_id for r in await store.page(agent_id="a", limit=10)] == ["s3", "s1"]
    with pytest.raises(ValueError):
        await store.page(limit=0)


async def test_delete_removes_the_schedule_its_due_entry_and_history(
    store: ScheduleStore, open_event_log: OpenEventLog
) -> None:
    record, _ = await store.create(schedule(next_tick_ms=1_000))
    await store.put(record, expected_version=record.version, firings=firings(1, 2))
    await store.delete("s1")
    with pytest.raises(ScheduleNotFound):
        await store.get("s1")
    assert await store.due(10**13, 10) == []
    assert await store.page(limit=10) == []
    with pytest.raises(ScheduleNotFound):
        await store.delete("s1")
    # Made again under the same id, it starts with no history.
    await store.create(schedule())
    assert await store.firings("s1", limit=10) == []
    log = await open_event_log()
    if isinstance(log, RedisEventLog):  # nothing of the first one is left behind
        keys = log.keys
        assert await log.client.exists(keys.schedule_firings("s1")) == 0
    if isinstance(log, PostgresEventLog):
        async with log.pool.connection() as conn:
            cursor = await conn.execute("SELECT count(*) FROM schedule_firings")
            assert await cursor.fetchone() == (0,)
