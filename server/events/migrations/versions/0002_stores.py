"""The stores beside the event log: background tasks, schedules, push notifications.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Raw SQL; the stores' statements are in server/events/sql.py (TASK_,
SCHEDULE_, PUSH_), and docs/postgres.md explains the tables. Times that
decide anything (leases, slot holds, push holds, expiry) are timestamptz of
the database's clock.

A task lives and expires with its run: tasks and task_logs reference runs
ON DELETE CASCADE, so the log's retention (expire(), which deletes the runs
row) takes them along, and task_log rows go with their task_logs row. Until
the sweep comes, readers join runs and treat a run whose expires_at passed
as gone, as the log does. Schedules belong to no run; push configs expire
by their own expires_at, which the dispatcher sets as their run ends (as
on Redis).

Ids that pages are ordered by are COLLATE "C": byte order, as the Redis
indexes and the memory stores order them.
"""

from __future__ import annotations

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

_TASKS = """
CREATE TABLE tasks (
    task_id text COLLATE "C" PRIMARY KEY,
    run_id text NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    agent_id text NOT NULL,
    tool_name text NOT NULL,
    tool_call_id text NOT NULL,
    args_json text NOT NULL,
    status text NOT NULL,
    create_time_ms bigint NOT NULL,
    update_time_ms bigint NOT NULL,
    timeout_s double precision NOT NULL,
    max_retries integer NOT NULL,
    attempt integer NOT NULL DEFAULT 0,
    failures integer NOT NULL DEFAULT 0,
    progress double precision NOT NULL DEFAULT 0,
    result_json text NOT NULL DEFAULT '',
    error text NOT NULL DEFAULT '',
    epoch bigint NOT NULL DEFAULT 0,
    owner text NOT NULL DEFAULT '',
    not_before_ms bigint NOT NULL DEFAULT 0,
    cancel_reason text NOT NULL DEFAULT '',
    thread_id text NOT NULL DEFAULT '',
    until_idle boolean NOT NULL DEFAULT false,
    tenant text NOT NULL DEFAULT '',
    -- The running attempt's lease (database time); NULL: none.
    lease_until timestamptz,
    -- In the queue, due at this wall-clock ms (compared with the database's); NULL: not.
    queued_ms bigint
);
CREATE INDEX tasks_by_time ON tasks (create_time_ms DESC, task_id DESC);
CREATE INDEX tasks_by_run ON tasks (run_id);
CREATE INDEX tasks_queue ON tasks (queued_ms, task_id) WHERE queued_ms IS NOT NULL;
CREATE INDEX tasks_running ON tasks (lease_until) WHERE status = 'running';

-- A run's task log: its length (the row every append locks, so positions are dense)...
CREATE TABLE task_logs (
    run_id text PRIMARY KEY REFERENCES runs (run_id) ON DELETE CASCADE,
    length bigint NOT NULL DEFAULT 0
);
-- ... and its entries (records.log_entry's JSON), 0, 1, 2, ...
CREATE TABLE task_log (
    run_id text NOT NULL REFERENCES task_logs (run_id) ON DELETE CASCADE,
    pos bigint NOT NULL,
    entry bytea NOT NULL,
    PRIMARY KEY (run_id, pos)
);

-- Who holds the task runner's slots, until when (database time). Not tied to
-- tasks: a hold that is not renewed lapses by itself.
CREATE TABLE task_slots (
    task_id text PRIMARY KEY,
    agent_id text NOT NULL,
    held_until timestamptz NOT NULL
);
"""

_SCHEDULES = """
CREATE TABLE schedules (
    schedule_id text COLLATE "C" PRIMARY KEY,
    record text NOT NULL,  -- ScheduleRecord.encode(): fields of a newer Keel kept as is
    version bigint NOT NULL,
    due_ms bigint,  -- NULL: never due (paused, nothing pending)
    agent_id text NOT NULL,
    owner text NOT NULL,
    create_time_ms bigint NOT NULL
);
CREATE INDEX schedules_due ON schedules (due_ms, schedule_id) WHERE due_ms IS NOT NULL;
CREATE INDEX schedules_by_time ON schedules (create_time_ms DESC, schedule_id DESC);

CREATE TABLE schedule_firings (
    schedule_id text COLLATE "C" NOT NULL
        REFERENCES schedules (schedule_id) ON DELETE CASCADE,
    seq bigint NOT NULL,
    firing text NOT NULL,  -- Firing.encode()
    PRIMARY KEY (schedule_id, seq)
);
"""

_PUSH = """
CREATE TABLE push_runs (
    run_id text PRIMARY KEY,
    -- The index of due runs: NULL not in it, '-infinity' due now, else held by
    -- owner until then (database time) and due again after.
    due_at timestamptz,
    owner text NOT NULL DEFAULT '',
    expires_at timestamptz  -- when the run's configs go (database time); NULL: kept
);
CREATE INDEX push_runs_due ON push_runs (due_at) WHERE due_at IS NOT NULL;
CREATE INDEX push_runs_expiry ON push_runs (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE push_configs (
    run_id text NOT NULL REFERENCES push_runs (run_id) ON DELETE CASCADE,
    config_id text COLLATE "C" NOT NULL,
    config text NOT NULL,  -- PushConfig.encode()
    create_time_ms bigint NOT NULL,
    delivery text,  -- Delivery.encode() of what it was last told; NULL: nothing yet
    PRIMARY KEY (run_id, config_id)
);
"""


def upgrade() -> None:
    op.execute(_TASKS)
    op.execute(_SCHEDULES)
    op.execute(_PUSH)


def downgrade() -> None:
    op.execute(
        "DROP TABLE push_configs, push_runs, schedule_firings, schedules, task_slots, "
        "task_log, task_logs, tasks"
    )
