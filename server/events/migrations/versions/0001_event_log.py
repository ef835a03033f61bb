"""The event log: runs, their events, tool journal, counters, Resume requests, threads.

Revision ID: 0001
Revises:
Create Date: 2026-12-01

Raw SQL (docs/postgres.md explains the schema). Times that decide anything
(leases, retention) are timestamptz of the database's clock; the *_ms
columns are the API's wall-clock milliseconds. The append of events, with
its checks, its state change, its trimming and its thread hand-over, is one
PL/pgSQL function (append_events), so an append is one round trip.
"""

from __future__ import annotations

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

_TABLES = """
CREATE TABLE runs (
    run_id text PRIMARY KEY,
    agent_id text NOT NULL,
    input text NOT NULL,
    request_id text NOT NULL,
    state text NOT NULL,
    create_time_ms bigint NOT NULL,
    update_time_ms bigint NOT NULL,
    next_index bigint NOT NULL DEFAULT 0,
    earliest_index bigint NOT NULL DEFAULT 0,
    epoch bigint NOT NULL DEFAULT 1,
    owner text NOT NULL DEFAULT '',
    error text NOT NULL DEFAULT '',
    checkpoint bytea NOT NULL DEFAULT '',
    cancel_reason text NOT NULL DEFAULT '',
    decisions bytea NOT NULL DEFAULT '',
    thread_id text NOT NULL DEFAULT '',
    live_only boolean NOT NULL DEFAULT false,
    terminal_ttl_ms bigint NOT NULL DEFAULT 0,
    interrupted_by text NOT NULL DEFAULT '',
    rollback boolean NOT NULL DEFAULT false,
    until_idle boolean NOT NULL DEFAULT false,
    last_step bigint NOT NULL DEFAULT 0,
    last_attempt bigint NOT NULL DEFAULT 0,
    schedule_id text NOT NULL DEFAULT '',
    goal text NOT NULL DEFAULT '',
    goal_progress text NOT NULL DEFAULT '',
    trace_context text NOT NULL DEFAULT '',
    tenant text NOT NULL DEFAULT '',
    -- The owner's lease (database time); NULL: no lease held.
    lease_until timestamptz,
    -- When an ended run's retention time passes (database time); NULL: never.
    expires_at timestamptz
) WITH (fillfactor = 70);
-- fillfactor: appends and renewals update a run's row often; free room on its
-- page lets those updates be HOT (no index touched: no indexed column changes).

CREATE INDEX runs_by_time ON runs (create_time_ms DESC, run_id DESC);
CREATE INDEX runs_by_thread ON runs (thread_id, create_time_ms DESC, run_id DESC)
    WHERE thread_id <> '';
-- claimable's candidates: the runnable runs (the lease is checked on the row,
-- so a renewal, which changes only lease_until, stays a HOT update).
CREATE INDEX runs_runnable ON runs (agent_id) WHERE state IN ('queued', 'running');
CREATE INDEX runs_expiry ON runs (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE events (
    run_id text NOT NULL,
    idx bigint NOT NULL,
    body bytea NOT NULL,  -- a serialized AgentEvent
    PRIMARY KEY (run_id, idx)
);

CREATE TABLE tools (
    run_id text NOT NULL,
    tool_call_id text NOT NULL,
    result bytea NOT NULL,
    PRIMARY KEY (run_id, tool_call_id)
);

CREATE TABLE counters (
    run_id text NOT NULL,
    key text NOT NULL,
    value bigint NOT NULL,
    PRIMARY KEY (run_id, key)
);

CREATE TABLE once_keys (
    run_id text NOT NULL,
    once_key text NOT NULL,
    PRIMARY KEY (run_id, once_key)
);

CREATE TABLE resumes (
    run_id text NOT NULL,
    request_id text NOT NULL,
    record bytea NOT NULL,
    PRIMARY KEY (run_id, request_id)
);

CREATE TABLE threads (
    thread_id text PRIMARY KEY,
    resource_id text NOT NULL,
    metadata jsonb NOT NULL,
    request_id text NOT NULL,
    create_time_ms bigint NOT NULL,
    update_time_ms bigint NOT NULL,
    owner text NOT NULL DEFAULT '',
    active_run_id text NOT NULL DEFAULT '',
    message_count bigint NOT NULL DEFAULT 0,
    -- When an idle thread disappears (thread_idle_ttl_s; database time); NULL: never.
    expires_at timestamptz
);
CREATE INDEX threads_by_time ON threads (create_time_ms DESC, thread_id DESC);
CREATE INDEX threads_expiry ON threads (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE thread_queue (
    thread_id text NOT NULL,
    pos bigserial,
    run_id text NOT NULL,
    PRIMARY KEY (thread_id, pos)
);

CREATE TABLE thread_messages (
    thread_id text NOT NULL,
    pos bigint NOT NULL,
    body bytea NOT NULL,
    PRIMARY KEY (thread_id, pos)
);

-- Entries from outside any run that came while a run had the thread: they
-- join the history after that run's own messages, when it ends.
CREATE TABLE thread_pending (
    thread_id text NOT NULL,
    seq bigserial,
    body bytea NOT NULL,
    PRIMARY KEY (thread_id, seq)
);
"""

