"""What the property tests share: their settings, a log per example, events, and observers.

Each example opens its own EventLog (a fresh key prefix on Redis, so examples
never share keys) on an event loop of its own, and closes it at its end.

Time, as in tests/conftest.py: a memory log runs on a Clock whose `advance`
jumps at once; for Redis it waits for the time to pass. The memory log's
TTLs are long (nothing lapses by itself during an example) and the Redis
log's are tiny, so on Redis a lease may lapse or an ended run expire at any
moment: the tests assert only what holds either way there.
"""

from __future__ import annotations

import asyncio
import enum
import os
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from keel.v1.agent_service_pb2 import (
    AgentEvent,
    RunAbort,
    RunError,
    RunFinish,
    RunSuspended,
    TextDelta,
)
from redis.asyncio import Redis

from server import background
from server.errors import OffsetExpired, RunNotFound
from server.events.keys import Keys
from server.events.log import EventLog, RunState
from server.events.memory import MemoryEventLog
from server.events.redis import RedisEventLog
from tests.conftest import LogClock

EXAMPLES_ENV = "KEEL_PROPERTY_EXAMPLES"
# An example that takes this long hangs: it fails (cancelled) instead of waiting forever.
EXAMPLE_TIMEOUT_S = 60.0
# Hypothesis shrinks a failure for up to 5 minutes; a test's time limit leaves room for it.
SHRINK_ALLOWANCE_S = 400


def examples(ci: int) -> int:
    """How many examples a property runs per backend: `ci`, or KEEL_PROPERTY_EXAMPLES."""
    value = os.environ.get(EXAMPLES_ENV, "")
    return int(value) if value else ci


def long_mode() -> bool:
    return bool(os.environ.get(EXAMPLES_ENV, ""))


def property_settings(ci_examples: int, **extra: object) -> settings:
    """Reproducible in CI (derandomized, no example database); in long mode (with
    KEEL_PROPERTY_EXAMPLES) random, printing the blob that reproduces a failure."""
    return settings(
        max_examples=examples(ci_examples),
        deadline=None,
        database=None,
        derandomize=not long_mode(),
        print_blob=True,
        # Not Phase.explain: after a shrink it replays the failure dozens of times more.
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
        **extra,  # type: ignore[arg-type]
    )


def timeout_for(ci_examples: int, seconds_per_example: float) -> pytest.MarkDecorator:
    """pytest-timeout's limit for a property test: its examples plus a shrink.

    The thread method: the signal method's exception, raised wherever the event
    loop happens to be, can leave asyncio.run waiting forever for a task.
    """
    seconds = examples(ci_examples) * seconds_per_example + SHRINK_ALLOWANCE_S
    return pytest.mark.timeout(round(seconds), method="thread")


