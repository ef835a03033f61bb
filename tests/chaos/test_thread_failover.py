"""Threads across Keel processes on one Redis: the busy decision is atomic across
instances, and a thread's queue and history survive SIGKILL of a run's owner."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.errors import RunNotResumable
from server.events.log import EventLog
from tests.chaos.conftest import (
    CHAOS_ENV,
    Cluster,
    assert_run_invariants,
    effective_events,
    kinds,
    observe_all,
    script,
    text_of,
    wait_for,
)
from tests.integration.conftest import collect
from tests.processes import start_keel_process

ECHO = {"echo_history": True}


async def test_reject_raced_from_two_instances_starts_exactly_one_run(cluster: Cluster) -> None:
    first, second = await cluster.start(), await cluster.start()
    async with (
        grpc.aio.insecure_channel(first.target) as one,
        grpc.aio.insecure_channel(second.target) as two,
    ):
        stubs = [pb_grpc.AgentServiceStub(one), pb_grpc.AgentServiceStub(two)]
        for _ in range(10):
            thread = (await stubs[0].CreateThread(pb.CreateThreadRequest())).thread
            slow = script({"text": 20, "delay_ms": 10})
            outcomes = await asyncio.gather(
                *(
                    stub.StartRun(
                        pb.StartRunRequest(
                            agent_id="scripted", input=slow, thread_id=thread.thread_id
                        )
                    )
                    for stub in stubs
                ),
                return_exceptions=True,
            )
            started = [o for o in outcomes if isinstance(o, pb.StartRunResponse)]
            refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
            assert len(started) == 1, outcomes
            assert [r.code() for r in refused] == [grpc.StatusCode.FAILED_PRECONDITION]
            runs = await stubs[1].ListRuns(pb.ListRunsRequest(thread_id=thread.thread_id))
            assert [r.run_id for r in runs.runs] == [started[0].run.run_id]


async def test_a_queued_run_survives_sigkill_of_the_active_runs_owner_and_starts_after_it(
    cluster: Cluster, store: EventLog
) -> None:
    doomed, survivor = await cluster.start(), await cluster.start()
    async with (
        grpc.aio.insecure_channel(doomed.target) as to_doomed,
        grpc.aio.insecure_channel(survivor.target) as to_survivor,
    ):
        on_doomed = pb_grpc.AgentServiceStub(to_doomed)
        on_survivor = pb_grpc.AgentServiceStub(to_survivor)
        thread_id = (await on_survivor.CreateThread(pb.CreateThreadRequest())).thread.thread_id
        first_turn = await observe_all(
            survivor.target,
            (
                await on_survivor.StartRun(
                    pb.StartRunRequest(
                        agent_id="scripted", input=script({"text": 2}), thread_id=thread_id
                    )
                )
            ).run.run_id,
        )
        assert kinds(first_turn)[-1] == "finish"

        active_steps = [ECHO, {"text": 40, "delay_ms": 25}]
        active = (
            await on_doomed.StartRun(
                pb.StartRunRequest(
                    agent_id="scripted", input=script(*active_steps), thread_id=thread_id
                )
            )
        ).run
        queued = (
            await on_survivor.StartRun(
                pb.StartRunRequest(
                    agent_id="scripted",
                    input=script(ECHO, {"text": 1}),
                    thread_id=thread_id,
                    busy_policy=pb.THREAD_BUSY_POLICY_ENQUEUE,
                )
            )
        ).run
        assert queued.state == pb.RUN_STATE_QUEUED

        async def active_is_streaming() -> bool:
            return (await store.head(active.run_id)) > 5

        await wait_for(active_is_streaming, what="the active run to stream")
        doomed.kill()
        await doomed.wait()

        # The survivor takes the active run over, finishes it, and only then starts the queued one.
        active_events = await observe_all(survivor.target, active.run_id)
        assert_run_invariants(
            active_events, "history=1 " + "".join(f"t{i} " for i in range(40)) + "done"
        )
        queued_events = await observe_all(survivor.target, queued.run_id)
        assert kinds(queued_events)[-1] == "finish"
        assert text_of(effective_events(queued_events)) == "history=2 t0 done"
        finished_ns = active_events[-1].time.ToNanoseconds()
        assert queued_events[0].time.ToNanoseconds() >= finished_ns

        thread = (await on_survivor.GetThread(pb.GetThreadRequest(thread_id=thread_id))).thread
        assert (thread.active_run_id, list(thread.queued_run_ids)) == ("", [])
        listed = await on_survivor.ListThreadMessages(
            pb.ListThreadMessagesRequest(thread_id=thread_id)
        )
        owners = [m.run_id for m in listed.messages]
        first_id = first_turn[0].run_id
        assert owners == [first_id] * 2 + [active.run_id] * 2 + [queued.run_id] * 2


async def test_a_live_only_run_is_taken_over_and_finishes_keeping_no_events(
    chaos_redis_url: str, key_prefix: str, store: EventLog
) -> None:
    """A live-only agent's runs keep their record and checkpoints: takeover works as for any."""
    processes = [
        await start_keel_process(
            redis_url=chaos_redis_url,
            key_prefix=key_prefix,
            env=CHAOS_ENV,
            agents="tests.registries:options",
        )
        for _ in range(2)
    ]
    doomed, survivor = processes
    try:
        async with grpc.aio.insecure_channel(doomed.target) as channel:
            started = await pb_grpc.AgentServiceStub(channel).StartRun(
                pb.StartRunRequest(
                    agent_id="scripted-live",
                    input=script(
                        {"tool": "record", "args": {"key": "k"}}, {"text": 40, "delay_ms": 25}
                    ),
                )
            )
        run_id = started.run.run_id

        async def streaming() -> bool:
            return (await store.head(run_id)) > 10

        await wait_for(streaming, what="the live-only run to stream")
        doomed.kill()
        await doomed.wait()

        async with grpc.aio.insecure_channel(survivor.target) as channel:
            stub = pb_grpc.AgentServiceStub(channel)

            async def ended() -> bool:
                run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run
                return run.state == pb.RUN_STATE_SUCCEEDED

            await wait_for(ended, what="the survivor to finish the run")
            run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run
            assert run.next_offset > 40
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await collect(stub.Observe(pb.ObserveRequest(run_id=run_id)))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert await store.get_counter(run_id, "k") == 1  # the journaled tool ran once
        with pytest.raises(RunNotResumable):
            await store.read(run_id, 0, 10)
    finally:
        for process in processes:
            process.kill()
            await process.wait()