# append_events: EventLog.append as one transaction on the database's side.
# status: 0 appended, 1 no such run, 2 stale epoch, 3 index conflict, 4 exact replay.
# A terminal append of a run on a thread locks the thread's row before the run's:
# every writer that locks both does so in that order (no deadlock).
# The run's row is locked FOR NO KEY UPDATE: rows that reference a run (the tasks of
# revision 0002) are inserted meanwhile under FOR KEY SHARE without waiting.
_APPEND = r"""
CREATE FUNCTION append_events(
    p_run_id text, p_epoch bigint, p_first bigint, p_bodies bytea[],
    p_state text, p_error text, p_checkpoint bytea, p_goal_progress text,
    p_thread_messages bytea[], p_retain bigint, p_terminal_ttl_ms bigint,
    p_thread_idle_ttl_ms bigint, p_last_step bigint, p_last_attempt bigint,
    p_channel text, p_payload text,
    OUT status int, OUT next_index bigint, OUT current_epoch bigint)
LANGUAGE plpgsql AS $$
DECLARE
    r runs%ROWTYPE;
    n bigint := coalesce(cardinality(p_bodies), 0);
    now_ts timestamptz := clock_timestamp();
    terminal boolean := p_state IN ('succeeded', 'failed', 'cancelled');
    v_thread text;
BEGIN
    IF terminal THEN
        SELECT thread_id INTO v_thread FROM runs WHERE run_id = p_run_id;
        IF v_thread <> '' THEN
            PERFORM 1 FROM threads WHERE thread_id = v_thread FOR UPDATE;
        END IF;
    END IF;
    SELECT * INTO r FROM runs WHERE run_id = p_run_id FOR NO KEY UPDATE;
    IF NOT FOUND OR r.expires_at <= now_ts THEN
        status := 1;
        RETURN;
    END IF;
    next_index := r.next_index;
    current_epoch := r.epoch;
    IF r.epoch <> p_epoch THEN
        status := 2;
        RETURN;
    END IF;
    IF n > 0 AND p_first <> r.next_index THEN
        IF NOT r.live_only AND p_first >= r.earliest_index AND p_first + n <= r.next_index
           AND (SELECT array_agg(e.body ORDER BY e.idx) FROM events e
                WHERE e.run_id = p_run_id AND e.idx >= p_first AND e.idx < p_first + n)
               = p_bodies THEN
            status := 4;
        ELSE
            status := 3;
        END IF;
        RETURN;
    END IF;
    IF n > 0 THEN
        IF r.live_only THEN
            r.last_step := p_last_step;
            r.last_attempt := p_last_attempt;
        ELSE
            INSERT INTO events (run_id, idx, body)
            SELECT p_run_id, p_first + u.o - 1, u.b
            FROM unnest(p_bodies) WITH ORDINALITY AS u(b, o);
        END IF;
        r.next_index := r.next_index + n;
    END IF;
    IF p_checkpoint IS NOT NULL THEN
        r.checkpoint := p_checkpoint;
    END IF;
    IF p_goal_progress IS NOT NULL THEN
        r.goal_progress := p_goal_progress;
    END IF;
    IF p_state IS NOT NULL THEN
        r.state := p_state;
        r.error := p_error;
        IF p_state NOT IN ('queued', 'running') THEN
            r.lease_until := NULL;
        END IF;
        IF terminal THEN
            r.expires_at := now_ts + make_interval(secs => (CASE WHEN r.terminal_ttl_ms > 0
                THEN r.terminal_ttl_ms ELSE p_terminal_ttl_ms END) / 1000.0);
        END IF;
    END IF;
    r.update_time_ms := (extract(epoch FROM now_ts) * 1000)::bigint;
    IF p_retain > 0 AND r.next_index - p_retain > r.earliest_index THEN
        r.earliest_index := r.next_index - p_retain;
        DELETE FROM events WHERE run_id = p_run_id AND idx < r.earliest_index;
    END IF;
    UPDATE runs SET
        next_index = r.next_index, earliest_index = r.earliest_index,
        checkpoint = r.checkpoint, goal_progress = r.goal_progress,
        state = r.state, error = r.error, lease_until = r.lease_until,
        expires_at = r.expires_at, update_time_ms = r.update_time_ms,
        last_step = r.last_step, last_attempt = r.last_attempt
    WHERE run_id = p_run_id;
    IF terminal AND r.thread_id <> '' THEN
        PERFORM release_thread(r, p_thread_messages, p_thread_idle_ttl_ms, now_ts);
    END IF;
    IF n > 0 AND p_payload IS NOT NULL THEN
        PERFORM pg_notify(p_channel, p_payload);
    END IF;
    status := 0;
    next_index := r.next_index;
END
$$;
"""

