"""Every SQL statement of the PostgreSQL store, as keys.py spells every Redis key: the
event log's (PostgresEventLog), then those of the stores beside it, each section with
its prefix (TASK_, SCHEDULE_, PUSH_).

The schema is in server/events/migrations/versions (a revision never
changes once released, so its DDL stays there); these are the statements the
store runs against it. Names are unqualified: each pooled connection has its
search_path set to the store's schema.

Conventions:
- LIVE is the test that hides a run whose retention time passed but that the
  sweep (EXPIRE) has not deleted yet: reads treat it as gone at once.
- Times that decide anything use the database's clock (clock_timestamp()),
  never the instance's: leases and retention agree across instances whatever
  their clocks say. NOW_MS is that clock in the API's milliseconds.
- A write that concerns one run is one statement (a CTE, or a function of
  the schema: append_events), so it is atomic and one round trip; the few
  thread operations that need decisions between steps are transactions.
"""

from __future__ import annotations

from typing import LiteralString

from server.events.postgres_records import LISTED_COLUMNS, RUN_COLUMNS, THREAD_COLUMNS

LIVE = "(expires_at IS NULL OR expires_at > clock_timestamp())"
NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
RUNNABLE = "state IN ('queued', 'running')"
TERMINAL = "state IN ('succeeded', 'failed', 'cancelled')"
LEASE = "clock_timestamp() + %(lease_ttl_ms)s * interval '1 millisecond'"

_RUN = ", ".join(RUN_COLUMNS)
_LISTED = ", ".join(LISTED_COLUMNS)
_THREAD = ", ".join(THREAD_COLUMNS)
_QUEUE = "ARRAY(SELECT q.run_id FROM thread_queue q WHERE q.thread_id = t.thread_id ORDER BY q.pos)"

# A new run (parameters: postgres_records.run_params, plus leased and lease_ttl_ms);
# rowcount 0 when the id is taken.
CREATE_RUN = f"""
INSERT INTO runs ({_RUN}, lease_until)
VALUES ({", ".join(f"%({column})s" for column in RUN_COLUMNS)},
        CASE WHEN %(leased)s THEN {LEASE} END)
ON CONFLICT (run_id) DO NOTHING
"""

# A run whose retention time passed but which the sweep has not deleted yet,
# deleted now with everything that lives with it (its id is taken again).
PURGE_EXPIRED_RUN = """
WITH gone AS (
    DELETE FROM runs WHERE run_id = %s AND expires_at <= clock_timestamp() RETURNING run_id
)
SELECT purge_runs(array_agg(run_id)) FROM gone
"""

GET_RUN = f"SELECT {_RUN} FROM runs WHERE run_id = %s AND {LIVE}"
GET_RUN_FOR_UPDATE = f"SELECT {_RUN} FROM runs WHERE run_id = %s AND {LIVE} FOR NO KEY UPDATE"
HEAD = f"SELECT next_index FROM runs WHERE run_id = %s AND {LIVE}"
EXISTS = f"SELECT 1 FROM runs WHERE run_id = %s AND {LIVE}"


def list_runs(
    *, agent_id: bool, states: bool, thread_id: bool, schedule_id: bool, tenant: bool, after: bool
) -> str:
    """ListRuns' page, newest first, with the filters that are set (named parameters of
    the same names; `after` takes after_time and after_id)."""
    where = [LIVE]
    if agent_id:
        where.append("agent_id = %(agent_id)s")
    if states:
        where.append("state = ANY(%(states)s::text[])")
    if thread_id:
        # A thread's runs are listed while the thread exists (as on the other logs).
        where.append("thread_id = %(thread_id)s")
        where.append(
            "EXISTS (SELECT 1 FROM threads t WHERE t.thread_id = %(thread_id)s "
            "AND (t.expires_at IS NULL OR t.expires_at > clock_timestamp()))"
        )
    if schedule_id:
        where.append("schedule_id = %(schedule_id)s")
    if tenant:
        where.append("tenant = %(tenant)s")
    if after:
        where.append("(create_time_ms, run_id) < (%(after_time)s, %(after_id)s)")
    return (
        f"SELECT {_LISTED} FROM runs WHERE {' AND '.join(where)} "
        "ORDER BY create_time_ms DESC, run_id DESC LIMIT %(limit)s"
    )


# EventLog.append in one call (the function's contract: migrations/versions/0001).
APPEND = """
SELECT status, next_index, current_epoch FROM append_events(
    %s::text, %s::bigint, %s::bigint, %s::bytea[], %s::text, %s::text, %s::bytea, %s::text,
    %s::bytea[], %s::bigint, %s::bigint, %s::bigint, %s::bigint, %s::bigint, %s::text, %s::text)
"""

