"""PostgresScheduleStore: the ScheduleStore on PostgreSQL, beside a PostgresEventLog, shared
by every server.

Schedules are rows of their own table, not tied to any run; a schedule's
history is a second table whose rows go with their schedule (ON DELETE
CASCADE). Every statement is in server/events/sql.py (SCHEDULE_). A write is one statement, or one
transaction when it is two (a compare-and-set that also records firings):
the version in the UPDATE's WHERE is what makes racing writers lose
(ScheduleChanged), as the version check inside the Redis store's script
does. `due_ms` is a column of its own, indexed, so due() and next_due_ms()
read the index and never the records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from psycopg_pool import AsyncConnectionPool

from server.errors import ScheduleChanged, ScheduleNotFound
from server.events import sql
from server.events.postgres import PostgresEventLog
from server.events.postgres_records import store_errors
from server.schedules.records import FIRINGS_KEPT, Firing, SchedulePageCursor, ScheduleRecord


class PostgresScheduleStore:
    """A ScheduleStore on PostgreSQL; create it with `PostgresScheduleStore.beside(log)`."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool

    @classmethod
    def beside(cls, log: PostgresEventLog) -> PostgresScheduleStore:
        """A store sharing `log`'s connection pool (the log closes it)."""
        return cls(log.pool)

    async def create(self, record: ScheduleRecord) -> tuple[ScheduleRecord, bool]:
        stored = dataclasses.replace(record, version=1)
        params = {
            "schedule_id": record.schedule_id,
            "record": stored.encode(),
            "due_ms": stored.due_ms,
            "agent_id": record.agent_id,
            "owner": record.owner,
            "create_time_ms": record.create_time_ms,
        }
        with store_errors():
            async with self._pool.connection() as conn:
                while True:
                    made = await (await conn.execute(sql.SCHEDULE_CREATE, params)).fetchone()
                    if made is not None:
                        return stored, True
                    found = await (await conn.execute(sql.SCHEDULE_GET, params)).fetchone()
                    if found is not None:
                        return ScheduleRecord.decode(found[0]), False
                    # Deleted between the two statements: try again.

    async def get(self, schedule_id: str) -> ScheduleRecord:
        with store_errors():
            async with self._pool.connection() as conn:
                cursor = await conn.execute(sql.SCHEDULE_GET, {"schedule_id": schedule_id})
                found = await cursor.fetchone()
        if found is None:
            raise ScheduleNotFound(schedule_id)
        return ScheduleRecord.decode(found[0])

    async def page(
        self,
        *,
        agent_id: str = "",
        tenant: str | None = None,
        limit: int,
        after: SchedulePageCursor | None = None,
    ) -> list[ScheduleRecord]:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        params = {
            "after_ms": None if after is None else after.create_time_ms,
            "after_id": None if after is None else after.schedule_id,
            "agent_id": agent_id,
            "tenant": tenant,
            "limit": limit,
        }
        with store_errors():
            async with self._pool.connection() as conn:
                rows = await (await conn.execute(sql.SCHEDULE_PAGE, params)).fetchall()
        return [ScheduleRecord.decode(row[0]) for row in rows]

    async def put(
        self, record: ScheduleRecord, *, expected_version: int, firings: Sequence[Firing] = ()
    ) -> ScheduleRecord:
        stored = dataclasses.replace(record, version=expected_version + 1)
        key = {"schedule_id": record.schedule_id}
        with store_errors():
            async with self._pool.connection() as conn, conn.transaction():
                put = {
                    **key,
                    "record": stored.encode(),
                    "due_ms": stored.due_ms,
                    "expected": expected_version,
                }
                won = await (await conn.execute(sql.SCHEDULE_PUT, put)).fetchone()
                if won is None:
                    current = await (await conn.execute(sql.SCHEDULE_VERSION, key)).fetchone()
                    if current is None:
                        raise ScheduleNotFound(record.schedule_id)
                    raise ScheduleChanged(record.schedule_id)
                if firings:
                    async with conn.cursor() as cursor:
                        await cursor.executemany(
                            sql.SCHEDULE_ADD_FIRING,
                            [{**key, "seq": f.seq, "firing": f.encode()} for f in firings],
                        )
                    await conn.execute(sql.SCHEDULE_TRIM_FIRINGS, {**key, "kept": FIRINGS_KEPT})
        return stored

    async def delete(self, schedule_id: str) -> None:
        with store_errors():
            async with self._pool.connection() as conn:
                cursor = await conn.execute(sql.SCHEDULE_DELETE, {"schedule_id": schedule_id})
                deleted = await cursor.fetchone()
        if deleted is None:
            raise ScheduleNotFound(schedule_id)

    async def due(self, now_ms: int, limit: int) -> list[str]:
        with store_errors():
            async with self._pool.connection() as conn:
                cursor = await conn.execute(sql.SCHEDULE_DUE, {"now_ms": now_ms, "limit": limit})
                rows = await cursor.fetchall()
        return [str(row[0]) for row in rows]

    async def next_due_ms(self) -> int | None:
        with store_errors():
            async with self._pool.connection() as conn:
                row = await (await conn.execute(sql.SCHEDULE_NEXT_DUE)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    async def firings(
        self, schedule_id: str, *, limit: int, before_seq: int | None = None
    ) -> list[Firing]:
        await self.get(schedule_id)
        params = {"schedule_id": schedule_id, "before_seq": before_seq, "limit": limit}
        with store_errors():
            async with self._pool.connection() as conn:
                rows = await (await conn.execute(sql.SCHEDULE_FIRINGS, params)).fetchall()
        return [Firing.decode(row[0]) for row in rows]

    async def close(self) -> None:
        """The log owns the pool."""
