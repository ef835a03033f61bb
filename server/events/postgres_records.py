"""How PostgresEventLog maps rows to records, and database errors to Keel's.

Shared with the stores beside the log (tasks, schedules, push configs), which
use the same pool: `store_errors` turns a lost connection into
StoreUnavailable, so the API answers UNAVAILABLE with RetryInfo as on Redis.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg_pool

from server.errors import StoreUnavailable
from server.events.log import RunRecord, RunState, ThreadRecord

# The run columns a RunRecord is read from, in RunRecord's order (sql.py selects them).
RUN_COLUMNS = (
    "run_id",
    "agent_id",
    "input",
    "request_id",
    "state",
    "create_time_ms",
    "update_time_ms",
    "next_index",
    "earliest_index",
    "epoch",
    "owner",
    "error",
    "checkpoint",
    "cancel_reason",
    "decisions",
    "thread_id",
    "live_only",
    "terminal_ttl_ms",
    "interrupted_by",
    "rollback",
    "until_idle",
    "last_step",
    "last_attempt",
    "schedule_id",
    "goal",
    "goal_progress",
    "trace_context",
    "tenant",
)
# The same, with the checkpoint read as '' (list_runs: a page stays small).
LISTED_COLUMNS = tuple("''::bytea" if c == "checkpoint" else c for c in RUN_COLUMNS)

THREAD_COLUMNS = (
    "thread_id",
    "resource_id",
    "metadata",
    "request_id",
    "create_time_ms",
    "update_time_ms",
    "owner",
    "active_run_id",
    "message_count",
)


@contextmanager
def store_errors() -> Iterator[None]:
    """Map a lost or refused connection (and a pool with no free connection in time)
    to StoreUnavailable; other database errors are bugs and propagate as they are."""
    try:
        yield
    except psycopg_pool.PoolTimeout as error:
        raise StoreUnavailable(f"PostgreSQL: no connection available: {error}") from error
    except psycopg.OperationalError as error:
        raise StoreUnavailable(f"PostgreSQL unavailable: {error}") from error


def run_from_row(row: Sequence[Any]) -> RunRecord:
    """A RunRecord from a row of RUN_COLUMNS (or LISTED_COLUMNS)."""
    return RunRecord(
        run_id=row[0],
        agent_id=row[1],
        input=row[2],
        request_id=row[3],
        state=RunState(row[4]),
        create_time_ms=row[5],
        update_time_ms=row[6],
        next_index=row[7],
        earliest_index=row[8],
        epoch=row[9],
        owner=row[10],
        error=row[11],
        checkpoint=bytes(row[12]),
        cancel_reason=row[13],
        decisions=bytes(row[14]),
        thread_id=row[15],
        live_only=row[16],
        terminal_ttl_ms=row[17],
        interrupted_by=row[18],
        rollback=row[19],
        until_idle=row[20],
        last_step=row[21],
        last_attempt=row[22],
        schedule_id=row[23],
        goal=row[24],
        goal_progress=row[25],
        trace_context=row[26],
        tenant=row[27],
    )


def run_params(record: RunRecord) -> dict[str, Any]:
    """The parameters of sql.CREATE_RUN for `record`."""
    return {
        "run_id": record.run_id,
        "agent_id": record.agent_id,
        "input": record.input,
        "request_id": record.request_id,
        "state": record.state.value,
        "create_time_ms": record.create_time_ms,
        "update_time_ms": record.update_time_ms,
        "next_index": record.next_index,
        "earliest_index": record.earliest_index,
        "epoch": record.epoch,
        "owner": record.owner,
        "error": record.error,
        "checkpoint": record.checkpoint,
        "cancel_reason": record.cancel_reason,
        "decisions": record.decisions,
        "thread_id": record.thread_id,
        "live_only": record.live_only,
        "terminal_ttl_ms": record.terminal_ttl_ms,
        "interrupted_by": record.interrupted_by,
        "rollback": record.rollback,
        "until_idle": record.until_idle,
        "last_step": record.last_step,
        "last_attempt": record.last_attempt,
        "schedule_id": record.schedule_id,
        "goal": record.goal,
        "goal_progress": record.goal_progress,
        "trace_context": record.trace_context,
        "tenant": record.tenant,
    }


def thread_from_row(row: Sequence[Any], queued: Sequence[str]) -> ThreadRecord:
    """A ThreadRecord from a row of THREAD_COLUMNS and its queue."""
    metadata = row[2]
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    return ThreadRecord(
        thread_id=row[0],
        resource_id=row[1],
        metadata=dict(metadata),
        request_id=row[3],
        create_time_ms=row[4],
        update_time_ms=row[5],
        owner=row[6],
        active_run_id=row[7],
        queued_run_ids=tuple(queued),
        message_count=row[8],
    )
