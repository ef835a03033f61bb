"""PostgresPushStore: the PushStore on PostgreSQL, beside a PostgresEventLog, shared by every
server.

Two tables (server/events/sql.py, PUSH_, has every statement): push_runs, a row per run with push
state, which is the index of due runs and their holders (`due_at`, `owner`)
and the configs' expiry; and push_configs, a row per config with its
delivery state. Adding a config is one transaction that locks the run's row
first (an upsert), so two servers adding configs to one run count them one
after the other and MAX_CONFIGS_PER_TASK holds; the same transaction makes
the run due and ends its hold, which the Redis store does in two steps.
Holds are deadlines by the database's clock: a claim takes due rows FOR
UPDATE SKIP LOCKED, so racing claims never hand one run to two dispatchers.

As on Redis, the configs are not tied to the run's row in the event log: the
dispatcher expires them (expire) when the run ends or is found gone, and
an expired run's rows read as nothing until they are deleted, by the run's
next put_config or by any expire(), which sweeps a batch of expired runs.
"""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool

from server.a2a.push.store import MAX_CONFIGS_PER_TASK, Delivery, PushConfig
from server.errors import FieldViolation, InvalidArgument
from server.events import sql
from server.events.postgres import PostgresEventLog
from server.events.postgres_records import store_errors

_SWEEP_BATCH = 100


class PostgresPushStore:
    """A PushStore on PostgreSQL; create it with `PostgresPushStore.beside(log)`."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool

    @classmethod
    def beside(cls, log: PostgresEventLog) -> PostgresPushStore:
        """A store sharing `log`'s connection pool (the log closes it)."""
        return cls(log.pool)

    async def put_config(self, config: PushConfig) -> None:
        run = {"run_id": config.run_id}
        with store_errors():
            async with self._pool.connection() as conn, conn.transaction():
                expired = await (await conn.execute(sql.PUSH_PUT_RUN, run)).fetchone()
                if expired is not None and expired[0]:
                    await conn.execute(sql.PUSH_FORGET_CONFIGS, run)
                cursor = await conn.execute(
                    sql.PUSH_COUNT_CONFIGS, {**run, "config_id": config.config_id}
                )
                count, exists = await cursor.fetchone() or (0, False)
                if not exists and count >= MAX_CONFIGS_PER_TASK:
                    raise InvalidArgument(
                        FieldViolation(
                            "id",
                            f"a task has at most {MAX_CONFIGS_PER_TASK} push notification configs",
                        )
                    )
                await conn.execute(
                    sql.PUSH_PUT_CONFIG,
                    {**run, "config_id": config.config_id, "config": config.encode().decode(),
                     "create_time_ms": config.create_time_ms},
                )  # fmt: skip
                await conn.execute(sql.PUSH_KEEP, run)

    async def configs(self, run_id: str) -> list[PushConfig]:
        with store_errors():
            async with self._pool.connection() as conn:
                rows = await (await conn.execute(sql.PUSH_CONFIGS, {"run_id": run_id})).fetchall()
        return [PushConfig.decode(row[0]) for row in rows]

    async def delete_config(self, run_id: str, config_id: str) -> bool:
        with store_errors():
            async with self._pool.connection() as conn:
                cursor = await conn.execute(
                    sql.PUSH_DELETE_CONFIG, {"run_id": run_id, "config_id": config_id}
                )
                deleted = await cursor.fetchone()
        return deleted is not None

    async def deliveries(self, run_id: str) -> dict[str, Delivery]:
        with store_errors():
            async with self._pool.connection() as conn:
                rows = await (
                    await conn.execute(sql.PUSH_DELIVERIES, {"run_id": run_id})
                ).fetchall()
        return {str(row[0]): Delivery.decode(row[1]) for row in rows}

    async def record(self, run_id: str, config_id: str, delivery: Delivery) -> None:
        params = {"run_id": run_id, "config_id": config_id, "delivery": delivery.encode().decode()}
        with store_errors():
            async with self._pool.connection() as conn:
                await conn.execute(sql.PUSH_RECORD, params)

    async def claim(self, owner: str, limit: int, hold_ms: int) -> list[str]:
        params = {"owner": owner, "limit": limit, "hold_ms": hold_ms}
        with store_errors():
            async with self._pool.connection() as conn:
                rows = await (await conn.execute(sql.PUSH_CLAIM, params)).fetchall()
        return [str(row[0]) for row in rows]

    async def renew(self, run_id: str, owner: str, hold_ms: int) -> bool:
        params = {"run_id": run_id, "owner": owner, "hold_ms": hold_ms}
        with store_errors():
            async with self._pool.connection() as conn:
                held = await (await conn.execute(sql.PUSH_RENEW, params)).fetchone()
        return held is not None

    async def release(self, run_id: str, owner: str) -> None:
        with store_errors():
            async with self._pool.connection() as conn:
                await conn.execute(sql.PUSH_RELEASE, {"run_id": run_id, "owner": owner})

    async def mark_due(self, run_id: str) -> None:
        with store_errors():
            async with self._pool.connection() as conn:
                await conn.execute(sql.PUSH_MARK_DUE, {"run_id": run_id})

    async def expire(self, run_id: str, ttl_ms: int) -> None:
        run = {"run_id": run_id}
        with store_errors():
            async with self._pool.connection() as conn:
                if ttl_ms > 0:
                    await conn.execute(sql.PUSH_EXPIRE, {**run, "ttl_ms": ttl_ms})
                else:
                    await conn.execute(sql.PUSH_FORGET, run)
                await conn.execute(sql.PUSH_SWEEP, {"limit": _SWEEP_BATCH})
