"""Crash tests: Keel servers as subprocesses on one store, killed with SIGKILL mid-run.

Each test runs on Redis and on PostgreSQL (a module may pick a store of its own by
defining `chaos_redis_url`: the Redis Cluster's, or Redis only for Temporal)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import pytest
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.events.factory import open_event_log
from server.events.log import EventLog
from tests.processes import KeelProcess, is_postgres, start_keel_process

# Short leases so takeovers happen within a test's patience.
CHAOS_ENV = {
    "KEEL_LEASE_TTL_S": "1.5",
    "KEEL_SWEEP_INTERVAL_S": "0.2",
    "KEEL_HEARTBEAT_INTERVAL_S": "0.2",
    "KEEL_SHUTDOWN_GRACE_S": "0",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Cluster:
    """Keel processes sharing one store (`redis_url`: Redis, or PostgreSQL) and key prefix;
    stopped at the end of the test."""

    def __init__(self, redis_url: str, key_prefix: str) -> None:
        self.redis_url = redis_url
        self.key_prefix = key_prefix
        self.processes: list[KeelProcess] = []

    async def start(self, port: int = 0, **env: str) -> KeelProcess:
        """A server of the cluster; `env` adds KEEL_* settings to CHAOS_ENV."""
        process = await start_keel_process(
            redis_url=self.redis_url,
            key_prefix=self.key_prefix,
            port=port,
            env={**CHAOS_ENV, **env},
        )
        self.processes.append(process)
        return process

    async def stop_all(self) -> None:
        for process in self.processes:
            process.kill()
            await process.wait()


@pytest.fixture(params=["redis", "postgres"])
def chaos_redis_url(request: pytest.FixtureRequest) -> str:
    """The store of the chaos tests: the session's Redis, or its PostgreSQL."""
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
async def cluster(chaos_redis_url: str, key_prefix: str) -> AsyncIterator[Cluster]:
    group = Cluster(chaos_redis_url, key_prefix)
    try:
        yield group
    finally:
        await group.stop_all()


@pytest.fixture
async def store(chaos_redis_url: str, key_prefix: str) -> AsyncIterator[EventLog]:
    """The cluster's log, read directly: counters and records."""
    log = await open_store(chaos_redis_url, key_prefix)
    try:
        yield log
    finally:
        await log.close()


async def open_store(url: str, key_prefix: str) -> EventLog:
    """The log of a store URL (Redis or PostgreSQL)."""
    if is_postgres(url):
        return await open_event_log(None, postgres_url=url, key_prefix=key_prefix)
    return await open_event_log(url, key_prefix=key_prefix)


def script(*steps: dict[str, Any]) -> str:
    return json.dumps({"steps": list(steps)})


def expected_text(*steps: dict[str, Any]) -> str:
    """The text an uninterrupted run of this script streams: its deltas, then "done"."""
    deltas = sum(step.get("text", 0) for step in steps)
    return "".join(f"t{i} " for i in range(deltas)) + "done"


def effective_events(events: Sequence[pb.AgentEvent]) -> list[pb.AgentEvent]:
    """The events without the partial output of superseded attempts (what clients keep)."""
    dropped: set[int] = set()
    for event in events:
        if event.WhichOneof("payload") == "step_superseded":
            dropped.update(range(event.step_superseded.from_index, event.index))
    return [e for e in events if e.index not in dropped]


def text_of(events: Sequence[pb.AgentEvent]) -> str:
    return "".join(e.text_delta.delta for e in events if e.WhichOneof("payload") == "text_delta")


def kinds(events: Sequence[pb.AgentEvent]) -> list[str]:
    return [e.WhichOneof("payload") or "" for e in events]


async def observe_all(target: str, run_id: str, offset: int = 0) -> list[pb.AgentEvent]:
    """Every event of the run from `offset` to its end, through one Observe."""
    events: list[pb.AgentEvent] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        async for response in stub.Observe(pb.ObserveRequest(run_id=run_id, offset=offset)):
            if response.WhichOneof("kind") == "events":
                events.extend(response.events.events)
    return events


async def wait_for(
    condition: Callable[[], Awaitable[bool]], *, timeout_s: float = 30.0, what: str = ""
) -> None:
    """Poll `condition` until it holds; fail after timeout_s (a bound, not a timing goal)."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.02)


def assert_run_invariants(events: Sequence[pb.AgentEvent], text: str) -> None:
    """One gap-free, duplicate-free sequence ending in `finish`, whose effective text is `text`."""
    assert [e.index for e in events] == list(range(len(events)))
    assert kinds(events)[-1] == "finish"
    assert kinds(events).count("finish") == 1
    assert text_of(effective_events(events)) == text
