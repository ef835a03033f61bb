"""Every SQL statement of PostgresEventLog, as keys.py spells every Redis key.

The schema is in server/events/migrations/versions (a revision never
changes once released, so its DDL stays there); these are the statements the
log runs against it. Names are unqualified: each pooled connection has its
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
