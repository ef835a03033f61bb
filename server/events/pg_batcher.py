"""Appends of many runs share a round trip and a commit (PostgreSQL).

The appends that callers start in the same event-loop turn (the writers of
many runs, each awaiting its own) are sent together on one pooled connection
in psycopg's pipeline mode: one round trip for all of them, and one
transaction, so one commit (one WAL flush) and one turn at PostgreSQL's
notification queue lock, which every notifying transaction takes at commit
and which otherwise serializes concurrent appends.

Sharing a transaction must not make appends depend on one another:
- each append_events call reports its domain errors (stale epoch, index
  conflict, no run) as a status, not an exception, so one writer's refusal
  leaves the others' appends in place;
- the batch is sorted by run id, so two batches lock run rows in the same
  order; appends that may lock a thread's row (a terminal state) are never
  batched (the caller sends them alone), so a batch locks run rows only;
- should the shared transaction fail anyway (a deadlock with a writer that
  locks rows in another order, a bug), nothing of it committed, and each
  append is sent again alone, so each caller gets its own result or error.
A lost connection fails every append of the batch with StoreUnavailable, as
it would have failed each alone.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from server.events import sql
from server.events.postgres_records import store_errors

Row = tuple[Any, ...]
_MAX_BATCH = 128


class AppendBatcher:
    """Sends append_events calls made in the same loop turn together (module docstring)."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Row]]] = []
        self._scheduled = False
        self._flushes: set[asyncio.Task[None]] = set()

    async def __call__(self, params: tuple[Any, ...]) -> Row:
        future: asyncio.Future[Row] = asyncio.get_running_loop().create_future()
        self._pending.append((params, future))
        if not self._scheduled:
            # The task's first step runs after the callbacks ready now: the appends
            # started in this loop turn join the batch before it is sent.
            self._scheduled = True
            task = asyncio.create_task(self._flush())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
        return await future

    async def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        size = _MAX_BATCH
        chunks = [pending[start : start + size] for start in range(0, len(pending), size)]
        await asyncio.gather(*(self._send(chunk) for chunk in chunks))

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Row]]]) -> None:
        batch.sort(key=lambda item: str(item[0][0]))  # by run id: one lock order
        try:
            with store_errors():
                async with self._pool.connection() as conn:
                    if len(batch) == 1:
                        await self._alone(conn, batch)
                        return
                    try:
                        rows = await self._pipelined(conn, batch)
                    except psycopg.OperationalError:
                        raise
                    except psycopg.Error:
                        # Nothing of the shared transaction committed: each alone.
                        await self._alone(conn, batch)
                        return
            for (_params, future), row in zip(batch, rows, strict=True):
                if not future.done():
                    future.set_result(row)
        except asyncio.CancelledError:
            for _params, future in batch:
                if not future.done():
                    future.cancel()
            raise
        except BaseException as error:
            for _params, future in batch:
                if not future.done():
                    future.set_exception(error)

    @staticmethod
    async def _pipelined(
        conn: psycopg.AsyncConnection[Any], batch: list[tuple[tuple[Any, ...], asyncio.Future[Row]]]
    ) -> list[Row]:
        cursors = []
        async with conn.pipeline():
            for params, _future in batch:
                cursors.append(await conn.execute(sql.APPEND, params))
        rows: list[Row] = []
        for cursor in cursors:
            row = await cursor.fetchone()
            assert row is not None
            rows.append(row)
        return rows

    @staticmethod
    async def _alone(
        conn: psycopg.AsyncConnection[Any], batch: list[tuple[tuple[Any, ...], asyncio.Future[Row]]]
    ) -> None:
        for params, future in batch:
            try:
                cursor = await conn.execute(sql.APPEND, params)
                row = await cursor.fetchone()
                assert row is not None
            except psycopg.OperationalError:
                raise
            except psycopg.Error as error:
                if not future.done():
                    future.set_exception(error)
                continue
            if not future.done():
                future.set_result(row)

    async def close(self) -> None:
        for task in tuple(self._flushes):
            await asyncio.wait({task}, timeout=5.0)