# Step 5 of EventLog.append: an ended run leaves its thread (the caller holds
# the thread's row lock).
_RELEASE_THREAD = r"""
CREATE FUNCTION release_thread(
    r runs, p_messages bytea[], p_idle_ttl_ms bigint, now_ts timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    t threads%ROWTYPE;
    v_pos bigint;
    v_queued text;
    v_next text := '';
    now_ms bigint := (extract(epoch FROM now_ts) * 1000)::bigint;
BEGIN
    SELECT * INTO t FROM threads WHERE thread_id = r.thread_id;
    IF NOT FOUND OR t.expires_at <= now_ts THEN
        RETURN;
    END IF;
    IF t.active_run_id <> r.run_id THEN
        DELETE FROM thread_queue WHERE thread_id = t.thread_id AND run_id = r.run_id;
        UPDATE threads SET update_time_ms = now_ms WHERE thread_id = t.thread_id;
        RETURN;
    END IF;
    v_pos := t.message_count;
    IF NOT r.rollback AND p_messages IS NOT NULL THEN
        INSERT INTO thread_messages (thread_id, pos, body)
        SELECT t.thread_id, v_pos + u.o - 1, u.m FROM unnest(p_messages) WITH ORDINALITY AS u(m, o);
        v_pos := v_pos + cardinality(p_messages);
    END IF;
    WITH pending AS (
        DELETE FROM thread_pending WHERE thread_id = t.thread_id RETURNING seq, body
    )
    INSERT INTO thread_messages (thread_id, pos, body)
    SELECT t.thread_id, v_pos + row_number() OVER (ORDER BY seq) - 1, body FROM pending;
    LOOP
        DELETE FROM thread_queue WHERE thread_id = t.thread_id AND thread_queue.pos = (
            SELECT min(q.pos) FROM thread_queue q WHERE q.thread_id = t.thread_id)
        RETURNING run_id INTO v_queued;
        EXIT WHEN NOT FOUND;
        UPDATE runs SET state = 'queued', lease_until = NULL
        WHERE run_id = v_queued AND state = 'enqueued'
            AND (expires_at IS NULL OR expires_at > now_ts);
        IF FOUND THEN
            v_next := v_queued;
            EXIT;
        END IF;
    END LOOP;
    UPDATE threads SET
        active_run_id = v_next,
        message_count = (SELECT coalesce(max(m.pos) + 1, 0) FROM thread_messages m
                         WHERE m.thread_id = t.thread_id),
        update_time_ms = now_ms,
        expires_at = CASE WHEN v_next = '' AND p_idle_ttl_ms > 0
            THEN now_ts + make_interval(secs => p_idle_ttl_ms / 1000.0) END
    WHERE thread_id = t.thread_id;
END
$$;
"""

