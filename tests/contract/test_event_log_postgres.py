"""What only the PostgreSQL EventLog has: its LISTEN connection, NOTIFY's size limit, the
retention sweep, migrations at connect, and its errors when the database is gone.

The contract itself (tests/contract/test_event_log*.py, ...) runs on the "postgres"
backend too; these tests look underneath it.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from keel.v1.agent_service_pb2 import AgentEvent, TextDelta

from server.errors import SchemaTooNew, StaleEpoch, StoreUnavailable
from server.events.factory import open_event_log
from server.events.log import BusyPolicy, RunState
from server.events.pg_fanout import MAX_PAYLOAD_BYTES, events_payload
from server.events.pg_migrate import migrate
from server.events.postgres import PostgresEventLog, schema_of
from tests.contract.test_event_log import Recorder, indices, make_events, make_record, new_run
from tests.postgres import start_postgres


@pytest.fixture
async def admin(postgres_url: str) -> AsyncIterator[psycopg.AsyncConnection[object]]:
    """A plain connection to the session's PostgreSQL."""
    conn = await psycopg.AsyncConnection.connect(postgres_url, autocommit=True)
    try:
        yield conn
    finally:
        await conn.close()


async def listen_backends(admin: psycopg.AsyncConnection[object], schema: str) -> list[int]:
    cursor = await admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
        (f"keel-listen-{schema}",),
    )
    return [int(row[0]) for row in await cursor.fetchall()]  # type: ignore[call-overload]


async def terminate_listen(admin: psycopg.AsyncConnection[object], schema: str) -> int:
    pids = await listen_backends(admin, schema)
    for pid in pids:
        await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    return len(pids)


class GapRecorder(Recorder):
    """A Recorder that notes how many events it had heard when told on_gap."""

    heard_at_gap = 0

    def on_gap(self) -> None:
        self.heard_at_gap = len(self.events)
        super().on_gap()


def big_events(run_id: str, start: int, count: int, size: int) -> list[AgentEvent]:
    return [
        AgentEvent(
            run_id=run_id, index=i, step=1, attempt=1, text_delta=TextDelta(delta="x" * size)
        )
        for i in range(start, start + count)
    ]


async def test_the_listen_connection_killed_mid_stream_gives_on_gap_and_nothing_is_missed(
    postgres_url: str, key_prefix: str, admin: psycopg.AsyncConnection[object]
) -> None:
    log = await PostgresEventLog.connect(postgres_url, key_prefix=key_prefix)
    schema = schema_of(key_prefix)
    try:
        run = await new_run(log)
        recorder = GapRecorder()
        subscription = await log.subscribe(run.run_id, recorder)
        total = 300
        killed = asyncio.Event()

        async def writer() -> None:
            for index in range(total):
                await log.append(run.run_id, 1, make_events(run.run_id, index, 1))
                if index == 100:
                    killed.set()
                await asyncio.sleep(0.001)

        writing = asyncio.create_task(writer())
        await killed.wait()
        assert await terminate_listen(admin, schema) == 1
        await recorder.wait_until(lambda: recorder.gaps == 1, timeout_s=10)
        # The observer's recipe on on_gap: re-read the log from where its events stopped.
        before_gap = indices(recorder.events[: recorder.heard_at_gap])
        assert before_gap == list(range(len(before_gap))), "what arrived before is in order"
        reread = indices(await log.read(run.run_id, len(before_gap), 1_000))
        await writing
        await recorder.wait_until(
            lambda: bool(recorder.events) and recorder.events[-1].index == total - 1, timeout_s=10
        )
        after_gap = indices(recorder.events[recorder.heard_at_gap :])
        assert recorder.gaps == 1
        assert after_gap == sorted(after_gap), "live events stay in order"
        # Re-read and live events together cover every index: nothing is missed.
        assert set(before_gap) | set(reread) | set(after_gap) == set(range(total))
        assert len(await listen_backends(admin, schema)) == 1, "LISTEN is back"
        await subscription.close()
    finally:
        await log.close()


