"""A real Keel server (grpc.aio on port 0) over each backend, and helpers to read its streams."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.app import Keel, create_server
from server.settings import Settings
from tests.conftest import redis_url_of
from tests.temporal import WorkerProcess, settings_env, start_worker

SCRIPTED = "server.agents.testing:registry"
STOP_TIMEOUT_S = 30.0  # a server's graceful stop takes well under a second


def script(*steps: dict[str, Any]) -> str:
    """The scripted agent's input for these steps."""
    return json.dumps({"steps": list(steps)})


def text(n: int, delay_ms: int = 0) -> dict[str, Any]:
    return {"text": n, "delay_ms": delay_ms}


def record(key: str) -> dict[str, Any]:
    return {"tool": "record", "args": {"key": key}}


@dataclass
class Collected:
    """Everything one stream delivered."""

    snapshots: list[pb.RunSnapshot] = field(default_factory=list)
    events: list[pb.AgentEvent] = field(default_factory=list)
    heartbeats: list[pb.Heartbeat] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.snapshots[0].run.run_id

    @property
    def indices(self) -> list[int]:
        return [e.index for e in self.events]

    def add(self, response: Any) -> None:
        kind = response.WhichOneof("kind")
        if kind == "snapshot":
            self.snapshots.append(response.snapshot)
        elif kind == "events":
            self.events.extend(response.events.events)
        elif kind == "heartbeat":
            self.heartbeats.append(response.heartbeat)


async def collect(call: AsyncIterator[Any], *, max_events: int | None = None) -> Collected:
    """Read a stream to its end, or until max_events events arrived."""
    out = Collected()
    async for response in call:
        out.add(response)
        if max_events is not None and len(out.events) >= max_events:
            break
    return out


def assert_contiguous(events: Sequence[pb.AgentEvent], start: int = 0) -> None:
    """Indices are exactly start, start+1, ...: no gap, no duplicate, in order."""
    indices = [e.index for e in events]
    assert indices == list(range(start, start + len(indices))), indices


def text_of(events: Sequence[pb.AgentEvent]) -> str:
    return "".join(e.text_delta.delta for e in events if e.WhichOneof("payload") == "text_delta")


def payloads(events: Sequence[pb.AgentEvent]) -> list[str]:
    return [e.WhichOneof("payload") or "" for e in events]


def field_violations(exc: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """The (field, description) pairs of the BadRequest in an error's details."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    found = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found += [(v.field, v.description) for v in bad.field_violations]
    return found


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """memory or redis; tests marked `executors` also run on "temporal": Redis, and the
    Temporal executor with a worker subprocess of the test's own; tests marked `cluster`
    also run on "cluster": a 3-master Redis Cluster (tests/redis_cluster.py)."""
    return str(request.param)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames or hasattr(metafunc.module, "backend"):
        return  # a module with a backend of its own
    backends = ["memory", "redis", "postgres"]
    if metafunc.definition.get_closest_marker("executors"):
        backends.append("temporal")
    if metafunc.definition.get_closest_marker("cluster"):
        backends.append("cluster")
    metafunc.parametrize("backend", backends, indirect=True)


@pytest.fixture
def make_settings(backend: str, request: pytest.FixtureRequest) -> Callable[..., Settings]:
    """Settings for a test server on port 0, isolated by a fresh Redis key prefix.

    On "temporal", the first call also starts a worker with the same settings
    (its own task queue), killed when the test ends.
    """
    redis_url = "" if backend == "postgres" else redis_url_of(request, backend)
    postgres_url = str(request.getfixturevalue("postgres_url")) if backend == "postgres" else ""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    workers: list[WorkerProcess] = []
    request.addfinalizer(lambda: [worker.kill() for worker in workers])

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "port": 0,
            "agents": SCRIPTED,
            "redis_url": redis_url,
            "postgres_url": postgres_url,
            "key_prefix": prefix,
            "heartbeat_interval_s": 0.2,
            "shutdown_grace_s": 5.0,
        }
        if backend == "temporal":
            values.update(
                executor="temporal",
                temporal_address=request.getfixturevalue("temporal_address"),
                task_queue=f"queue-{prefix}",
                temporal_heartbeat_timeout_s=10.0,  # no test here kills a worker
            )
        values.update(overrides)
        if backend == "temporal" and not workers:
            worker_values = {k: v for k, v in values.items() if k not in ("port", "host")}
            workers.append(
                start_worker(
                    temporal_address=values["temporal_address"],
                    redis_url=redis_url,
                    key_prefix=prefix,
                    task_queue=values["task_queue"],
                    agents=values["agents"],
                    env=settings_env(worker_values),
                )
            )
        return Settings(**values)

    return make


@pytest.fixture
async def start_keel(make_settings: Callable[..., Settings]) -> AsyncIterator[Callable[..., Any]]:
    """Starts Keel servers with settings overrides; stops them all at the end."""
    started: list[Keel] = []

    async def start(**overrides: Any) -> Keel:
        keel = await create_server(make_settings(**overrides))
        started.append(keel)
        return keel

    yield start
    for keel in started:
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await keel.stop(grace_s=0)
        except TimeoutError:
            # Say what the server was still waiting for, rather than hang the suite.
            for task in asyncio.all_tasks():
                task.print_stack(file=sys.stderr)
            raise


@pytest.fixture
async def keel(start_keel: Callable[..., Any]) -> Keel:
    server: Keel = await start_keel()
    return server


@pytest.fixture
async def channel(keel: Keel) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.AgentServiceStub:
    return pb_grpc.AgentServiceStub(channel)
