"""Every Redis key and channel Keel uses, spelled in one place.

All keys live under one prefix (default "keel") so that tests, or two Keel
deployments sharing a Redis, isolate themselves by prefix and never flush.
Every key of a run carries the `{run_id}` hash tag, so they share one hash
slot and one Lua script can touch them all, on Redis Cluster too:

    {prefix}:{run_id}:events    ZSET    score = index, member = serialized AgentEvent
                                        (unique because each event carries its index)
    {prefix}:{run_id}:run       HASH    the run's record, fields in RunField
    {prefix}:{run_id}:lease     STRING  the owner's epoch, PX = lease TTL; absent = claimable
    {prefix}:{run_id}:tools     HASH    the tool journal: tool_call_id -> result
    {prefix}:{run_id}:counters  HASH    counters of incr_counter (test tools)
    {prefix}:{run_id}:once      HASH    once_key -> 1: idempotency keys incr_counter has seen
    {prefix}:{run_id}:live      pub/sub channel: a serialized EventBatch per append
    {prefix}:{run_id}:control   pub/sub channel: a cancel request's reason (UTF-8)
    {prefix}:runs               ZSET    the run index for list_runs, see run_index_member
    {prefix}:active             SET     ids of runs that may need an owner (claimable's
                                        safety net and cleanup)
    {prefix}:lease_deadlines    ZSET    run ids, score = when the run's lease lapses (unix
                                        ms, Redis's clock) or when it must be looked at:
                                        claimable reads only the members whose time came

A thread's keys carry the `{thread_id}` hash tag, and so do the keys of the
runs made on it: such a run's id is "<thread_id>:<32 hex digits>" and its
keys are `{prefix}:{thread_id}:<32 hex digits>:events`, and so on. So a
run's terminal append, which also writes its thread, and a run's start,
which decides against the thread's state, are each one script on one slot:

    {prefix}:{thread_id}:thread    HASH  the thread's record, fields in ThreadField
    {prefix}:{thread_id}:messages  LIST  the history: one entry per ModelMessage (threads/)
    {prefix}:{thread_id}:queue     LIST  ids of the runs waiting for their turn, FIFO
    {prefix}:{thread_id}:runs      ZSET  the thread's runs, for list_runs(thread_id=...)
    {prefix}:{thread_id}:pending   LIST  entries that came while a run had the thread
                                         (late task results), added after its own messages
    {prefix}:threads               ZSET  the thread index for list_threads
    {prefix}:resource:{resource_id}:threads  ZSET  one resource's threads

A run's background tasks live beside it, in its slot (server/tasks):

    <run keys>:task:<16 hex>        HASH    a task's record, fields in TaskField
    <run keys>:task:<16 hex>:lease  STRING  its runner's epoch, PX = lease TTL
    <run keys>:tasks                SET     the ids of the run's tasks
    <run keys>:task_log             LIST    the run's task log (JSON entries, records.py)
    <run keys>:task_events          pub/sub channel: "log" (the log grew) or
                                            "cancel:<task id>" (for its runner)

and the task runner's shared keys under one hash tag of their own:

    {prefix}:{tasks}:queue          ZSET    ids of the tasks waiting, score = when due (ms)
    {prefix}:{tasks}:slots          ZSET    holders of the global slots, score = expiry (ms)
    {prefix}:{tasks}:slots:<agent>  ZSET    holders of an agent's slots, score = expiry (ms)
    {prefix}:{tasks}:running        SET     ids of running tasks (sweeps look for lapsed leases)
    {prefix}:{tasks}:index          ZSET    every task, for list_tasks (members as the run index)

A2A push notifications (server/a2a/push) keep each task's configs and what was
delivered to each beside its run, in its slot, and one index of the runs whose
notifications someone must look after, under a hash tag of their own:

    <run keys>:push                 HASH    config id -> the config (JSON, push/records.py)
    <run keys>:push_sent            HASH    config id -> its delivery state (JSON)
    {prefix}:{push}:due             ZSET    run ids, score = until when a dispatcher holds
                                            it (unix ms, Redis's clock); due once passed
    {prefix}:{push}:owners          HASH    run id -> the dispatcher (instance) holding it

Schedules (server/schedules) all live under one hash tag, so each change of a
schedule, with its place in the due index and its history, is one script:

    {prefix}:{schedules}:records        HASH  schedule id -> the record (JSON, records.py)
    {prefix}:{schedules}:due            ZSET  schedule ids, score = when due (ms); paused: absent
    {prefix}:{schedules}:index          ZSET  every schedule, for list (members as the run index)
    {prefix}:{schedules}:firings:<id>   ZSET  a schedule's kept firings, score = seq

The run index, the active set, the lease deadlines, the thread indexes, the
task runner's keys and the push index are the only keys outside a run's (or thread's) slot, so the
Lua scripts never write them; a write that needs them updates them in a second
command after its script. On Redis Cluster each of them is one key in a known
slot, not sharded: each is read whole by every server (a sweep, a list call),
and its traffic follows the runs' lives, not their events (docs/redis.md). The
channels carry their run's hash tag too, so a script's SPUBLISH goes to the
node of its slot (redis_client.py, shards.py).
Stale members are removed lazily: by list_runs and list_threads (hash
expired or deleted) and by claimable (run ended, suspended or expired).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class RunField(enum.StrEnum):
    """The fields of a run's hash. The Lua scripts in scripts.py spell the same names."""

    STATE = "state"  # a RunState value
    AGENT_ID = "agent_id"
    INPUT = "input"
    REQUEST_ID = "request_id"
    OWNER = "owner"  # id of the instance executing the run
    EPOCH = "epoch"  # fencing token; appends must carry it
    NEXT_INDEX = "next_index"  # index of the next event
    EARLIEST_INDEX = "earliest_index"  # smallest retained index
    CREATE_TIME_MS = "create_time_ms"  # unix ms
    UPDATE_TIME_MS = "update_time_ms"  # unix ms
    ERROR = "error"  # error message (failed) or reason (cancelled)
    CHECKPOINT = "checkpoint"  # the executor's opaque checkpoint (binary)
    CANCEL_REASON = "cancel_reason"  # non-empty once a cancel was requested
    DECISIONS = "decisions"  # Resume's decisions so far (the executor's JSON)
    THREAD_ID = "thread_id"  # the run's thread, or absent
    LIVE_ONLY = "live_only"  # "1": events are published, never stored
    TTL_MS = "ttl_ms"  # retention once ended, in ms; absent or 0: the log's default
    INTERRUPTED_BY = "interrupted_by"  # the run whose INTERRUPT/ROLLBACK cancelled this one
    ROLLBACK = "rollback"  # "1": the run's messages must not join its thread
    UNTIL_IDLE = "until_idle"  # "1": the run waits for its background tasks
    LAST_STEP = "last_step"  # a live-only run's last event's step (its events are not kept)
    LAST_ATTEMPT = "last_attempt"  # ... and attempt
    SCHEDULE_ID = "schedule_id"  # the schedule that started the run, or absent
    GOAL = "goal"  # the run's goal (JSON), or absent
    GOAL_PROGRESS = "goal_progress"  # how far its judge got, or absent
    TRACE_CONTEXT = "trace_context"  # the W3C trace context of the request that made it
    TENANT = "tenant"  # the tenant that owns the run, or absent for the default one
    LINEAGE = "lineage"  # which store incarnation wrote which events (lineage.py), by APPEND
    INCARNATION = "incarnation"  # the last incarnation in the lineage (APPEND compares it)