# The run's bounds and up to `limit` event bodies from `offset` (never below the
# earliest retained index), in one round trip.
READ = f"""
SELECT r.next_index, r.earliest_index, r.live_only,
       ARRAY(SELECT e.body FROM events e
             WHERE e.run_id = r.run_id AND e.idx >= greatest(%(offset)s, r.earliest_index)
             ORDER BY e.idx LIMIT %(limit)s)
FROM runs r WHERE r.run_id = %(run_id)s AND {LIVE}
"""

# Ownership. Runnable runs never expire, so these need no LIVE test.
CLAIM = f"""
UPDATE runs SET epoch = epoch + 1, owner = %(owner)s, lease_until = {LEASE}
WHERE run_id = %(run_id)s AND {RUNNABLE}
  AND (%(force)s OR lease_until IS NULL OR lease_until < clock_timestamp())
RETURNING {_RUN}
"""
RENEW = f"""
UPDATE runs SET lease_until = {LEASE}
WHERE run_id = %(run_id)s AND epoch = %(epoch)s AND {RUNNABLE}
"""
RELEASE = "UPDATE runs SET lease_until = NULL WHERE run_id = %s AND epoch = %s"


def claimable(*, agent_ids: bool) -> str:
    """Runnable runs whose lease lapsed (the partial index runs_runnable), oldest lease first."""
    agents = " AND agent_id = ANY(%(agent_ids)s::text[])" if agent_ids else ""
    return (
        f"SELECT run_id FROM runs WHERE {RUNNABLE}{agents} "
        "AND (lease_until IS NULL OR lease_until < clock_timestamp()) "
        "ORDER BY lease_until NULLS FIRST LIMIT %(limit)s"
    )


# The tool journal: the run's epoch (None: no run) and, at that epoch, the result
# stored unless one is.
JOURNAL_TOOL = f"""
WITH r AS (SELECT run_id, epoch FROM runs WHERE run_id = %(run_id)s AND {LIVE}),
stored AS (
    INSERT INTO tools (run_id, tool_call_id, result)
    SELECT run_id, %(tool_call_id)s, %(result)s FROM r WHERE epoch = %(epoch)s
    ON CONFLICT (run_id, tool_call_id) DO NOTHING
)
SELECT epoch FROM r
"""
JOURNALED_TOOL = f"""
SELECT t.result FROM tools t JOIN runs r ON r.run_id = t.run_id
WHERE t.run_id = %s AND t.tool_call_id = %s AND {LIVE}
"""

# Resume's compare-and-set on a suspended run's epoch; no row: not suspended at that
# epoch (or no run).
DECIDE = f"""
WITH u AS (
    UPDATE runs SET
        epoch = epoch + 1, decisions = %(decisions)s, update_time_ms = {NOW_MS},
        state = CASE WHEN %(resume)s THEN 'queued' ELSE state END,
        owner = CASE WHEN %(resume)s THEN %(owner)s ELSE owner END,
        lease_until = CASE WHEN %(resume)s THEN {LEASE} ELSE lease_until END
    WHERE run_id = %(run_id)s AND state = 'suspended' AND epoch = %(expected_epoch)s
    RETURNING {_RUN}
),
request AS (
    INSERT INTO resumes (run_id, request_id, record)
    SELECT run_id, %(request_id)s, %(request_record)s FROM u WHERE %(request_id)s <> ''
    ON CONFLICT (run_id, request_id) DO UPDATE SET record = EXCLUDED.record
)
SELECT {_RUN} FROM u
"""
RESUME_REQUEST = f"""
SELECT s.record FROM resumes s JOIN runs r ON r.run_id = s.run_id
WHERE s.run_id = %s AND s.request_id = %s AND {LIVE}
"""

# The control notification of a cancel request: the run id and its stored (first)
# reason, cut so that the payload stays under NOTIFY's 8000 bytes.
_CANCEL_PAYLOAD = "'c' || length(run_id) || ':' || run_id || left(cancel_reason, 1500)"

# A cancel request on a run that has not ended (no row: ended, or no run); an
# ownerless run (suspended, enqueued) becomes queued so that some instance
# claims it and writes its abort. Notifies the owner at commit.
REQUEST_CANCEL = f"""
WITH u AS (
    UPDATE runs SET
        cancel_reason = CASE WHEN cancel_reason = '' THEN %(reason)s ELSE cancel_reason END,
        update_time_ms = CASE WHEN cancel_reason = '' THEN {NOW_MS} ELSE update_time_ms END,
        lease_until = CASE WHEN state IN ('suspended', 'enqueued') THEN NULL
                      ELSE lease_until END,
        state = CASE WHEN state IN ('suspended', 'enqueued') THEN 'queued' ELSE state END,
        interrupted_by = CASE WHEN cancel_reason = '' THEN %(interrupted_by)s
                         ELSE interrupted_by END,
        rollback = rollback OR %(rollback)s
    WHERE run_id = %(run_id)s AND NOT {TERMINAL}
    RETURNING {_RUN}
)
SELECT {_RUN}, pg_notify(%(channel)s, {_CANCEL_PAYLOAD})::text FROM u
"""

