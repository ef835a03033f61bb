"""Crash tests of the Temporal executor: API servers and workers as subprocesses on one
Redis and one Temporal dev server, killed with SIGKILL mid-run."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc
from keel_client import KeelClient

from server.events.redis import RedisEventLog
from tests.chaos.conftest import (
    CHAOS_ENV,
    assert_run_invariants,
    effective_events,
    expected_text,
    kinds,
    observe_all,
    script,
    wait_for,
)
from tests.chaos.test_takeover import TEXT_AND_RECORDS, counters, start_run, watch_until
from tests.processes import KeelProcess, start_keel_process
from tests.temporal import WorkerProcess, free_port, start_worker

log = logging.getLogger(__name__)

APPROVE = {"tool": "approve_me", "args": {"action": "deploy"}}


class TemporalCluster:
    """API servers (executor temporal) and workers sharing a Redis, a key prefix, a
    Temporal and a task queue; every process is killed at the end of the test."""

    def __init__(self, redis_url: str, key_prefix: str, temporal_address: str) -> None:
        self.redis_url = redis_url
        self.key_prefix = key_prefix
        self.temporal_address = temporal_address
        self.task_queue = f"queue-{uuid.uuid4().hex[:12]}"
        self.env = {
            **CHAOS_ENV,
            "KEEL_EXECUTOR": "temporal",
            "KEEL_TEMPORAL_ADDRESS": temporal_address,
            "KEEL_TASK_QUEUE": self.task_queue,
            "KEEL_TEMPORAL_HEARTBEAT_TIMEOUT_S": "2",
        }
        self.servers: list[KeelProcess] = []
        self.workers: list[WorkerProcess] = []

    async def server(self, port: int = 0) -> KeelProcess:
        process = await start_keel_process(
            redis_url=self.redis_url, key_prefix=self.key_prefix, port=port, env=self.env
        )
        self.servers.append(process)
        return process

    def worker(self) -> WorkerProcess:
        process = start_worker(
            temporal_address=self.temporal_address,
            redis_url=self.redis_url,
            key_prefix=self.key_prefix,
            task_queue=self.task_queue,
            env=self.env,
        )
        self.workers.append(process)
        return process

    async def stop_all(self) -> None:
        for worker in self.workers:
            worker.kill()
        for server in self.servers:
            server.kill()
            await server.wait()


@pytest.fixture
def chaos_redis_url(redis_url: str) -> str:
    """The Temporal executor keeps its event log on Redis."""
    return redis_url


@pytest.fixture
async def temporal_cluster(
    redis_url: str, key_prefix: str, temporal_address: str
) -> AsyncIterator[TemporalCluster]:
    group = TemporalCluster(redis_url, key_prefix, temporal_address)
    try:
        yield group
    finally:
        await group.stop_all()


async def test_a_run_survives_sigkill_of_its_worker_mid_text(
    temporal_cluster: TemporalCluster, store: RedisEventLog
) -> None:
    api = await temporal_cluster.server()
    first = temporal_cluster.worker()
    run_id = await start_run(api, script(*TEXT_AND_RECORDS))
    # Mid-text of the second text step: one record done, the other to come.
    await watch_until(api, run_id, lambda seen: kinds(seen).count("text_delta") >= 40)
    first.kill()
    killed_at = time.time()
    temporal_cluster.worker()  # the run's activity is retried here
    events = await observe_all(api.target, run_id)
    resumed = [e for e in events if e.time.ToNanoseconds() / 1e9 > killed_at]
    log.info(
        "worker failover: first new event %.0f ms after SIGKILL",
        (resumed[0].time.ToNanoseconds() / 1e9 - killed_at) * 1000,
    )
    assert_run_invariants(events, expected_text(*TEXT_AND_RECORDS))
    assert "step_superseded" in kinds(events)
    assert await counters(store, run_id, "k1", "k2", "calls:k1", "calls:k2") == {
        "k1": 1,
        "k2": 1,
        "calls:k1": 1,  # finished before the crash: journaled, never called again
        "calls:k2": 1,
    }
    assert (await store.get_run(run_id)).epoch >= 3  # created, first worker, second worker


async def test_a_run_survives_sigkill_of_its_worker_during_a_tool_call(
    temporal_cluster: TemporalCluster, store: RedisEventLog
) -> None:
    steps = (
        {"text": 5},
        # Long enough that the kill lands while it runs, however slow the machine is to
        # notice that it started (at 1.5 s, a loaded run once saw the step end first).
        {"tool": "record", "args": {"key": "slow", "delay_ms": 4000}},
        {"text": 5},
    )
    api = await temporal_cluster.server()
    first = temporal_cluster.worker()
    run_id = await start_run(api, script(*steps))

    async def tool_started() -> bool:
        return await store.get_counter(run_id, "calls:slow") == 1

    await wait_for(tool_started, what="the tool to start")
    first.kill()
    temporal_cluster.worker()
    events = await observe_all(api.target, run_id)
    assert_run_invariants(events, expected_text(*steps))
    superseded = [e for e in events if e.WhichOneof("payload") == "step_superseded"]
    assert (superseded[0].step_superseded.superseded_step, superseded[0].attempt) == (1, 2)
    # Interrupted while running, the tool ran again, but its idempotency key kept
    # the effect to exactly once.
    assert await store.get_counter(run_id, "slow") == 1
    assert await store.get_counter(run_id, "calls:slow") >= 2
    results = [e for e in effective_events(events) if e.WhichOneof("payload") == "tool_result"]
    assert [r.tool_result.result_json for r in results] == ["1"]


async def test_a_suspended_run_resumes_after_every_worker_and_server_restarted(
    temporal_cluster: TemporalCluster, store: RedisEventLog
) -> None:
    steps: tuple[dict[str, Any], ...] = (
        {"text": 3},
        APPROVE,
        {"tool": "record", "args": {"key": "after"}},
        {"text": 2},
    )
    api = await temporal_cluster.server()
    worker = temporal_cluster.worker()
    run_id = await start_run(api, script(*steps))
    suspended = await watch_until(api, run_id, lambda seen: "suspended" in kinds(seen))
    call_id = next(
        e.tool_call_approval.tool_call_id for e in suspended if e.HasField("tool_call_approval")
    )
    worker.kill()
    api.kill()
    await api.wait()

    again = await temporal_cluster.server()
    temporal_cluster.worker()
    async with grpc.aio.insecure_channel(again.target) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        decision = pb.Decision(tool_call_id=call_id, approve=pb.Approve())
        rest = []
        async for response in stub.Resume(pb.ResumeRequest(run_id=run_id, decisions=[decision])):
            rest.extend(response.events.events)
    assert kinds(rest)[0] == "resumed" and kinds(rest)[-1] == "finish"
    events = await observe_all(again.target, run_id)
    assert [e.index for e in events] == list(range(len(events)))
    assert kinds(events).count("suspended") == 1 and kinds(events).count("finish") == 1
    assert await store.get_counter(run_id, "after") == 1


async def test_the_client_wrapper_resumes_on_another_server_when_its_server_is_killed(
    temporal_cluster: TemporalCluster,
) -> None:
    """SIGKILL the API server that started a run while the wrapper streams it: the
    wrapper goes on (Observe from its next offset) on the server that replaces it."""
    port = free_port()
    api = await temporal_cluster.server(port)
    temporal_cluster.worker()
    steps = ({"text": 150, "delay_ms": 10}, {"tool": "record", "args": {"key": "k"}})
    events: list[pb.AgentEvent] = []
    replaced = False
    async with KeelClient(
        f"127.0.0.1:{port}", initial_backoff_s=0.05, max_backoff_s=0.5, max_reconnects=50
    ) as client:
        handle = client.stream("scripted", script(*steps))
        async for event in handle.events():
            events.append(event)
            if len(events) == 40 and not replaced:
                replaced = True
                api.kill()
                await api.wait()
                await temporal_cluster.server(port)
        assert handle.reconnects, "the stream never reconnected"
    assert [e.index for e in events] == list(range(len(events)))
    assert_run_invariants(events, expected_text(*steps))


async def test_sigterm_of_a_worker_hands_its_run_to_another_and_both_processes_exit_0(
    temporal_cluster: TemporalCluster, store: RedisEventLog
) -> None:
    steps = ({"text": 150, "delay_ms": 10}, {"tool": "record", "args": {"key": "k"}})
    api = await temporal_cluster.server()
    first = temporal_cluster.worker()
    run_id = await start_run(api, script(*steps))
    await watch_until(api, run_id, lambda seen: kinds(seen).count("text_delta") >= 20)
    assert first.terminate() == 0  # KEEL_SHUTDOWN_GRACE_S=0: the run is handed back at once
    temporal_cluster.worker()
    events = await observe_all(api.target, run_id)
    assert_run_invariants(events, expected_text(*steps))
    assert await store.get_counter(run_id, "k") == 1
    api.terminate()
    assert await api.wait() == 0