class ThreadField(enum.StrEnum):
    """The fields of a thread's hash. The Lua scripts spell the same names."""

    RESOURCE_ID = "resource_id"
    METADATA = "metadata"  # JSON object of strings
    REQUEST_ID = "request_id"
    OWNER = "owner"
    CREATE_TIME_MS = "create_time_ms"
    UPDATE_TIME_MS = "update_time_ms"
    ACTIVE_RUN_ID = "active_run_id"  # "" when idle


# Zero-padded so that the lexicographic order of run index members is the
# numeric order of create times (15 digits of unix ms last until year 33658).
_TIME_DIGITS = 15


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix."""

    prefix: str = "keel"

    def run_base(self, run_id: str) -> str:
        """What every key of the run starts with: its slot's hash tag, then its own part."""
        thread_id, on_thread, own = run_id.partition(":")
        if on_thread:
            return f"{self.thread_base(thread_id)}{own}:"
        return f"{self.prefix}:{{{run_id}}}:"

    def events(self, run_id: str) -> str:
        return f"{self.run_base(run_id)}events"

    def run(self, run_id: str) -> str:
        return f"{self.run_base(run_id)}run"

    def lease(self, run_id: str) -> str:
        """The owner's lease; it expires by itself, and a terminal state deletes it."""
        return f"{self.run_base(run_id)}lease"

    def tools(self, run_id: str) -> str:
        return f"{self.run_base(run_id)}tools"

    def counters(self, run_id: str) -> str:
        return f"{self.run_base(run_id)}counters"

    def once(self, run_id: str) -> str:
        return f"{self.run_base(run_id)}once"

    def resumes(self, run_id: str) -> str:
        """HASH of Resume request ids -> what they decided (idempotent retries)."""
        return f"{self.run_base(run_id)}resumes"

    def live(self, run_id: str) -> str:
        """The pub/sub channel announcing the run's appended events."""
        return f"{self.run_base(run_id)}live"

    def control(self, run_id: str) -> str:
        """The pub/sub channel of requests to the run's owner (cancel)."""
        return f"{self.run_base(run_id)}control"

    # Threads, and the runs made on them (see the module docstring).

    def thread_base(self, thread_id: str) -> str:
        """What every key of the thread, and of each of its runs, starts with.

        The Lua scripts build the keys of a thread's other runs from it:
        thread_base + (run id after "<thread_id>:") + ":run".
        """
        return f"{self.prefix}:{{{thread_id}}}:"

    def thread(self, thread_id: str) -> str:
        return f"{self.thread_base(thread_id)}thread"

    def thread_messages(self, thread_id: str) -> str:
        return f"{self.thread_base(thread_id)}messages"

    def thread_queue(self, thread_id: str) -> str:
        return f"{self.thread_base(thread_id)}queue"

    def thread_runs(self, thread_id: str) -> str:
        """ZSET of the thread's runs, members as in the run index."""
        return f"{self.thread_base(thread_id)}runs"

    def thread_pending(self, thread_id: str) -> str:
        """LIST of entries waiting for the active run to end (late task results)."""
        return f"{self.thread_base(thread_id)}pending"

    def thread_keys(self, thread_id: str) -> tuple[str, str, str, str, str]:
        """Every key of a thread: what the idle TTL applies to and DeleteThread deletes.
        The Lua scripts rely on this order."""
        return (
            self.thread(thread_id),
            self.thread_messages(thread_id),
            self.thread_queue(thread_id),
            self.thread_runs(thread_id),
            self.thread_pending(thread_id),
        )

    # Background tasks (server/tasks): beside their run, and the runner's shared keys.

    def task(self, task_id: str) -> str:
        """A task's hash; a task id is "<run id>.<16 hex>" (server/tasks/records.py)."""
        run_id, _, digest = task_id.rpartition(".")
        return f"{self.run_base(run_id)}task:{digest}"

    def task_lease(self, task_id: str) -> str:
        return f"{self.task(task_id)}:lease"

    def run_tasks(self, run_id: str) -> str:
        """SET of the ids of the run's tasks."""
        return f"{self.run_base(run_id)}tasks"

    def task_log(self, run_id: str) -> str:
        """LIST: the run's task log."""
        return f"{self.run_base(run_id)}task_log"

    def task_events(self, run_id: str) -> str:
        """The pub/sub channel of the run's task doorbells and cancel requests."""
        return f"{self.run_base(run_id)}task_events"

    @property
    def task_queue(self) -> str:
        return f"{self.prefix}:{{tasks}}:queue"

    @property
    def task_slots(self) -> str:
        return f"{self.prefix}:{{tasks}}:slots"

    def agent_task_slots(self, agent_id: str) -> str:
        return f"{self.prefix}:{{tasks}}:slots:{agent_id}"

    @property
    def running_tasks(self) -> str:
        return f"{self.prefix}:{{tasks}}:running"

    @property
    def task_index(self) -> str:
        return f"{self.prefix}:{{tasks}}:index"

    # Schedules (server/schedules): one hash tag for all of them.

    @property
    def schedule_records(self) -> str:
        return f"{self.prefix}:{{schedules}}:records"

    @property
    def schedules_due(self) -> str:
        return f"{self.prefix}:{{schedules}}:due"

    @property
    def schedule_index(self) -> str:
        return f"{self.prefix}:{{schedules}}:index"

    def schedule_firings(self, schedule_id: str) -> str:
        return f"{self.prefix}:{{schedules}}:firings:{schedule_id}"

    # A2A push notifications (server/a2a/push).

    def push_configs(self, run_id: str) -> str:
        return f"{self.run_base(run_id)}:push"

    def push_deliveries(self, run_id: str) -> str:
        return f"{self.run_base(run_id)}:push_sent"

    @property
    def push_due(self) -> str:
        return f"{self.prefix}:{{push}}:due"

    @property
    def push_owners(self) -> str:
        return f"{self.prefix}:{{push}}:owners"

    @property
    def thread_index(self) -> str:
        """ZSET of all threads, every score 0, members as in the run index."""
        return f"{self.prefix}:threads"

    def resource_threads(self, resource_id: str) -> str:
        """ZSET of one resource's threads (resource ids hold no braces: no hash tag)."""
        return f"{self.prefix}:resource:{resource_id}:threads"

    def run_keys(self, run_id: str) -> tuple[str, str, str, str, str, str, str, str]:
        """Every key of a run but the lease and its tasks' own (and not the channels): what
        a terminal state puts a TTL on. The run hash and the events come first (APPEND
        relies on it)."""
        return (
            self.run(run_id),
            self.events(run_id),
            self.tools(run_id),
            self.counters(run_id),
            self.once(run_id),
            self.resumes(run_id),
            self.run_tasks(run_id),
            self.task_log(run_id),
        )

    @property
    def run_index(self) -> str:
        """ZSET of all runs, every score 0, read newest first with ZREVRANGEBYLEX."""
        return f"{self.prefix}:runs"

    @property
    def active_runs(self) -> str:
        """SET of the ids of runs that were last seen runnable (claimable's candidates)."""
        return f"{self.prefix}:active"

    @property
    def lease_deadlines(self) -> str:
        """ZSET of run ids by when their lease lapses (unix ms, Redis's clock; redis.py
        explains who writes it): claimable looks only at the members whose time came."""
        return f"{self.prefix}:lease_deadlines"

    @property
    def pubsub_client_name(self) -> str:
        """CLIENT SETNAME of the pub/sub connection, so CLIENT LIST shows whose it is."""
        return f"{self.prefix}:pubsub".replace(" ", "_")


def run_index_member(create_time_ms: int, run_id: str) -> str:
    """The index member of a run (or thread): lexicographic order is (create_time_ms, id)."""
    return f"{create_time_ms:0{_TIME_DIGITS}d}:{run_id}"


def parse_run_index_member(member: bytes) -> tuple[int, str]:
    """(create_time_ms, id) of a run (or thread) index member."""
    time_ms, _, run_id = member.decode().partition(":")
    return int(time_ms), run_id