# Counters: (whether the run exists, the incremented value or None, the value before).
INCR_COUNTER = f"""
WITH r AS (SELECT run_id FROM runs WHERE run_id = %(run_id)s AND {LIVE}),
once AS (
    INSERT INTO once_keys (run_id, once_key)
    SELECT run_id, %(once_key)s FROM r WHERE %(once_key)s <> ''
    ON CONFLICT (run_id, once_key) DO NOTHING
    RETURNING 1
),
up AS (
    INSERT INTO counters (run_id, key, value)
    SELECT run_id, %(key)s, 1 FROM r WHERE %(once_key)s = '' OR EXISTS (SELECT 1 FROM once)
    ON CONFLICT (run_id, key) DO UPDATE SET value = counters.value + 1
    RETURNING value
)
SELECT EXISTS (SELECT 1 FROM r), (SELECT value FROM up),
       (SELECT value FROM counters WHERE run_id = %(run_id)s AND key = %(key)s)
"""
GET_COUNTER = f"""
SELECT c.value FROM counters c JOIN runs r ON r.run_id = c.run_id
WHERE c.run_id = %s AND c.key = %s AND {LIVE}
"""

# Threads.

IDLE_UNTIL = (
    "CASE WHEN %(idle_ttl_ms)s > 0 "
    "THEN clock_timestamp() + %(idle_ttl_ms)s * interval '1 millisecond' END"
)
CREATE_THREAD = f"""
INSERT INTO threads (thread_id, resource_id, metadata, request_id, create_time_ms,
                     update_time_ms, owner, expires_at)
VALUES (%(thread_id)s, %(resource_id)s, %(metadata)s, %(request_id)s, %(create_time_ms)s,
        %(update_time_ms)s, %(owner)s, {IDLE_UNTIL})
ON CONFLICT (thread_id) DO NOTHING
"""
PURGE_EXPIRED_THREAD = """
WITH gone AS (
    DELETE FROM threads WHERE thread_id = %s AND expires_at <= clock_timestamp()
    RETURNING thread_id
)
SELECT purge_threads(array_agg(thread_id)) FROM gone
"""
GET_THREAD = f"SELECT {_THREAD}, {_QUEUE} FROM threads t WHERE thread_id = %s AND {LIVE}"
LOCK_THREAD = f"""
SELECT {_THREAD}, {_QUEUE} FROM threads t WHERE thread_id = %s AND {LIVE} FOR UPDATE
"""
DELETE_THREAD = "DELETE FROM threads WHERE thread_id = %s"
PURGE_THREAD = "SELECT purge_threads(ARRAY[%s])"
THREAD_MESSAGES = f"""
SELECT ARRAY(SELECT m.body FROM thread_messages m
             WHERE m.thread_id = t.thread_id AND m.pos >= %s AND m.pos < %s ORDER BY m.pos)
FROM threads t WHERE thread_id = %s AND {LIVE}
"""
# The thread's new active run (a started run on an idle thread): it is busy, so it never expires.
ACTIVATE_THREAD = f"""
UPDATE threads SET active_run_id = %s, expires_at = NULL, update_time_ms = {NOW_MS}
WHERE thread_id = %s
"""
ENQUEUE = f"""
WITH q AS (INSERT INTO thread_queue (thread_id, run_id) VALUES (%(thread_id)s, %(run_id)s))
UPDATE threads SET update_time_ms = {NOW_MS} WHERE thread_id = %(thread_id)s
"""
# An entry from outside any run (a late task result); see add_to_thread in 0001.
ADD_TO_THREAD = "SELECT add_to_thread(%s, %s, %s)"


def list_threads(*, resource_id: bool, tenant: bool, after: bool) -> str:
    """ListThreads' page, newest first, with the filters that are set."""
    where = [LIVE]
    if resource_id:
        where.append("resource_id = %(resource_id)s")
    if tenant:
        where.append("owner = %(tenant)s")
    if after:
        where.append("(create_time_ms, thread_id) < (%(after_time)s, %(after_id)s)")
    return (
        f"SELECT {_THREAD}, {_QUEUE} FROM threads t WHERE {' AND '.join(where)} "
        "ORDER BY create_time_ms DESC, thread_id DESC LIMIT %(limit)s"
    )