async def test_subscribe_while_the_listen_connection_is_down_hears_events_or_a_gap(
    postgres_url: str, key_prefix: str, admin: psycopg.AsyncConnection[object]
) -> None:
    log = await PostgresEventLog.connect(postgres_url, key_prefix=key_prefix)
    try:
        first, second = await new_run(log), await new_run(log)
        early = Recorder()
        await log.subscribe(first.run_id, early)
        await terminate_listen(admin, schema_of(key_prefix))
        late = Recorder()
        await log.subscribe(second.run_id, late)  # before or after the reader notices the kill
        await log.append(second.run_id, 1, make_events(second.run_id, 0, 2))
        # Registered before the reader noticed the kill, the late listener is owed on_gap
        # (the notification may be lost with the connection); after, it hears the events.
        await late.wait_until(lambda: len(late.events) == 2 or late.gaps == 1)
        await early.wait_until(lambda: early.gaps == 1)
        if late.gaps:
            assert indices(await log.read(second.run_id, 0, 10)) == [0, 1]
        else:
            assert indices(late.events) == [0, 1]
        # Either way, LISTEN is back and later appends reach both.
        await log.append(second.run_id, 1, make_events(second.run_id, 2, 1))
        await late.wait_until(lambda: bool(late.events) and late.events[-1].index == 2)
    finally:
        await log.close()


async def test_one_listen_connection_however_many_listeners_and_controls(
    postgres_url: str, key_prefix: str, admin: psycopg.AsyncConnection[object]
) -> None:
    log = await PostgresEventLog.connect(postgres_url, key_prefix=key_prefix)
    try:
        runs = [await new_run(log) for _ in range(20)]
        recorders = [Recorder() for _ in runs]
        for run, recorder in zip(runs, recorders, strict=True):
            await log.subscribe(run.run_id, recorder)
            await log.subscribe(run.run_id, Recorder())
            await log.subscribe_control(run.run_id, Recorder())  # type: ignore[arg-type]
        assert len(await listen_backends(admin, schema_of(key_prefix))) == 1
        for run in runs:
            await log.append(run.run_id, 1, make_events(run.run_id, 0, 2))
        for recorder in recorders:
            await recorder.wait_until(lambda r=recorder: len(r.events) == 2)  # type: ignore[misc]
    finally:
        await log.close()


def test_a_batch_too_big_for_notify_travels_as_a_doorbell() -> None:
    small = make_events("r", 0, 2)
    encoded = b"".join(e.SerializeToString() for e in small)
    assert events_payload("r", 0, 2, encoded).startswith("e")
    assert events_payload("r", 0, 2, b"x" * MAX_PAYLOAD_BYTES).startswith("d1:r0:2")


async def test_batches_too_big_for_notify_still_reach_listeners_in_order(
    postgres_url: str, key_prefix: str
) -> None:
    log = await PostgresEventLog.connect(postgres_url, key_prefix=key_prefix)
    try:
        run = await new_run(log)
        recorder = Recorder()
        await log.subscribe(run.run_id, recorder)
        index = 0
        for round_ in range(6):
            batch = (
                big_events(run.run_id, index, 3, 4_000)  # ~12 kB: a doorbell
                if round_ % 2
                else make_events(run.run_id, index, 2)  # inline
            )
            await log.append(run.run_id, 1, batch)
            index += len(batch)
        await recorder.wait_until(lambda: len(recorder.events) == index)
        assert indices(recorder.events) == list(range(index))
        assert recorder.events == await log.read(run.run_id, 0, 100)
        assert recorder.gaps == 0
    finally:
        await log.close()


