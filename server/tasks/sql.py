"""The SQL of PostgresTaskStore: every statement it runs, in one place.

The tables (server/events/migrations/versions/0002_stores.py):

- tasks: a row per task, its TaskRecord's fields as columns, and beside them
  `lease_until` (the running attempt's lease, database time) and
  `queued_ms` (the queue: NULL when the task is not in it, else when it is
  due, compared with the database's wall clock). A task references its run
  ON DELETE CASCADE: it goes when the log's retention deletes the run.
- task_logs / task_log: a run's task log. task_logs holds its length, and
  every append increments it (row-locked), so the positions of a run's
  entries are dense and in commit order whatever the number of writers.
- task_slots: the holders of the runner's slots, until when (database time).

Every change of a task is one transaction of postgres.py: LOCK (the task's
row, FOR UPDATE) and the checks, then SAVE, APPEND_LOG and NOTIFY; the
notification is sent when the transaction commits, so a listener woken by
it always finds the entry. Locks are taken in one order, task, then the
run's task_logs row, then (a late result) the thread, and the log's
retention takes runs, then their tasks: no cycle. A run whose retention
passed is gone for every reader (the `_LIVE` join), before the log's sweep
deletes it.
"""

from __future__ import annotations

from typing import LiteralString

# The TaskRecord's fields, in its order (postgres.py builds records from them).
COLUMNS: tuple[LiteralString, ...] = (
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
_SELECTED: LiteralString = ", ".join("t." + c for c in COLUMNS)
_LIVE: LiteralString = "(r.expires_at IS NULL OR r.expires_at > clock_timestamp())"
_NOW_MS: LiteralString = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"

# create_task: the run, live, kept from the sweep until the task's row exists -> one row ...
LOCK_RUN: LiteralString = (
    "SELECT 1 FROM runs r WHERE r.run_id = %(run_id)s AND " + _LIVE + " FOR KEY SHARE"
)

# ... the task, queued now by the database's clock (which "due" compares with, so a
# creator's clock never delays it) -> one row, or none when its id exists ...
CREATE: LiteralString = (
    "INSERT INTO tasks ("
    + ", ".join(COLUMNS)
    + ", queued_ms) VALUES ("
    + ", ".join(f"%({c})s" for c in COLUMNS)
    + ", "
    + _NOW_MS
    + ") ON CONFLICT (task_id) DO NOTHING RETURNING 1"
)

# ... -> COLUMNS of the task that has the id.
GET: LiteralString = (
    "SELECT "
    + _SELECTED
    + " FROM tasks t JOIN runs r USING (run_id) WHERE t.task_id = %(task_id)s AND "
    + _LIVE
)

# The first step of every change: -> COLUMNS, leased (its lease runs), queued_ms, now_ms
# (the database's wall clock), with the task's row locked; no row for an unknown task.
LOCK: LiteralString = (
    "SELECT "
    + _SELECTED
    + ", coalesce(t.lease_until >= clock_timestamp(), false), t.queued_ms, "
    + _NOW_MS
    + " FROM tasks t JOIN runs r USING (run_id) WHERE t.task_id = %(task_id)s AND "
    + _LIVE
    + " FOR UPDATE OF t"
)

# The task's new state (the task's row is locked). `lease`: 'take' a fresh lease of
# lease_ms, 'drop' it, or 'keep' it; `queued_ms`: NULL takes it out of the queue.
SAVE: LiteralString = """
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
APPEND_LOG: LiteralString = """
WITH counted AS (
    INSERT INTO task_logs AS l (run_id, length) VALUES (%(run_id)s, 1)
    ON CONFLICT (run_id) DO UPDATE SET length = l.length + 1
    RETURNING length)
INSERT INTO task_log (run_id, pos, entry) SELECT %(run_id)s, length - 1, %(entry)s FROM counted
"""

# A doorbell of the run's task channel, rung when the transaction commits.
NOTIFY: LiteralString = "SELECT pg_notify(%(channel)s, %(payload)s)"

# A late result for its thread (the log's add_to_thread: the history of an idle thread,
# else after the active run's own messages).
ADD_TO_THREAD: LiteralString = "SELECT add_to_thread(%(thread_id)s, %(entry)s, %(idle_ttl_ms)s)"

# -> (entry) of the run's task log from position `start`.
TASK_LOG: LiteralString = (
    "SELECT l.entry FROM task_log l JOIN runs r USING (run_id)"
    " WHERE l.run_id = %(run_id)s AND l.pos >= %(start)s AND " + _LIVE + " ORDER BY l.pos"
)

# -> COLUMNS of the run's tasks.
RUN_TASKS: LiteralString = (
    "SELECT "
    + _SELECTED
    + " FROM tasks t JOIN runs r USING (run_id) WHERE t.run_id = %(run_id)s AND "
    + _LIVE
)

# -> COLUMNS newest first, strictly after the cursor, filtered (NULL or '': no filter).
LIST: LiteralString = (
    "SELECT "
    + _SELECTED
    + " FROM tasks t JOIN runs r USING (run_id) WHERE "
    + _LIVE
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
DUE: LiteralString = (
    "SELECT t.task_id FROM tasks t JOIN runs r USING (run_id) WHERE t.queued_ms <= "
    + _NOW_MS
    + " AND "
    + _LIVE
    + " ORDER BY t.queued_ms, t.task_id LIMIT %(limit)s"
)

# -> one row when the attempt at the epoch is running (its lease now renewed), with
# whether a cancel request waits.
RENEW: LiteralString = (
    """
UPDATE tasks t SET lease_until = clock_timestamp() + %(lease_ms)s * interval '1 millisecond'
FROM runs r
WHERE t.task_id = %(task_id)s AND t.status = 'running' AND t.epoch = %(epoch)s
  AND r.run_id = t.run_id AND """
    + _LIVE
    + """
RETURNING t.cancel_reason <> ''
"""
)

# -> (task_id) of up to %(limit)s running tasks whose lease lapsed, now in the queue
# (a task queued already keeps its place). Rows another transaction holds are skipped.
LAPSED: LiteralString = (
    "UPDATE tasks SET queued_ms = coalesce(queued_ms, "
    + _NOW_MS
    + """)
WHERE task_id IN (
    SELECT t.task_id FROM tasks t JOIN runs r USING (run_id)
    WHERE t.status = 'running' AND (t.lease_until IS NULL OR t.lease_until < clock_timestamp())
      AND """
    + _LIVE
    + """
    LIMIT %(limit)s
    FOR UPDATE OF t SKIP LOCKED)
RETURNING task_id
"""
)

# acquire_slot, in one transaction: one acquirer at a time (renewals and releases wait
# for it too, briefly) ...
LOCK_SLOTS: LiteralString = "LOCK TABLE task_slots IN SHARE ROW EXCLUSIVE MODE"

# ... the holds that lapsed go ...
DROP_LAPSED_SLOTS: LiteralString = "DELETE FROM task_slots WHERE held_until < clock_timestamp()"

# ... -> (1 held | 0 every global slot taken | -1 the agent's taken), the slot taken
# (or its hold renewed) when 1.
ACQUIRE_SLOT: LiteralString = """
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
RENEW_SLOT: LiteralString = """
UPDATE task_slots SET held_until = clock_timestamp() + %(lease_ms)s * interval '1 millisecond'
WHERE task_id = %(task_id)s
"""

RELEASE_SLOT: LiteralString = "DELETE FROM task_slots WHERE task_id = %(task_id)s"