# Retention: up to %s ended runs and idle threads whose time passed, deleted in one
# short transaction that skips rows others hold (0001's expire); returns how many.
EXPIRE = "SELECT expire(%s)"

PING = "SELECT 1"

# A notification on the store's channel (a new subscription's marker, pg_fanout.py).
NOTIFY = "SELECT pg_notify(%s, %s)::text"

# The one LISTEN of a process (the channel is the schema's name, quoted by the caller).
LISTEN = "LISTEN {channel}"

# Migrations (pg_migrate.py, through SQLAlchemy: named parameters are :name; the
# schema is quoted by the caller).
MIGRATION_LOCK = "SELECT pg_advisory_lock(hashtext(:key))"
MIGRATION_UNLOCK = "SELECT pg_advisory_unlock(hashtext(:key))"
CREATE_SCHEMA = "CREATE SCHEMA IF NOT EXISTS {schema}"
SET_SEARCH_PATH = "SET search_path TO {schema}"


# -----------------------------------------------------------------------------
# Background tasks (PostgresTaskStore, server/tasks/postgres.py)
#
# The SQL of PostgresTaskStore: every statement it runs, in one place.
#
# The tables (server/events/migrations/versions/0002_stores.py):
#
# - tasks: a row per task, its TaskRecord's fields as columns, and beside them
#   `lease_until` (the running attempt's lease, database time) and
#   `queued_ms` (the queue: NULL when the task is not in it, else when it is
#   due, compared with the database's wall clock). A task references its run
#   ON DELETE CASCADE: it goes when the log's retention deletes the run.
# - task_logs / task_log: a run's task log. task_logs holds its length, and
#   every append increments it (row-locked), so the positions of a run's
#   entries are dense and in commit order whatever the number of writers.
# - task_slots: the holders of the runner's slots, until when (database time).
#
# Every change of a task is one transaction of postgres.py: LOCK (the task's
# row, FOR UPDATE) and the checks, then SAVE, APPEND_LOG and NOTIFY; the
# notification is sent when the transaction commits, so a listener woken by
# it always finds the entry. Locks are taken in one order, task, then the
# run's task_logs row, then (a late result) the thread, and the log's
# retention takes runs, then their tasks: no cycle. A run whose retention
# passed is gone for every reader (the `_LIVE` join), before the log's sweep
# deletes it.

# The TaskRecord's fields, in its order (postgres.py builds records from them).
TASK_COLUMNS: tuple[LiteralString, ...] = (
    "task_id",
    "run_id",
    "agent_id",
    "tool_name",
    "tool_call_id",
    "args_json",
    "status",
    "create_time_ms",
    "update_time_ms",
    "timeout_s",
    "max_retries",
    "attempt",
    "failures",
    "progress",
    "result_json",
    "error",
    "epoch",
    "owner",
    "not_before_ms",
    "cancel_reason",
    "thread_id",
    "until_idle",
    "tenant",
)
_TASK_SELECTED: LiteralString = ", ".join("t." + c for c in TASK_COLUMNS)
_TASK_LIVE: LiteralString = "(r.expires_at IS NULL OR r.expires_at > clock_timestamp())"
_TASK_NOW_MS: LiteralString = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"

# create_task: the run, live, kept from the sweep until the task's row exists -> one row ...
TASK_LOCK_RUN: LiteralString = (
    "SELECT 1 FROM runs r WHERE r.run_id = %(run_id)s AND " + _TASK_LIVE + " FOR KEY SHARE"
)

# ... the task, queued now by the database's clock (which "due" compares with, so a
# creator's clock never delays it) -> one row, or none when its id exists ...
TASK_CREATE: LiteralString = (
    "INSERT INTO tasks ("
    + ", ".join(TASK_COLUMNS)
    + ", queued_ms) VALUES ("
    + ", ".join(f"%({c})s" for c in TASK_COLUMNS)
    + ", "
    + _TASK_NOW_MS
    + ") ON CONFLICT (task_id) DO NOTHING RETURNING 1"
)

# ... -> COLUMNS of the task that has the id.
TASK_GET: LiteralString = (
    "SELECT "
    + _TASK_SELECTED
    + " FROM tasks t JOIN runs r USING (run_id) WHERE t.task_id = %(task_id)s AND "
    + _TASK_LIVE
)

# The first step of every change: -> COLUMNS, leased (its lease runs), queued_ms, now_ms
# (the database's wall clock), with the task's row locked; no row for an unknown task.
TASK_LOCK: LiteralString = (
    "SELECT "
    + _TASK_SELECTED
    + ", coalesce(t.lease_until >= clock_timestamp(), false), t.queued_ms, "
    + _TASK_NOW_MS
    + " FROM tasks t JOIN runs r USING (run_id) WHERE t.task_id = %(task_id)s AND "
    + _TASK_LIVE
    + " FOR UPDATE OF t"
)