async def test_the_sweep_deletes_expired_runs_rows_and_reads_hide_them_before(
    postgres_url: str, key_prefix: str, admin: psycopg.AsyncConnection[object]
) -> None:
    log = await PostgresEventLog.connect(
        postgres_url, key_prefix=key_prefix, terminal_ttl_s=0.2, sweep_interval_s=3_600
    )
    schema = schema_of(key_prefix)

    async def rows(table: str) -> int:
        cursor = await admin.execute(f'SELECT count(*) FROM "{schema}".{table}')
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])  # type: ignore[call-overload]

    try:
        ended, live = await new_run(log), await new_run(log)
        await log.append(ended.run_id, 1, make_events(ended.run_id, 0, 3), state=RunState.FAILED)
        await log.append(live.run_id, 1, make_events(live.run_id, 0, 2), state=RunState.SUSPENDED)
        await log.incr_counter(ended.run_id, "k")
        await log.journal_tool(ended.run_id, 1, "call", b"result")
        await asyncio.sleep(0.5)
        # Expired but not swept: gone for every read, still in the tables.
        assert not await log.has_run(ended.run_id)
        assert await log.get_counter(ended.run_id, "k") == 0
        assert await log.journaled_tool(ended.run_id, "call") is None
        assert [r.run_id for r in await log.list_runs(limit=10)] == [live.run_id]
        assert await rows("events") == 5
        assert await log.expire() == 1
        assert (await rows("runs"), await rows("events")) == (1, 2)
        assert (await rows("counters"), await rows("tools")) == (0, 0)
        assert await log.expire() == 0
        assert (await log.get_run(live.run_id)).state is RunState.SUSPENDED
    finally:
        await log.close()


async def test_an_expired_run_not_yet_swept_gives_its_id_to_a_new_run_without_its_events(
    postgres_url: str, key_prefix: str
) -> None:
    log = await PostgresEventLog.connect(
        postgres_url, key_prefix=key_prefix, terminal_ttl_s=0.2, sweep_interval_s=3_600
    )
    try:
        old = await new_run(log)
        await log.append(old.run_id, 1, make_events(old.run_id, 0, 3), state=RunState.SUCCEEDED)
        await log.incr_counter(old.run_id, "k")
        await asyncio.sleep(0.5)
        assert (await log.create_run(make_record(old.run_id)))[1]
        assert await log.read(old.run_id, 0, 10) == []
        assert await log.get_counter(old.run_id, "k") == 0
        await log.append(old.run_id, 1, make_events(old.run_id, 0, 1, tag="new"))
        assert [e.text_delta.delta for e in await log.read(old.run_id, 0, 10)] == ["new0"]
    finally:
        await log.close()


async def test_connect_refuses_a_schema_migrated_by_a_newer_keel(
    postgres_url: str, key_prefix: str, admin: psycopg.AsyncConnection[object]
) -> None:
    schema = schema_of(key_prefix)
    await migrate(postgres_url, schema)
    await admin.execute(f"UPDATE \"{schema}\".alembic_version SET version_num = '0777_later'")
    with pytest.raises(SchemaTooNew, match="0777_later"):
        await PostgresEventLog.connect(postgres_url, key_prefix=key_prefix)


async def test_unreachable_database_raises_store_unavailable_quickly() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await PostgresEventLog.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres")
    assert time.monotonic() - started < 5


async def test_an_outage_raises_store_unavailable_and_close_still_returns() -> None:
    server = await asyncio.to_thread(start_postgres)
    try:
        log = await PostgresEventLog.connect(
            server.url, key_prefix=f"t{uuid.uuid4().hex[:8]}", timeout_s=1
        )
        run = await new_run(log)
        await log.subscribe(run.run_id, Recorder())
        await asyncio.to_thread(server.stop)

        with pytest.raises(StoreUnavailable):
            await log.ping()
        with pytest.raises(StoreUnavailable):
            await log.append(run.run_id, 1, make_events(run.run_id, 0, 1))
        with pytest.raises(StoreUnavailable):
            await log.read(run.run_id, 0, 10)
        with pytest.raises(StoreUnavailable):
            await log.subscribe("other", Recorder())  # LISTEN cannot come back
        await asyncio.wait_for(log.close(), 10)  # the reader is reconnecting in a loop
    finally:
        await asyncio.to_thread(server.stop)


