"""What only the PostgreSQL stores beside the log have: rows that go with their run when the
log's sweep deletes it, racing servers on one database (slots, starts, config counts,
claims), task doorbells sharing the log's channel, and their errors when the database
is gone.

The contracts themselves (tests/contract/test_task_store.py, test_schedule_store.py,
test_push_store.py) run on the "postgres" backend too; these tests look underneath them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest

from server.a2a.push.postgres import PostgresPushStore
from server.a2a.push.store import MAX_CONFIGS_PER_TASK, Delivery, PushConfig
from server.errors import InvalidArgument, RunNotFound, StoreUnavailable
from server.events.log import RunState
from server.events.postgres import PostgresEventLog, schema_of
from server.schedules.postgres import PostgresScheduleStore
from server.tasks.postgres import PostgresTaskStore
from server.tasks.records import TaskRecord, TaskStatus, task_id_for
from server.tasks.store import Slot
from tests.contract.test_event_log import make_events, new_run
from tests.contract.test_schedule_store import schedule
from tests.contract.test_task_store import task_of
from tests.postgres import start_postgres

LEASE_TTL_S = 5.0


@pytest.fixture
async def log(postgres_url: str, key_prefix: str) -> AsyncIterator[PostgresEventLog]:
    """A log whose ended runs expire after 0.2 s and are swept only when a test says so."""
    log = await PostgresEventLog.connect(
        postgres_url, key_prefix=key_prefix, terminal_ttl_s=0.2, sweep_interval_s=3_600
    )
    try:
        yield log
    finally:
        await log.close()


async def count(log: PostgresEventLog, table: str) -> int:
    async with log.pool.connection() as conn:
        row = await (await conn.execute(f"SELECT count(*) FROM {table}")).fetchone()
    assert row is not None
    return int(row[0])


class Heard:
    """A TaskListener and a ControlListener that keep what they are told."""

    def __init__(self) -> None:
        self.said: list[str] = []

    def on_task_log(self) -> None:
        self.said.append("log")

    def on_task_cancel(self, task_id: str) -> None:
        self.said.append(f"cancel:{task_id}")

    def on_cancel(self, reason: str) -> None:
        self.said.append(f"run-cancel:{reason}")


async def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_the_sweep_of_a_run_takes_its_tasks_and_task_log_with_it(
    log: PostgresEventLog,
) -> None:
    store = PostgresTaskStore.beside(log, lease_ttl_s=LEASE_TTL_S)
    ended, live = await new_run(log), await new_run(log)
    for run in (ended, live):
        task, _ = await store.create_task(task_of(run))
        started = await store.start_task(task.task_id, "runner")
        assert started is not None
        await store.finish_task(task.task_id, started.epoch, TaskStatus.COMPLETED)
    await log.append(ended.run_id, 1, make_events(ended.run_id, 0, 1), state=RunState.SUCCEEDED)
    await asyncio.sleep(0.4)
    # Expired, not swept: gone for every read, still in the tables.
    assert await store.run_tasks(ended.run_id) == []
    assert await store.task_log(ended.run_id, 0) == []
    assert [t.run_id for t in await store.list_tasks(limit=10)] == [live.run_id]
    assert (await count(log, "tasks"), await count(log, "task_log")) == (2, 6)
    assert await log.expire() == 1
    assert (await count(log, "tasks"), await count(log, "task_logs")) == (1, 1)
    assert await count(log, "task_log") == 3
    assert len(await store.task_log(live.run_id, 0)) == 3


async def test_a_task_of_a_run_that_is_gone_is_not_made(log: PostgresEventLog) -> None:
    store = PostgresTaskStore.beside(log, lease_ttl_s=LEASE_TTL_S)
    run = await new_run(log)
    await log.append(run.run_id, 1, make_events(run.run_id, 0, 1), state=RunState.FAILED)
    await asyncio.sleep(0.4)
    with pytest.raises(RunNotFound):
        await store.create_task(task_of(run))
    assert await count(log, "tasks") == 0


async def test_racing_servers_never_hold_more_slots_than_the_limits(
    log: PostgresEventLog,
) -> None:
    stores = [PostgresTaskStore.beside(log, lease_ttl_s=LEASE_TTL_S) for _ in range(4)]
    got = await asyncio.gather(
        *(
            stores[n % 4].acquire_slot(f"t{n}", f"agent-{n % 2}", global_limit=5, agent_limit=2)
            for n in range(24)
        )
    )
    assert got.count(Slot.HELD) == 4  # two of each agent's
    assert got.count(Slot.AGENT_FULL) == 20
    got = await asyncio.gather(
        *(
            stores[n % 4].acquire_slot(f"u{n}", f"other-{n}", global_limit=5, agent_limit=0)
            for n in range(24)
        )
    )
    assert got.count(Slot.HELD) == 1  # the global limit: 4 + 1
    assert got.count(Slot.FULL) == 23
    assert await count(log, "task_slots") == 5


async def test_racing_starts_of_a_task_start_one_attempt(log: PostgresEventLog) -> None:
    stores = [PostgresTaskStore.beside(log, lease_ttl_s=LEASE_TTL_S) for _ in range(4)]
    run = await new_run(log)
    task, _ = await stores[0].create_task(task_of(run))
    started = await asyncio.gather(
        *(stores[n % 4].start_task(task.task_id, f"runner-{n}") for n in range(12))
    )
    won = [s for s in started if s is not None]
    assert len(won) == 1 and won[0].attempt == 1
    assert len(await stores[0].task_log(run.run_id, 0)) == 2  # queued, running


async def test_racing_task_changes_of_one_run_keep_its_log_dense(log: PostgresEventLog) -> None:
    store = PostgresTaskStore.beside(log, lease_ttl_s=LEASE_TTL_S)
    run = await new_run(log)
    tasks: list[TaskRecord] = []
    for n in range(10):
        task, _ = await store.create_task(task_of(run, f"call-{n}"))
        tasks.append(task)
    await asyncio.gather(*(store.start_task(t.task_id, "runner") for t in tasks))
    async with log.pool.connection() as conn:
        cursor = await conn.execute(
            "SELECT pos FROM task_log WHERE run_id = %s ORDER BY pos", (run.run_id,)
        )
        positions = [int(row[0]) for row in await cursor.fetchall()]
    assert positions == list(range(20))


async def test_racing_configs_of_one_run_keep_its_bound(log: PostgresEventLog) -> None:
    stores = [PostgresPushStore.beside(log) for _ in range(4)]
    outcomes = await asyncio.gather(
        *(
            stores[n % 4].put_config(PushConfig(f"c{n}", "r1", "https://example.com/x"))
            for n in range(MAX_CONFIGS_PER_TASK + 8)
        ),
        return_exceptions=True,
    )
    assert outcomes.count(None) == MAX_CONFIGS_PER_TASK
    assert sum(isinstance(o, InvalidArgument) for o in outcomes) == 8
    assert len(await stores[0].configs("r1")) == MAX_CONFIGS_PER_TASK


async def test_racing_claims_hand_each_run_to_one_dispatcher(log: PostgresEventLog) -> None:
    stores = [PostgresPushStore.beside(log) for _ in range(4)]
    for n in range(40):
        await stores[0].put_config(PushConfig("c", f"r{n}", "https://example.com/x"))
    claimed = await asyncio.gather(*(stores[n % 4].claim(f"d{n}", 7, 60_000) for n in range(8)))
    every = [run_id for batch in claimed for run_id in batch]
    assert len(every) == len(set(every))  # no run went to two dispatchers
    every += await stores[0].claim("late", 100, 60_000)  # what all of them skipped, if any
    assert sorted(every) == sorted(f"r{n}" for n in range(40))


async def test_expired_push_configs_are_swept_by_any_expire(log: PostgresEventLog) -> None:
    store = PostgresPushStore.beside(log)
    await store.put_config(PushConfig("c", "r1", "https://example.com/x"))
    await store.expire("r1", 50)
    await asyncio.sleep(0.2)
    assert await count(log, "push_configs") == 1  # expired, still there, read as nothing
    assert await store.configs("r1") == []
    await store.expire("r2", 0)  # any run's
    assert (await count(log, "push_configs"), await count(log, "push_runs")) == (0, 0)


async def test_a_config_added_after_its_runs_configs_expired_starts_afresh(
    log: PostgresEventLog,
) -> None:
    store = PostgresPushStore.beside(log)
    for config_id in ("a", "b"):
        await store.put_config(PushConfig(config_id, "r1", "https://example.com/x"))
    await store.record("r1", "a", Delivery(mark="m"))
    await store.expire("r1", 50)
    await asyncio.sleep(0.2)
    await store.put_config(PushConfig("c", "r1", "https://example.com/x"))
    assert [c.config_id for c in await store.configs("r1")] == ["c"]
    assert await store.deliveries("r1") == {}
    assert await store.claim("d", 10, 60_000) == ["r1"]
    await asyncio.sleep(0.2)
    assert [c.config_id for c in await store.configs("r1")] == ["c"]  # kept: no expiry


async def test_task_doorbells_and_run_cancel_requests_share_the_channel_not_listeners(
    log: PostgresEventLog,
) -> None:
    store = PostgresTaskStore.beside(log, lease_ttl_s=LEASE_TTL_S)
    run = await new_run(log)
    tasks_heard, run_heard = Heard(), Heard()
    await store.subscribe_tasks(run.run_id, tasks_heard)
    await log.subscribe_control(run.run_id, run_heard)
    task, _ = await store.create_task(task_of(run))
    started = await store.start_task(task.task_id, "runner")
    assert started is not None
    await store.cancel_task(task.task_id, "stop")
    await wait_for(lambda: f"cancel:{task.task_id}" in tasks_heard.said)
    await log.request_cancel(run.run_id, "log:no")
    await wait_for(lambda: run_heard.said == ["run-cancel:log:no"])
    assert tasks_heard.said == ["log", "log", f"cancel:{task.task_id}"]


async def test_schedules_in_two_schemas_of_one_database_are_apart(
    postgres_url: str, log: PostgresEventLog
) -> None:
    other = await PostgresEventLog.connect(postgres_url, key_prefix=f"t{uuid.uuid4().hex[:8]}")
    try:
        ours, theirs = PostgresScheduleStore.beside(log), PostgresScheduleStore.beside(other)
        await ours.create(schedule("s1"))
        assert await theirs.page(limit=10) == []
        assert [r.schedule_id for r in await ours.page(limit=10)] == ["s1"]
    finally:
        await other.close()


async def test_an_outage_raises_store_unavailable_from_every_store() -> None:
    server = await asyncio.to_thread(start_postgres)
    try:
        log = await PostgresEventLog.connect(
            server.url, key_prefix=f"t{uuid.uuid4().hex[:8]}", timeout_s=1
        )
        tasks = PostgresTaskStore.beside(log, lease_ttl_s=LEASE_TTL_S)
        schedules = PostgresScheduleStore.beside(log)
        push = PostgresPushStore.beside(log)
        run = await new_run(log)
        await asyncio.to_thread(server.stop)
        with pytest.raises(StoreUnavailable):
            await tasks.get_task(task_id_for(run.run_id, "call"))
        with pytest.raises(StoreUnavailable):
            await tasks.acquire_slot("t", "a", global_limit=1, agent_limit=0)
        with pytest.raises(StoreUnavailable):
            await schedules.due(0, 10)
        with pytest.raises(StoreUnavailable):
            await push.claim("d", 10, 1000)
        await asyncio.wait_for(log.close(), 10)
    finally:
        await asyncio.to_thread(server.stop)


async def test_the_stores_tables_live_in_the_logs_schema(
    log: PostgresEventLog, key_prefix: str, postgres_url: str
) -> None:
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as admin:
        cursor = await admin.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (schema_of(key_prefix),),
        )
        tables = {str(row[0]) for row in await cursor.fetchall()}
    assert {"tasks", "task_logs", "task_log", "task_slots", "schedules", "schedule_firings",
            "push_runs", "push_configs"} <= tables  # fmt: skip
