"""The SQL of PostgresPushStore: every statement it runs, in one place.

The tables (server/events/migrations/versions/0002_stores.py):

- push_runs: one row per run with push state. `due_at` is the index of due
  runs (NULL: not in it; '-infinity': due now; a time: held by `owner`
  until then, due again after), `expires_at` when its configs go (NULL:
  kept). Every time is the database's clock (clock_timestamp()), never a
  server's.
- push_configs: a run's configs by (run_id, config_id), each with what it
  was last told (`delivery`, NULL: nothing yet), deleted with their
  push_runs row (ON DELETE CASCADE).

A run whose `expires_at` passed reads as having nothing: every read filters
on it, the next put_config of the run deletes what is left, and expire()
deletes, a batch at a time, whatever expired anywhere. Placeholders are
psycopg's named ones.
"""

from __future__ import annotations

from typing import LiteralString

_LIVE: LiteralString = "(r.expires_at IS NULL OR r.expires_at > clock_timestamp())"

# put_config, in one transaction: the run's row, locked, made due now with its hold ended
# -> (expired: whether its configs had expired) ...
PUT_RUN: LiteralString = """
INSERT INTO push_runs AS r (run_id, due_at, owner, expires_at)
VALUES (%(run_id)s, '-infinity', '', NULL)
ON CONFLICT (run_id) DO UPDATE SET due_at = '-infinity', owner = ''
RETURNING r.expires_at IS NOT NULL AND r.expires_at <= clock_timestamp()
"""

# ... the expired configs gone ...
FORGET_CONFIGS: LiteralString = "DELETE FROM push_configs WHERE run_id = %(run_id)s"

# ... -> (count, exists): how many configs the run has, and whether this id is one ...
COUNT_CONFIGS: LiteralString = """
SELECT count(*), coalesce(bool_or(config_id = %(config_id)s), false)
FROM push_configs WHERE run_id = %(run_id)s
"""

# ... the config stored (or replaced) with no delivery ...
PUT_CONFIG: LiteralString = """
INSERT INTO push_configs (run_id, config_id, config, create_time_ms, delivery)
VALUES (%(run_id)s, %(config_id)s, %(config)s, %(create_time_ms)s, NULL)
ON CONFLICT (run_id, config_id) DO UPDATE
SET config = EXCLUDED.config, create_time_ms = EXCLUDED.create_time_ms, delivery = NULL
"""

# ... and the run's configs kept (no expiry).
KEEP: LiteralString = "UPDATE push_runs SET expires_at = NULL WHERE run_id = %(run_id)s"

# -> (config) of a live run, oldest first.
CONFIGS: LiteralString = (
    """
SELECT c.config FROM push_configs c JOIN push_runs r USING (run_id)
WHERE c.run_id = %(run_id)s AND """
    + _LIVE
    + """
ORDER BY c.create_time_ms, c.config_id
"""
)

# -> one row when a config was deleted (its delivery with it).
DELETE_CONFIG: LiteralString = (
    """
DELETE FROM push_configs c USING push_runs r
WHERE c.run_id = %(run_id)s AND c.config_id = %(config_id)s AND r.run_id = c.run_id AND """
    + _LIVE
    + """
RETURNING 1
"""
)

# -> (config_id, delivery) of a live run's configs that were told something.
DELIVERIES: LiteralString = (
    """
SELECT c.config_id, c.delivery FROM push_configs c JOIN push_runs r USING (run_id)
WHERE c.run_id = %(run_id)s AND c.delivery IS NOT NULL AND """
    + _LIVE
)

# A config's delivery state; nothing when the config is gone.
RECORD: LiteralString = (
    """
UPDATE push_configs c SET delivery = %(delivery)s FROM push_runs r
WHERE c.run_id = %(run_id)s AND c.config_id = %(config_id)s AND r.run_id = c.run_id AND """
    + _LIVE
)

# -> (run_id) of up to %(limit)s due runs, earliest first, now held by %(owner)s. Rows
# another claim has locked are skipped: two servers never claim one run.
CLAIM: LiteralString = """
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
RENEW: LiteralString = """
UPDATE push_runs SET due_at = clock_timestamp() + %(hold_ms)s * interval '1 millisecond'
WHERE run_id = %(run_id)s AND owner = %(owner)s AND due_at IS NOT NULL
RETURNING 1
"""

# The run leaves the index, if %(owner)s holds it.
RELEASE: LiteralString = """
UPDATE push_runs SET due_at = NULL, owner = ''
WHERE run_id = %(run_id)s AND owner = %(owner)s
"""

# The run is due now, unless it is in the index already (due, or held).
MARK_DUE: LiteralString = """
INSERT INTO push_runs AS r (run_id, due_at, owner, expires_at)
VALUES (%(run_id)s, '-infinity', '', NULL)
ON CONFLICT (run_id) DO UPDATE SET due_at = '-infinity' WHERE r.due_at IS NULL
"""

# The run leaves the index and its configs go in %(ttl_ms)s.
EXPIRE: LiteralString = """
UPDATE push_runs
SET due_at = NULL, owner = '',
    expires_at = clock_timestamp() + %(ttl_ms)s * interval '1 millisecond'
WHERE run_id = %(run_id)s
"""

# The run's push state goes now (its configs with it).
FORGET: LiteralString = "DELETE FROM push_runs WHERE run_id = %(run_id)s"

# Up to %(limit)s runs whose configs expired go (the index on expires_at finds them).
SWEEP: LiteralString = """
DELETE FROM push_runs WHERE run_id IN (
  SELECT run_id FROM push_runs
  WHERE expires_at <= clock_timestamp()
  LIMIT %(limit)s
  FOR UPDATE SKIP LOCKED)
"""