# The task's new state (the task's row is locked). `lease`: 'take' a fresh lease of
# lease_ms, 'drop' it, or 'keep' it; `queued_ms`: NULL takes it out of the queue.
TASK_SAVE: LiteralString = """
UPDATE tasks SET
    status = %(status)s, attempt = %(attempt)s, failures = %(failures)s,
    progress = %(progress)s, result_json = %(result_json)s, error = %(error)s,
    epoch = %(epoch)s, owner = %(owner)s, not_before_ms = %(not_before_ms)s,
    cancel_reason = %(cancel_reason)s, update_time_ms = %(update_time_ms)s,
    lease_until = CASE %(lease)s::text
        WHEN 'take' THEN clock_timestamp() + %(lease_ms)s * interval '1 millisecond'
        WHEN 'drop' THEN NULL
        ELSE lease_until END,
    queued_ms = %(queued_ms)s
WHERE task_id = %(task_id)s
"""

# An entry at the end of the run's task log (its task_logs row is the lock).
TASK_APPEND_LOG: LiteralString = """
WITH counted AS (
    INSERT INTO task_logs AS l (run_id, length) VALUES (%(run_id)s, 1)
    ON CONFLICT (run_id) DO UPDATE SET length = l.length + 1
    RETURNING length)
INSERT INTO task_log (run_id, pos, entry) SELECT %(run_id)s, length - 1, %(entry)s FROM counted
"""

# A doorbell of the run's task channel, rung when the transaction commits.
TASK_NOTIFY: LiteralString = "SELECT pg_notify(%(channel)s, %(payload)s)"

# A late result for its thread (the log's add_to_thread: the history of an idle thread,
# else after the active run's own messages).
TASK_ADD_TO_THREAD: LiteralString = (
    "SELECT add_to_thread(%(thread_id)s, %(entry)s, %(idle_ttl_ms)s)"
)

# -> (entry) of the run's task log from position `start`.
TASK_LOG_ENTRIES: LiteralString = (
    "SELECT l.entry FROM task_log l JOIN runs r USING (run_id)"
    " WHERE l.run_id = %(run_id)s AND l.pos >= %(start)s AND " + _TASK_LIVE + " ORDER BY l.pos"
)

# -> COLUMNS of the run's tasks.
TASK_RUN_TASKS: LiteralString = (
    "SELECT "
    + _TASK_SELECTED
    + " FROM tasks t JOIN runs r USING (run_id) WHERE t.run_id = %(run_id)s AND "
    + _TASK_LIVE
)

# -> COLUMNS newest first, strictly after the cursor, filtered (NULL or '': no filter).
TASK_LIST: LiteralString = (
    "SELECT "
    + _TASK_SELECTED
    + " FROM tasks t JOIN runs r USING (run_id) WHERE "
    + _TASK_LIVE
    + """
  AND (%(after_ms)s::bigint IS NULL
       OR (t.create_time_ms, t.task_id) < (%(after_ms)s::bigint, %(after_id)s::text))
  AND (%(run_id)s::text = '' OR t.run_id = %(run_id)s::text)
  AND (%(agent_id)s::text = '' OR t.agent_id = %(agent_id)s::text)
  AND (%(tenant)s::text IS NULL OR t.tenant = %(tenant)s::text)
  AND (cardinality(%(statuses)s::text[]) = 0 OR t.status = ANY(%(statuses)s::text[]))
ORDER BY t.create_time_ms DESC, t.task_id DESC
LIMIT %(limit)s
"""
)

# -> (task_id) of queued tasks whose time has come, oldest first.
TASK_DUE: LiteralString = (
    "SELECT t.task_id FROM tasks t JOIN runs r USING (run_id) WHERE t.queued_ms <= "
    + _TASK_NOW_MS
    + " AND "
    + _TASK_LIVE
    + " ORDER BY t.queued_ms, t.task_id LIMIT %(limit)s"
)

# -> one row when the attempt at the epoch is running (its lease now renewed), with
# whether a cancel request waits.
TASK_RENEW: LiteralString = (
    """
UPDATE tasks t SET lease_until = clock_timestamp() + %(lease_ms)s * interval '1 millisecond'
FROM runs r
WHERE t.task_id = %(task_id)s AND t.status = 'running' AND t.epoch = %(epoch)s
  AND r.run_id = t.run_id AND """
    + _TASK_LIVE
    + """
RETURNING t.cancel_reason <> ''
"""
)

