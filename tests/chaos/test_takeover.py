"""A run survives the death of the process that runs it: taken over, finished, exactly once."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.events.keys import Keys
from server.events.log import EventLog
from tests.chaos.conftest import (
    Cluster,
    assert_run_invariants,
    effective_events,
    expected_text,
    kinds,
    observe_all,
    script,
    wait_for,
)
from tests.processes import KeelProcess, is_postgres
from tests.redis_cluster import async_client

log = logging.getLogger(__name__)

TEXT_AND_RECORDS: tuple[dict[str, Any], ...] = (
    {"text": 30, "delay_ms": 10},
    {"tool": "record", "args": {"key": "k1"}},
    {"text": 30, "delay_ms": 10},
    {"tool": "record", "args": {"key": "k2"}},
    {"text": 10, "delay_ms": 10},
)


async def start_run(process: KeelProcess, input: str) -> str:
    async with grpc.aio.insecure_channel(process.target) as channel:
        started = await pb_grpc.AgentServiceStub(channel).StartRun(
            pb.StartRunRequest(agent_id="scripted", input=input)
        )
        return started.run.run_id


async def watch_until(process: KeelProcess, run_id: str, stop_at: Any) -> list[pb.AgentEvent]:
    """Observe the run on `process` until `stop_at(events)` holds."""
    events: list[pb.AgentEvent] = []
    async with grpc.aio.insecure_channel(process.target) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        async for response in stub.Observe(pb.ObserveRequest(run_id=run_id)):
            events.extend(response.events.events)
            if stop_at(events):
                return events
    raise AssertionError(f"the run ended before the moment to kill: {kinds(events)}")


async def kill_owner_and_finish_on(
    cluster: Cluster,
    owner: KeelProcess,
    survivor: KeelProcess,
    run_id: str,
    stop_at: Any,
    before_kill: Callable[[], Awaitable[None]] | None = None,
) -> list[pb.AgentEvent]:
    """SIGKILL the owner at the moment `stop_at` names; every event, observed on the survivor.

    Logs how long the takeover took: from the moment the dead owner's lease
    expired (its PTTL read right after the kill) to the first event the new
    owner wrote.
    """
    await watch_until(owner, run_id, stop_at)
    if before_kill is not None:
        await before_kill()
    owner.kill()
    killed_at = time.time()
    lease_ttl_ms = 0  # (read on Redis only: for the log line below)
    if not is_postgres(cluster.redis_url):
        redis = async_client(cluster.redis_url)
        lease_ttl_ms = await redis.pttl(Keys(cluster.key_prefix).lease(run_id))
        await redis.aclose()
    events = await observe_all(survivor.target, run_id)
    resumed = [e for e in events if e.time.ToNanoseconds() / 1e9 > killed_at]
    if resumed and lease_ttl_ms > 0:
        first_s = resumed[0].time.ToNanoseconds() / 1e9
        log.info(
            "takeover: first new event %.0f ms after the lease expired, %.0f ms after SIGKILL",
            (first_s - killed_at - lease_ttl_ms / 1000) * 1000,
            (first_s - killed_at) * 1000,
        )
    return events


async def counters(store: EventLog, run_id: str, *keys: str) -> dict[str, int]:
    return {key: await store.get_counter(run_id, key) for key in keys}


async def test_run_survives_sigkill_of_its_owner(cluster: Cluster, store: EventLog) -> None:
    a, b = await cluster.start(), await cluster.start()
    run_id = await start_run(a, script(*TEXT_AND_RECORDS))
    # Mid-text of the second text step: one record done, the other to come.
    events = await kill_owner_and_finish_on(
        cluster, a, b, run_id, lambda seen: kinds(seen).count("text_delta") >= 40
    )
    assert_run_invariants(events, expected_text(*TEXT_AND_RECORDS))
    assert "step_superseded" in kinds(events)
    assert await counters(store, run_id, "k1", "k2", "calls:k1", "calls:k2") == {
        "k1": 1,
        "k2": 1,
        "calls:k1": 1,  # finished before the crash: journaled, never called again
        "calls:k2": 1,
    }
    record = await store.get_run(run_id)
    assert record.epoch >= 2 and record.owner != ""


async def test_run_survives_sigkill_during_a_tool_call(cluster: Cluster, store: EventLog) -> None:
    steps = (
        {"text": 5},
        {"tool": "record", "args": {"key": "slow", "delay_ms": 1500}},
        {"text": 5},
    )
    a, b = await cluster.start(), await cluster.start()
    run_id = await start_run(a, script(*steps))

    async def tool_is_running() -> None:
        async def started() -> bool:
            return await store.get_counter(run_id, "calls:slow") == 1

        await wait_for(started, what="the tool to start")

    events = await kill_owner_and_finish_on(
        cluster, a, b, run_id, lambda seen: "tool_call" in kinds(seen), tool_is_running
    )
    assert_run_invariants(events, expected_text(*steps))
    superseded = [e for e in events if e.WhichOneof("payload") == "step_superseded"]
    assert (superseded[0].step_superseded.superseded_step, superseded[0].attempt) == (1, 2)
    # Interrupted while running, the tool ran again (at least once), but its
    # idempotency key kept the effect to exactly once.
    assert await store.get_counter(run_id, "slow") == 1
    assert await store.get_counter(run_id, "calls:slow") >= 2
    results = [e for e in effective_events(events) if e.WhichOneof("payload") == "tool_result"]
    assert [r.tool_result.result_json for r in results] == ["1"]


async def test_run_survives_sigkill_right_after_a_checkpoint(
    cluster: Cluster, store: EventLog
) -> None:
    a, b = await cluster.start(), await cluster.start()
    run_id = await start_run(a, script(*TEXT_AND_RECORDS))
    # step_finish is committed together with the step's checkpoint.
    events = await kill_owner_and_finish_on(
        cluster, a, b, run_id, lambda seen: "step_finish" in kinds(seen)
    )
    assert_run_invariants(events, expected_text(*TEXT_AND_RECORDS))
    assert await counters(store, run_id, "k1", "k2", "calls:k1", "calls:k2") == {
        "k1": 1,
        "k2": 1,
        "calls:k1": 1,
        "calls:k2": 1,
    }


async def test_run_survives_sigkill_during_a_burst_of_appends(
    cluster: Cluster, store: EventLog
) -> None:
    steps = ({"text": 3000}, {"tool": "record", "args": {"key": "k"}}, {"text": 3000})
    a, b = await cluster.start(), await cluster.start()
    run_id = await start_run(a, script(*steps))
    events = await kill_owner_and_finish_on(cluster, a, b, run_id, lambda seen: len(seen) >= 500)
    assert_run_invariants(events, expected_text(*steps))
    assert await counters(store, run_id, "k") == {"k": 1}


async def test_zombie_owner_is_fenced(cluster: Cluster, store: EventLog) -> None:
    steps = ({"text": 60, "delay_ms": 20}, {"tool": "record", "args": {"key": "z"}}, {"text": 5})
    a, b = await cluster.start(), await cluster.start()
    run_id = await start_run(a, script(*steps))
    await watch_until(a, run_id, lambda seen: kinds(seen).count("text_delta") >= 10)
    os.kill(a.process.pid, signal.SIGSTOP)  # paused past its lease: a zombie
    try:

        async def taken_over() -> bool:
            return (await store.get_run(run_id)).epoch == 2

        await wait_for(taken_over, what="B to take the run over")
    finally:
        os.kill(a.process.pid, signal.SIGCONT)  # the zombie wakes up and tries to go on
    events = await observe_all(b.target, run_id)
    assert_run_invariants(events, expected_text(*steps))
    superseded = [e for e in events if e.WhichOneof("payload") == "step_superseded"]
    assert superseded  # B took over (a loaded machine may add more takeovers)
    for takeover in superseded:
        fenced = (
            takeover.step_superseded.superseded_step,
            takeover.step_superseded.superseded_attempt,
        )
        after = events[takeover.index + 1 :]
        assert all((e.step, e.attempt) != fenced for e in after), (
            f"an event of the fenced attempt {fenced} landed after the takeover"
        )
    assert await counters(store, run_id, "z", "calls:z") == {"z": 1, "calls:z": 1}
    assert a.process.returncode is None  # the zombie stopped the run quietly, not by crashing


async def test_restart_of_a_lone_instance_resumes_its_runs_from_their_checkpoints(
    cluster: Cluster, store: EventLog
) -> None:
    steps = ({"text": 40, "delay_ms": 10}, {"tool": "record", "args": {"key": "r"}}, {"text": 20})
    port = (a := await cluster.start()).port
    run_ids = [await start_run(a, script(*steps)) for _ in range(3)]
    await watch_until(a, run_ids[-1], lambda seen: kinds(seen).count("text_delta") >= 10)
    a.kill()
    await a.wait()
    restarted = await cluster.start(port=port)  # the same instance, back on its port
    for run_id in run_ids:
        events = await observe_all(restarted.target, run_id)
        assert_run_invariants(events, expected_text(*steps))
        assert await counters(store, run_id, "r") == {"r": 1}


async def test_cancel_of_a_run_whose_owner_died_is_not_lost(
    cluster: Cluster, store: EventLog
) -> None:
    a, b = await cluster.start(), await cluster.start()
    run_id = await start_run(a, script({"text": 500, "delay_ms": 10}))
    await watch_until(a, run_id, lambda seen: kinds(seen).count("text_delta") >= 5)
    a.kill()  # its lease is still held: nobody can abort the run yet
    async with grpc.aio.insecure_channel(b.target) as channel:
        cancelled = await pb_grpc.AgentServiceStub(channel).CancelRun(
            pb.CancelRunRequest(run_id=run_id, reason="owner is gone")
        )
    assert cancelled.run.state == pb.RUN_STATE_CANCELLED
    events = await observe_all(b.target, run_id)
    assert [e.index for e in events] == list(range(len(events)))
    assert kinds(events)[-1] == "abort"
    assert events[-1].abort.reason == "owner is gone"


async def test_sigterm_hands_runs_back_and_another_instance_resumes_them(
    cluster: Cluster, store: EventLog
) -> None:
    steps = ({"text": 50, "delay_ms": 10}, {"tool": "record", "args": {"key": "h"}}, {"text": 10})
    a, b = await cluster.start(), await cluster.start()
    run_id = await start_run(a, script(*steps))
    await watch_until(a, run_id, lambda seen: kinds(seen).count("text_delta") >= 10)
    a.terminate()  # shutdown grace 0: the run is handed back at once, its lease released
    assert await a.wait() == 0
    events = await observe_all(b.target, run_id)
    assert_run_invariants(events, expected_text(*steps))
    assert await counters(store, run_id, "h") == {"h": 1}
    assert (await store.get_run(run_id)).owner != ""
