"""The SQL of PostgresScheduleStore: every statement it runs, in one place.

The tables (server/events/migrations/versions/0002_stores.py):

- schedules: one row per schedule. `record` is the record's JSON exactly as
  ScheduleRecord.encode writes it (so fields of a newer Keel survive), and
  the columns beside it are what the statements select and order by:
  `version` (the compare-and-set token), `due_ms` (NULL: never due; indexed
  where set), and agent_id, owner and create_time_ms for the newest-first
  pages.
- schedule_firings: a schedule's kept firings by (schedule_id, seq), deleted
  with their schedule (ON DELETE CASCADE).

A compare-and-set is one UPDATE whose WHERE names the expected version: two
racing writers queue on the row's lock and the second finds the version
moved on (READ COMMITTED re-evaluates the WHERE on the updated row), so
exactly one wins. Placeholders are psycopg's named ones.
"""

from __future__ import annotations

from typing import LiteralString

# -> (record) when this call made the row; no row when the id is taken.
CREATE: LiteralString = """
INSERT INTO schedules (schedule_id, record, version, due_ms, agent_id, owner, create_time_ms)
VALUES (%(schedule_id)s, %(record)s, 1, %(due_ms)s, %(agent_id)s, %(owner)s,
        %(create_time_ms)s)
ON CONFLICT (schedule_id) DO NOTHING
RETURNING record
"""

# -> (record) of a schedule, or no row.
GET: LiteralString = "SELECT record FROM schedules WHERE schedule_id = %(schedule_id)s"

# -> (record) newest first, strictly after the cursor (NULLs: no cursor, every agent, every
# tenant).
PAGE: LiteralString = """
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
PUT: LiteralString = """
UPDATE schedules
SET record = %(record)s, version = %(expected)s + 1, due_ms = %(due_ms)s
WHERE schedule_id = %(schedule_id)s AND version = %(expected)s
RETURNING 1
"""

# -> (version) of a schedule, or no row.
VERSION: LiteralString = "SELECT version FROM schedules WHERE schedule_id = %(schedule_id)s"

# One firing joins a history (executemany); a seq written twice keeps the later firing.
ADD_FIRING: LiteralString = """
INSERT INTO schedule_firings (schedule_id, seq, firing)
VALUES (%(schedule_id)s, %(seq)s, %(firing)s)
ON CONFLICT (schedule_id, seq) DO UPDATE SET firing = EXCLUDED.firing
"""

# Drop the firings beyond the newest %(kept)s.
TRIM_FIRINGS: LiteralString = """
DELETE FROM schedule_firings
WHERE schedule_id = %(schedule_id)s
  AND seq < (SELECT min(seq) FROM (
        SELECT seq FROM schedule_firings WHERE schedule_id = %(schedule_id)s
        ORDER BY seq DESC LIMIT %(kept)s) AS newest)
"""

# -> one row when deleted (its firings go with it), none when there was no such schedule.
DELETE: LiteralString = "DELETE FROM schedules WHERE schedule_id = %(schedule_id)s RETURNING 1"

# -> (schedule_id) due at or before now_ms, earliest first.
DUE: LiteralString = """
SELECT schedule_id FROM schedules
WHERE due_ms <= %(now_ms)s
ORDER BY due_ms, schedule_id
LIMIT %(limit)s
"""

# -> (min due_ms), NULL when nothing is due ever.
NEXT_DUE: LiteralString = "SELECT min(due_ms) FROM schedules"

# -> (firing) newest first, with seq below before_seq (NULL: any).
FIRINGS: LiteralString = """
SELECT firing FROM schedule_firings
WHERE schedule_id = %(schedule_id)s
  AND (%(before_seq)s::bigint IS NULL OR seq < %(before_seq)s::bigint)
ORDER BY seq DESC
LIMIT %(limit)s
"""