# -> (task_id) of up to %(limit)s running tasks whose lease lapsed, now in the queue
# (a task queued already keeps its place). Rows another transaction holds are skipped.
TASK_LAPSED: LiteralString = (
    "UPDATE tasks SET queued_ms = coalesce(queued_ms, "
    + _TASK_NOW_MS
    + """)
WHERE task_id IN (
    SELECT t.task_id FROM tasks t JOIN runs r USING (run_id)
    WHERE t.status = 'running' AND (t.lease_until IS NULL OR t.lease_until < clock_timestamp())
      AND """
    + _TASK_LIVE
    + """
    LIMIT %(limit)s
    FOR UPDATE OF t SKIP LOCKED)
RETURNING task_id
"""
)

# acquire_slot, in one transaction: one acquirer at a time (renewals and releases wait
# for it too, briefly) ...
TASK_LOCK_SLOTS: LiteralString = "LOCK TABLE task_slots IN SHARE ROW EXCLUSIVE MODE"

# ... the holds that lapsed go ...
TASK_DROP_LAPSED_SLOTS: LiteralString = (
    "DELETE FROM task_slots WHERE held_until < clock_timestamp()"
)

# ... -> (1 held | 0 every global slot taken | -1 the agent's taken), the slot taken
# (or its hold renewed) when 1.
TASK_ACQUIRE_SLOT: LiteralString = """
WITH live AS (
    SELECT count(*) AS total,
           count(*) FILTER (WHERE agent_id = %(agent_id)s) AS agent,
           coalesce(bool_or(task_id = %(task_id)s), false) AS mine
    FROM task_slots),
verdict AS (
    SELECT CASE WHEN mine THEN 1
                WHEN total >= %(global_limit)s THEN 0
                WHEN %(agent_limit)s > 0 AND agent >= %(agent_limit)s THEN -1
                ELSE 1 END AS held
    FROM live),
taken AS (
    INSERT INTO task_slots (task_id, agent_id, held_until)
    SELECT %(task_id)s, %(agent_id)s,
           clock_timestamp() + %(lease_ms)s * interval '1 millisecond'
    FROM verdict WHERE held = 1
    ON CONFLICT (task_id) DO UPDATE
    SET agent_id = EXCLUDED.agent_id, held_until = EXCLUDED.held_until)
SELECT held FROM verdict
"""

# The task's hold, extended (nothing if it holds no slot).
TASK_RENEW_SLOT: LiteralString = """
UPDATE task_slots SET held_until = clock_timestamp() + %(lease_ms)s * interval '1 millisecond'
WHERE task_id = %(task_id)s
"""

TASK_RELEASE_SLOT: LiteralString = "DELETE FROM task_slots WHERE task_id = %(task_id)s"


# -----------------------------------------------------------------------------
# Schedules (PostgresScheduleStore, server/schedules/postgres.py)
#
# The SQL of PostgresScheduleStore: every statement it runs, in one place.
#
# The tables (server/events/migrations/versions/0002_stores.py):
#
# - schedules: one row per schedule. `record` is the record's JSON exactly as
#   ScheduleRecord.encode writes it (so fields of a newer Keel survive), and
#   the columns beside it are what the statements select and order by:
#   `version` (the compare-and-set token), `due_ms` (NULL: never due; indexed
#   where set), and agent_id, owner and create_time_ms for the newest-first
#   pages.
# - schedule_firings: a schedule's kept firings by (schedule_id, seq), deleted
#   with their schedule (ON DELETE CASCADE).
#
# A compare-and-set is one UPDATE whose WHERE names the expected version: two
# racing writers queue on the row's lock and the second finds the version
# moved on (READ COMMITTED re-evaluates the WHERE on the updated row), so
# exactly one wins. Placeholders are psycopg's named ones.

# -> (record) when this call made the row; no row when the id is taken.
SCHEDULE_CREATE: LiteralString = """
INSERT INTO schedules (schedule_id, record, version, due_ms, agent_id, owner, create_time_ms)
VALUES (%(schedule_id)s, %(record)s, 1, %(due_ms)s, %(agent_id)s, %(owner)s,
        %(create_time_ms)s)
ON CONFLICT (schedule_id) DO NOTHING
RETURNING record
"""

# -> (record) of a schedule, or no row.
SCHEDULE_GET: LiteralString = "SELECT record FROM schedules WHERE schedule_id = %(schedule_id)s"