# An entry from outside any run (a late task result) for a thread: to its history
# if it is idle, else after the active run's own messages, when that run ends.
# A thread that is gone takes nothing. For the stores beside the log.
_ADD_TO_THREAD = r"""
CREATE FUNCTION add_to_thread(p_thread_id text, p_entry bytea, p_idle_ttl_ms bigint)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    t threads%ROWTYPE;
    now_ts timestamptz := clock_timestamp();
BEGIN
    SELECT * INTO t FROM threads WHERE thread_id = p_thread_id FOR UPDATE;
    IF NOT FOUND OR t.expires_at <= now_ts THEN
        RETURN;
    END IF;
    IF t.active_run_id <> '' THEN
        INSERT INTO thread_pending (thread_id, body) VALUES (p_thread_id, p_entry);
        RETURN;
    END IF;
    INSERT INTO thread_messages (thread_id, pos, body)
        VALUES (p_thread_id, t.message_count, p_entry);
    UPDATE threads SET
        message_count = t.message_count + 1,
        update_time_ms = (extract(epoch FROM now_ts) * 1000)::bigint,
        expires_at = CASE WHEN p_idle_ttl_ms > 0
            THEN now_ts + make_interval(secs => p_idle_ttl_ms / 1000.0) END
    WHERE thread_id = p_thread_id;
END
$$;
"""

# Drop the rows of a run (its record and everything that lives and expires with it).
_PURGE_RUNS = r"""
CREATE FUNCTION purge_runs(p_run_ids text[]) RETURNS void LANGUAGE sql AS $$
    DELETE FROM events WHERE run_id = ANY(p_run_ids);
    DELETE FROM tools WHERE run_id = ANY(p_run_ids);
    DELETE FROM counters WHERE run_id = ANY(p_run_ids);
    DELETE FROM once_keys WHERE run_id = ANY(p_run_ids);
    DELETE FROM resumes WHERE run_id = ANY(p_run_ids);
$$;
"""

_PURGE_THREADS = r"""
CREATE FUNCTION purge_threads(p_thread_ids text[]) RETURNS void LANGUAGE sql AS $$
    DELETE FROM thread_messages WHERE thread_id = ANY(p_thread_ids);
    DELETE FROM thread_queue WHERE thread_id = ANY(p_thread_ids);
    DELETE FROM thread_pending WHERE thread_id = ANY(p_thread_ids);
$$;
"""

# Retention: delete up to p_limit runs and threads whose time passed, skipping
# rows another transaction holds (an append never waits for the sweep).
_EXPIRE = r"""
CREATE FUNCTION expire(p_limit int) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
    run_ids text[];
    thread_ids text[];
BEGIN
    WITH gone AS (
        DELETE FROM runs WHERE run_id IN (
            SELECT run_id FROM runs WHERE expires_at <= clock_timestamp()
            ORDER BY expires_at LIMIT p_limit FOR UPDATE SKIP LOCKED)
        RETURNING run_id)
    SELECT array_agg(run_id) INTO run_ids FROM gone;
    IF run_ids IS NOT NULL THEN
        PERFORM purge_runs(run_ids);
    END IF;
    WITH gone AS (
        DELETE FROM threads WHERE thread_id IN (
            SELECT thread_id FROM threads WHERE expires_at <= clock_timestamp()
            ORDER BY expires_at LIMIT p_limit FOR UPDATE SKIP LOCKED)
        RETURNING thread_id)
    SELECT array_agg(thread_id) INTO thread_ids FROM gone;
    IF thread_ids IS NOT NULL THEN
        PERFORM purge_threads(thread_ids);
    END IF;
    RETURN coalesce(cardinality(run_ids), 0) + coalesce(cardinality(thread_ids), 0);
END
$$;
"""


def upgrade() -> None:
    op.execute(_TABLES)
    op.execute(_PURGE_RUNS)
    op.execute(_PURGE_THREADS)
    op.execute(_RELEASE_THREAD)
    op.execute(_APPEND)
    op.execute(_ADD_TO_THREAD)
    op.execute(_EXPIRE)


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION expire, add_to_thread, append_events, release_thread, "
        "purge_threads, purge_runs; "
        "DROP TABLE thread_pending, thread_messages, thread_queue, threads, resumes, "
        "once_keys, counters, tools, events, runs"
    )