def run_example(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run one example on an event loop of its own, failing it if it hangs."""

    async def bounded() -> None:
        async with asyncio.timeout(EXAMPLE_TIMEOUT_S):
            await coroutine

    asyncio.run(bounded())


@dataclass(frozen=True, slots=True)
class Timing:
    """A backend's TTLs for the property tests, and how far `Clock.advance` goes."""

    lease_ttl_s: float
    terminal_ttl_s: float
    lapse_s: float  # long enough for any lease and any ended run's retention to run out

    @staticmethod
    def of(backend: str) -> Timing:
        if backend == "memory":
            return Timing(lease_ttl_s=30.0, terminal_ttl_s=30.0, lapse_s=75.0)
        return Timing(lease_ttl_s=0.06, terminal_ttl_s=0.06, lapse_s=0.15)


class Expiry(enum.Enum):
    """Whether a run is gone: its retention time ran out after it ended."""

    NO = "no"  # live, or ended and retained (on memory, until Clock.advance)
    MAYBE = "maybe"  # ended on Redis: its retention may run out at any moment
    YES = "yes"  # gone (the log said so, or the time certainly passed)


# The fixtures' clock (tests/conftest.py): jumps on memory, real waits on Redis.
Clock = LogClock


def new_key_prefix() -> str:
    return f"prop-{uuid.uuid4().hex[:12]}"


async def open_log(
    backend: str,
    redis_url: str,
    clock: Clock,
    *,
    retain_events: int = 0,
    key_prefix: str = "",
) -> EventLog:
    """A fresh log of `backend` with the backend's Timing (on Redis, under `key_prefix`,
    or a new one); the caller closes it."""
    timing = Timing.of(backend)
    if backend == "redis":
        return await RedisEventLog.connect(
            redis_url,
            key_prefix=key_prefix or new_key_prefix(),
            terminal_ttl_s=timing.terminal_ttl_s,
            retain_events=retain_events,
            lease_ttl_s=timing.lease_ttl_s,
        )
    return MemoryEventLog(
        terminal_ttl_s=timing.terminal_ttl_s,
        retain_events=retain_events,
        lease_ttl_s=timing.lease_ttl_s,
        clock=clock,
    )


async def drop_pubsub_connection(redis_url: str, key_prefix: str) -> bool:
    """Kill the pub/sub connection of the RedisEventLog under `key_prefix` (its listeners get
    on_gap once it is back); False if it had none (being reconnected)."""
    client = Redis.from_url(redis_url)
    try:
        name = Keys(key_prefix).pubsub_client_name
        clients = await client.client_list()
        ids = [c["id"] for c in clients if c.get("name") == name]
        for client_id in ids:
            await client.client_kill_filter(_id=client_id)
        return bool(ids)
    finally:
        await client.aclose()


def redis_url_for(backend: str, request: pytest.FixtureRequest) -> str:
    """The session's Redis (the `redis_url` fixture) for the Redis backend; "" for memory."""
    if backend != "redis":
        return ""
    url: str = request.getfixturevalue("redis_url")
    return url


def new_run_id() -> str:
    return f"run-{uuid.uuid4().hex[:10]}"  # no ":": that names a thread's run on Redis


def text_events(run_id: str, start: int, count: int, tag: str) -> list[AgentEvent]:
    return [
        AgentEvent(run_id=run_id, index=i, step=1, attempt=1, text_delta=TextDelta(delta=tag))
        for i in range(start, start + count)
    ]


def ending_event(run_id: str, index: int, state: RunState) -> AgentEvent:
    """The event a writer commits with `state`: finish, error, abort or suspended."""
    payloads = {
        RunState.SUCCEEDED: {"finish": RunFinish(output_text="done")},
        RunState.FAILED: {"error": RunError(message="failed")},
        RunState.CANCELLED: {"abort": RunAbort(reason="cancelled")},
        RunState.SUSPENDED: {"suspended": RunSuspended()},
    }
    return AgentEvent(run_id=run_id, index=index, step=1, attempt=1, **payloads[state])


def wire(events: Sequence[AgentEvent]) -> list[bytes]:
    """Events as comparable bytes."""
    return [event.SerializeToString(deterministic=True) for event in events]


def check_dense(events: Sequence[AgentEvent], start: int) -> None:
    assert [e.index for e in events] == list(range(start, start + len(events))), (
        f"indices not dense from {start}: {[e.index for e in events]}"
    )


class Observer:
    """Follows a run from an offset the way server/observe/follow.py does.

    Subscribe, then read the log in pages (dropping the notifications that
    came before each page read: the read has them) until a short page; then
    live: take the notified batches at the exact next index, drop what it
    has already, and on a gap or on_gap read the log again. It stops with
    OffsetExpired (the log no longer has its next event) or RunNotFound (the
    run expired); anything else it raises is a failure of the test.
    """

    def __init__(self, log: EventLog, run_id: str, offset: int, page: int) -> None:
        self.run_id = run_id
        self.offset = offset
        self.next = offset
        self.events: list[AgentEvent] = []
        self.stopped: OffsetExpired | RunNotFound | None = None
        self.gaps_told = 0  # on_gap calls
        self.gaps_found = 0  # live batches past the next index with no on_gap before them
        self.synced = False  # its first catch-up is done: it is live
        self.told_twice = 0  # notified batches that repeat an index notified before
        self._told = 0  # one past the last index notified
        self._log = log
        self._page = page
        self._pending: list[list[AgentEvent]] = []
        self._gap = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow())

    @property
    def following(self) -> bool:
        return self._task is not None and not self._task.done()

    def reached(self, head: int) -> bool:
        """Whether it stopped, or is live and has every event below `head`."""
        return not self.following or (self.synced and self.next >= head)

    async def stop(self) -> None:
        """Stop following; re-raises what the observer failed with, if anything.

        server/background.py's stop: a cancellation that lands while a Redis
        command is being sent can be lost (asyncio.wait_for in redis-py, on
        Python 3.11), so it cancels again until the task is done.
        """
        assert self._task is not None
        assert await background.stop(self._task, within_s=10), "the observer did not stop"

    # Listener

    def on_events(self, events: Sequence[AgentEvent]) -> None:
        if events and events[0].index < self._told:
            self.told_twice += 1  # an append notifies once; a replay, nothing
        if events:
            self._told = events[-1].index + 1
        self._pending.append(list(events))
        self._wake.set()

    def on_gap(self) -> None:
        self.gaps_told += 1
        self._gap = True
        self._wake.set()

    async def _follow(self) -> None:
        subscription = await self._log.subscribe(self.run_id, self)
        try:
            await self._catch_up()
            self.synced = True
            while True:
                if self._gap:
                    self._gap = False
                    await self._catch_up()
                elif self._pending:
                    if not self._take_pending():
                        self.gaps_found += 1
                        await self._catch_up()
                else:
                    self._wake.clear()
                    await self._wake.wait()
        except (OffsetExpired, RunNotFound) as stopped:
            self.stopped = stopped
        finally:
            await subscription.close()

    async def _catch_up(self) -> None:
        while True:
            self._pending.clear()  # the read has what they tell (follow.py, 2)
            page = await self._log.read(self.run_id, self.next, self._page)
            assert len(page) <= self._page
            if page:
                assert page[0].index == self.next, (
                    f"read({self.next}) of {self.run_id} began at {page[0].index}"
                )
                self._take(page)
            if len(page) < self._page:
                return

    def _take_pending(self) -> bool:
        """Take the notified batches; False at a gap (the rest is dropped: a read follows)."""
        pending, self._pending = self._pending, []
        for batch in pending:
            check_dense(batch, batch[0].index if batch else 0)
            fresh = [event for event in batch if event.index >= self.next]
            if not fresh:
                continue  # told again what it has
            if fresh[0].index != self.next:
                return False
            self._take(fresh)
        return True

    def _take(self, events: Sequence[AgentEvent]) -> None:
        check_dense(events, self.next)
        for event in events:
            assert event.run_id == self.run_id, f"{self.run_id}'s observer got {event.run_id}"
        self.events.extend(events)
        self.next += len(events)


async def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll `predicate()` until true; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