# -> (record) newest first, strictly after the cursor (NULLs: no cursor, every agent, every
# tenant).
SCHEDULE_PAGE: LiteralString = """
SELECT record FROM schedules
WHERE (%(after_ms)s::bigint IS NULL
       OR (create_time_ms, schedule_id) < (%(after_ms)s::bigint, %(after_id)s::text))
  AND (%(agent_id)s::text = '' OR agent_id = %(agent_id)s::text)
  AND (%(tenant)s::text IS NULL OR owner = %(tenant)s::text)
ORDER BY create_time_ms DESC, schedule_id DESC
LIMIT %(limit)s
"""

# The compare-and-set. -> one row when it won; none when the row is gone or its version
# is not the expected one (VERSION tells which).
SCHEDULE_PUT: LiteralString = """
UPDATE schedules
SET record = %(record)s, version = %(expected)s + 1, due_ms = %(due_ms)s
WHERE schedule_id = %(schedule_id)s AND version = %(expected)s
RETURNING 1
"""

# -> (version) of a schedule, or no row.
SCHEDULE_VERSION: LiteralString = (
    "SELECT version FROM schedules WHERE schedule_id = %(schedule_id)s"
)

# One firing joins a history (executemany); a seq written twice keeps the later firing.
SCHEDULE_ADD_FIRING: LiteralString = """
INSERT INTO schedule_firings (schedule_id, seq, firing)
VALUES (%(schedule_id)s, %(seq)s, %(firing)s)
ON CONFLICT (schedule_id, seq) DO UPDATE SET firing = EXCLUDED.firing
"""

# Drop the firings beyond the newest %(kept)s.
SCHEDULE_TRIM_FIRINGS: LiteralString = """
DELETE FROM schedule_firings
WHERE schedule_id = %(schedule_id)s
  AND seq < (SELECT min(seq) FROM (
        SELECT seq FROM schedule_firings WHERE schedule_id = %(schedule_id)s
        ORDER BY seq DESC LIMIT %(kept)s) AS newest)
"""

# -> one row when deleted (its firings go with it), none when there was no such schedule.
SCHEDULE_DELETE: LiteralString = (
    "DELETE FROM schedules WHERE schedule_id = %(schedule_id)s RETURNING 1"
)

# -> (schedule_id) due at or before now_ms, earliest first.
SCHEDULE_DUE: LiteralString = """
SELECT schedule_id FROM schedules
WHERE due_ms <= %(now_ms)s
ORDER BY due_ms, schedule_id
LIMIT %(limit)s
"""

# -> (min due_ms), NULL when nothing is due ever.
SCHEDULE_NEXT_DUE: LiteralString = "SELECT min(due_ms) FROM schedules"

# -> (firing) newest first, with seq below before_seq (NULL: any).
SCHEDULE_FIRINGS: LiteralString = """
SELECT firing FROM schedule_firings
WHERE schedule_id = %(schedule_id)s
  AND (%(before_seq)s::bigint IS NULL OR seq < %(before_seq)s::bigint)
ORDER BY seq DESC
LIMIT %(limit)s
"""


# -----------------------------------------------------------------------------
# Push notifications (PostgresPushStore, server/a2a/push/postgres.py)
#
# The SQL of PostgresPushStore: every statement it runs, in one place.
#
# The tables (server/events/migrations/versions/0002_stores.py):
#
# - push_runs: one row per run with push state. `due_at` is the index of due
#   runs (NULL: not in it; '-infinity': due now; a time: held by `owner`
#   until then, due again after), `expires_at` when its configs go (NULL:
#   kept). Every time is the database's clock (clock_timestamp()), never a
#   server's.
# - push_configs: a run's configs by (run_id, config_id), each with what it
#   was last told (`delivery`, NULL: nothing yet), deleted with their
#   push_runs row (ON DELETE CASCADE).
#
# A run whose `expires_at` passed reads as having nothing: every read filters
# on it, the next put_config of the run deletes what is left, and expire()
# deletes, a batch at a time, whatever expired anywhere. Placeholders are
# psycopg's named ones.

_PUSH_LIVE: LiteralString = "(r.expires_at IS NULL OR r.expires_at > clock_timestamp())"

# put_config, in one transaction: the run's row, locked, made due now with its hold ended
# -> (expired: whether its configs had expired) ...
PUSH_PUT_RUN: LiteralString = """
INSERT INTO push_runs AS r (run_id, due_at, owner, expires_at)
VALUES (%(run_id)s, '-infinity', '', NULL)
ON CONFLICT (run_id) DO UPDATE SET due_at = '-infinity', owner = ''
RETURNING r.expires_at IS NOT NULL AND r.expires_at <= clock_timestamp()
"""

# ... the expired configs gone ...
PUSH_FORGET_CONFIGS: LiteralString = "DELETE FROM push_configs WHERE run_id = %(run_id)s"