async def test_the_factory_opens_a_postgres_log_in_the_key_prefixs_schema(
    postgres_url: str, key_prefix: str
) -> None:
    log = await open_event_log(None, postgres_url=postgres_url, key_prefix=key_prefix)
    try:
        assert isinstance(log, PostgresEventLog)
        assert log.schema == schema_of(key_prefix) == key_prefix.replace("-", "_")
        await log.ping()
    finally:
        await log.close()
    with pytest.raises(ValueError, match="not both"):
        await open_event_log("redis://x", postgres_url=postgres_url)


async def test_appends_of_one_loop_turn_share_a_transaction_yet_fail_alone(
    postgres_url: str, key_prefix: str
) -> None:
    log = await PostgresEventLog.connect(postgres_url, key_prefix=key_prefix)
    try:
        runs = [await new_run(log) for _ in range(4)]
        appends = [log.append(run.run_id, 1, make_events(run.run_id, 0, 2)) for run in runs]
        # A stale writer and a broken call (an epoch PostgreSQL cannot hold) in the same batch.
        appends.append(log.append(runs[0].run_id, 7, make_events(runs[0].run_id, 2, 1)))
        appends.append(log.append(runs[1].run_id, 2**70, make_events(runs[1].run_id, 2, 1)))
        results = await asyncio.gather(*appends, return_exceptions=True)
        assert results[:4] == [2, 2, 2, 2]
        assert isinstance(results[4], StaleEpoch)
        assert isinstance(results[5], psycopg.Error)
        for run in runs:
            assert indices(await log.read(run.run_id, 0, 10)) == [0, 1]
    finally:
        await log.close()


async def test_many_claimers_of_one_lapsed_run_one_wins(postgres_url: str, key_prefix: str) -> None:
    log = await PostgresEventLog.connect(postgres_url, key_prefix=key_prefix, lease_ttl_s=0.2)
    try:
        run = await new_run(log)
        await asyncio.sleep(0.4)
        claims = await asyncio.gather(*(log.claim(run.run_id, f"i{n}") for n in range(20)))
        winners = [claim for claim in claims if claim is not None]
        assert len(winners) == 1
        assert winners[0].epoch == 2
        assert (await log.get_run(run.run_id)).owner == winners[0].owner
    finally:
        await log.close()


async def test_a_busy_thread_under_racing_writers_never_deadlocks(
    postgres_url: str, key_prefix: str
) -> None:
    """Ends of runs (which lock the thread, then the run), interrupts (the thread, then
    the active run), cancels and appends (one run each) racing on one thread."""
    from tests.contract.test_event_log_threads import abort, events, run_on, thread_record

    log = await PostgresEventLog.connect(postgres_url, key_prefix=key_prefix)
    try:
        thread, _ = await log.create_thread(thread_record())
        first = (await log.start_thread_run(run_on(thread.thread_id), BusyPolicy.ENQUEUE)).run
        for _round in range(10):
            active = (await log.get_thread(thread.thread_id)).active_run_id
            assert active
            run = await log.get_run(active)
            if run.owner == "":
                claimed = await log.claim(run.run_id, "me", force=True)
                assert claimed is not None
                run = claimed
            head = run.next_index
            starts = [
                log.start_thread_run(run_on(thread.thread_id), policy)
                for policy in (BusyPolicy.ENQUEUE, BusyPolicy.INTERRUPT, BusyPolicy.ENQUEUE)
            ]
            results = await asyncio.gather(
                log.append(run.run_id, run.epoch, events(run.run_id, head, 2)),
                *starts,
                log.request_cancel(run.run_id, "stop"),
                return_exceptions=True,
            )
            assert not [r for r in results if isinstance(r, BaseException)], results
            await log.append(
                run.run_id,
                run.epoch,
                abort(run.run_id, head + 2),
                state=RunState.CANCELLED,
                thread_messages=[b"m"],
            )
        final = await log.get_thread(thread.thread_id)
        assert final.active_run_id and final.active_run_id != first.run_id
        assert final.message_count == 10
    finally:
        await log.close()