# ... -> (count, exists): how many configs the run has, and whether this id is one ...
PUSH_COUNT_CONFIGS: LiteralString = """
SELECT count(*), coalesce(bool_or(config_id = %(config_id)s), false)
FROM push_configs WHERE run_id = %(run_id)s
"""

# ... the config stored (or replaced) with no delivery ...
PUSH_PUT_CONFIG: LiteralString = """
INSERT INTO push_configs (run_id, config_id, config, create_time_ms, delivery)
VALUES (%(run_id)s, %(config_id)s, %(config)s, %(create_time_ms)s, NULL)
ON CONFLICT (run_id, config_id) DO UPDATE
SET config = EXCLUDED.config, create_time_ms = EXCLUDED.create_time_ms, delivery = NULL
"""

# ... and the run's configs kept (no expiry).
PUSH_KEEP: LiteralString = "UPDATE push_runs SET expires_at = NULL WHERE run_id = %(run_id)s"

# -> (config) of a live run, oldest first.
PUSH_CONFIGS: LiteralString = (
    """
SELECT c.config FROM push_configs c JOIN push_runs r USING (run_id)
WHERE c.run_id = %(run_id)s AND """
    + _PUSH_LIVE
    + """
ORDER BY c.create_time_ms, c.config_id
"""
)

# -> one row when a config was deleted (its delivery with it).
PUSH_DELETE_CONFIG: LiteralString = (
    """
DELETE FROM push_configs c USING push_runs r
WHERE c.run_id = %(run_id)s AND c.config_id = %(config_id)s AND r.run_id = c.run_id AND """
    + _PUSH_LIVE
    + """
RETURNING 1
"""
)

# -> (config_id, delivery) of a live run's configs that were told something.
PUSH_DELIVERIES: LiteralString = (
    """
SELECT c.config_id, c.delivery FROM push_configs c JOIN push_runs r USING (run_id)
WHERE c.run_id = %(run_id)s AND c.delivery IS NOT NULL AND """
    + _PUSH_LIVE
)

# A config's delivery state; nothing when the config is gone.
PUSH_RECORD: LiteralString = (
    """
UPDATE push_configs c SET delivery = %(delivery)s FROM push_runs r
WHERE c.run_id = %(run_id)s AND c.config_id = %(config_id)s AND r.run_id = c.run_id AND """
    + _PUSH_LIVE
)

# -> (run_id) of up to %(limit)s due runs, earliest first, now held by %(owner)s. Rows
# another claim has locked are skipped: two servers never claim one run.
PUSH_CLAIM: LiteralString = """
UPDATE push_runs SET due_at = clock_timestamp() + %(hold_ms)s * interval '1 millisecond',
                     owner = %(owner)s
WHERE run_id IN (
  SELECT run_id FROM push_runs
  WHERE due_at <= clock_timestamp()
  ORDER BY due_at, run_id
  LIMIT %(limit)s
  FOR UPDATE SKIP LOCKED)
RETURNING run_id
"""

# -> one row when %(owner)s held the run (and now holds it %(hold_ms)s longer).
PUSH_RENEW: LiteralString = """
UPDATE push_runs SET due_at = clock_timestamp() + %(hold_ms)s * interval '1 millisecond'
WHERE run_id = %(run_id)s AND owner = %(owner)s AND due_at IS NOT NULL
RETURNING 1
"""

# The run leaves the index, if %(owner)s holds it.
PUSH_RELEASE: LiteralString = """
UPDATE push_runs SET due_at = NULL, owner = ''
WHERE run_id = %(run_id)s AND owner = %(owner)s
"""

# The run is due now, unless it is in the index already (due, or held).
PUSH_MARK_DUE: LiteralString = """
INSERT INTO push_runs AS r (run_id, due_at, owner, expires_at)
VALUES (%(run_id)s, '-infinity', '', NULL)
ON CONFLICT (run_id) DO UPDATE SET due_at = '-infinity' WHERE r.due_at IS NULL
"""

# The run leaves the index and its configs go in %(ttl_ms)s.
PUSH_EXPIRE: LiteralString = """
UPDATE push_runs
SET due_at = NULL, owner = '',
    expires_at = clock_timestamp() + %(ttl_ms)s * interval '1 millisecond'
WHERE run_id = %(run_id)s
"""

# The run's push state goes now (its configs with it).
PUSH_FORGET: LiteralString = "DELETE FROM push_runs WHERE run_id = %(run_id)s"

# Up to %(limit)s runs whose configs expired go (the index on expires_at finds them).
PUSH_SWEEP: LiteralString = """
DELETE FROM push_runs WHERE run_id IN (
  SELECT run_id FROM push_runs
  WHERE expires_at <= clock_timestamp()
  LIMIT %(limit)s
  FOR UPDATE SKIP LOCKED)
"""
