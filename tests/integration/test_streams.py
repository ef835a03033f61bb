"""Resumable streams end to end: a real server, both backends (and Redis Cluster), the
generated client.

Every test asserts strict contiguity: the indices a client sees are exactly
offset, offset+1, ... with no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.app import Keel
from server.events.factory import open_event_log
from tests.integration.conftest import (
    Collected,
    assert_contiguous,
    collect,
    payloads,
    record,
    script,
    text,
    text_of,
)

pytestmark = pytest.mark.cluster

FULL_TEXT_60 = "".join(f"t{i} " for i in range(60))


async def finished_run(stub: pb_grpc.AgentServiceStub, input: str) -> Collected:
    out = await collect(stub.Stream(pb.StreamRequest(agent_id="scripted", input=input)))
    assert payloads(out.events)[-1] == "finish"
    return out


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo in status details")


@pytest.mark.executors
async def test_stream_delivers_every_event_of_a_run_in_order(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    out = await finished_run(stub, script(text(30), record("k"), text(30)))
    assert len(out.snapshots) == 1
    assert_contiguous(out.events)
    kinds = payloads(out.events)
    assert kinds[0] == "start"
    assert kinds[-1] == "finish"
    assert "tool_call" in kinds and "tool_result" in kinds and "step_start" in kinds
    assert text_of(out.events).startswith(FULL_TEXT_60[:40])
    assert out.events[-1].finish.output_text == "done"


@pytest.mark.executors
async def test_dropped_stream_resumes_at_next_offset_with_nothing_lost_or_repeated(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    call = stub.Stream(
        pb.StreamRequest(agent_id="scripted", input=script(text(60, delay_ms=2), record("k")))
    )
    first = await collect(call, max_events=17)
    call.cancel()
    k = first.events[-1].index + 1
    rest = await collect(stub.Observe(pb.ObserveRequest(run_id=first.run_id, offset=k)))
    assert rest.events[0].index == k
    assert_contiguous(first.events + rest.events)
    assert payloads(rest.events)[-1] == "finish"
    assert text_of(first.events + rest.events).startswith(FULL_TEXT_60)


async def test_observe_from_zero_of_a_finished_run_replays_it_whole(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    done = await finished_run(stub, script(text(40), record("a")))
    replay = await collect(stub.Observe(pb.ObserveRequest(run_id=done.run_id, offset=0)))
    assert replay.snapshots[0].run.state == pb.RUN_STATE_SUCCEEDED
    assert [e.SerializeToString() for e in replay.events] == [
        e.SerializeToString() for e in done.events
    ]


@pytest.mark.executors
async def test_observe_from_the_middle_delivers_exactly_the_rest(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    done = await finished_run(stub, script(text(40)))
    middle = len(done.events) // 2
    rest = await collect(stub.Observe(pb.ObserveRequest(run_id=done.run_id, offset=middle)))
    assert_contiguous(rest.events, start=middle)
    assert rest.indices[-1] == done.indices[-1]


async def test_observe_at_the_end_of_a_finished_run_ends_after_the_snapshot(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    done = await finished_run(stub, script(text(3)))
    end = len(done.events)
    out = await collect(stub.Observe(pb.ObserveRequest(run_id=done.run_id, offset=end)))
    assert out.events == [] and out.snapshots[0].run.next_offset == end
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub.Observe(pb.ObserveRequest(run_id=done.run_id, offset=end + 1)))
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error_info(err.value).reason == "OFFSET_BEYOND_END"


@pytest.mark.executors
async def test_twenty_concurrent_observers_receive_identical_sequences(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    started = await stub.StartRun(
        pb.StartRunRequest(agent_id="scripted", input=script(text(200, delay_ms=1), record("x")))
    )
    run_id = started.run.run_id
    results = await asyncio.gather(
        *(collect(stub.Observe(pb.ObserveRequest(run_id=run_id, offset=0))) for _ in range(20))
    )
    reference = [e.SerializeToString() for e in results[0].events]
    assert_contiguous(results[0].events)
    assert payloads(results[0].events)[-1] == "finish"
    for result in results[1:]:
        assert [e.SerializeToString() for e in result.events] == reference


async def test_observer_joining_mid_run_gets_the_rest_live(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    started = await stub.StartRun(
        pb.StartRunRequest(agent_id="scripted", input=script(text(100, delay_ms=3)))
    )
    run_id = started.run.run_id
    while (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run.next_offset < 30:
        await asyncio.sleep(0.01)
    joined = await collect(stub.Observe(pb.ObserveRequest(run_id=run_id, offset=0)))
    assert_contiguous(joined.events)
    assert joined.snapshots[0].run.state == pb.RUN_STATE_RUNNING
    assert payloads(joined.events)[-1] == "finish"


async def test_slow_observer_with_queue_size_one_gets_everything_and_slows_no_one(
    start_keel: Any,
) -> None:
    keel: Keel = await start_keel(observer_queue_size=1, catch_up_page_size=7)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        started = await stub.StartRun(
            pb.StartRunRequest(agent_id="scripted", input=script(text(300, delay_ms=1)))
        )
        run_id = started.run.run_id
        slow = Collected()
        fast_task = asyncio.create_task(
            collect(stub.Observe(pb.ObserveRequest(run_id=run_id, offset=0)))
        )
        slow_call = stub.Observe(pb.ObserveRequest(run_id=run_id, offset=0))
        while not slow.events:
            slow.add(await slow_call.read())
        # The slow observer stops reading altogether: the run and the fast
        # observer still finish, and its one-batch queue overflows meanwhile.
        fast = await fast_task
        state = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run.state
        assert state == pb.RUN_STATE_SUCCEEDED
        assert payloads(fast.events)[-1] == "finish"
        while (response := await slow_call.read()) != grpc.aio.EOF:  # ... then it catches up
            slow.add(response)
            await asyncio.sleep(0.01)
        assert_contiguous(slow.events)
        assert [e.index for e in slow.events] == fast.indices


async def test_offset_past_the_head_waits_then_delivers_from_that_offset(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    started = await stub.StartRun(
        pb.StartRunRequest(agent_id="scripted", input=script(text(80, delay_ms=5)))
    )
    run_id = started.run.run_id
    waiting = await collect(stub.Observe(pb.ObserveRequest(run_id=run_id, offset=60)))
    assert waiting.snapshots[0].run.next_offset < 60  # it had to wait
    assert_contiguous(waiting.events, start=60)
    assert payloads(waiting.events)[-1] == "finish"


async def test_unknown_run_returns_not_found(stub: pb_grpc.AgentServiceStub) -> None:
    for call in (
        lambda: collect(stub.Observe(pb.ObserveRequest(run_id="nope", offset=0))),
        lambda: stub.GetRun(pb.GetRunRequest(run_id="nope")),
        lambda: stub.CancelRun(pb.CancelRunRequest(run_id="nope")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        info = error_info(err.value)
        assert info.reason == "RUN_NOT_FOUND" and info.metadata["run_id"] == "nope"


async def test_expired_offset_returns_out_of_range_with_earliest_offset(
    start_keel: Any,
) -> None:
    keel: Keel = await start_keel(retain_events=10)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        started = await stub.StartRun(
            pb.StartRunRequest(agent_id="scripted", input=script(text(50)))
        )
        run_id = started.run.run_id
        while (
            await stub.GetRun(pb.GetRunRequest(run_id=run_id))
        ).run.state != pb.RUN_STATE_SUCCEEDED:
            await asyncio.sleep(0.01)
        run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run
        assert run.earliest_offset == run.next_offset - 10
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub.Observe(pb.ObserveRequest(run_id=run_id, offset=3)))
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        info = error_info(err.value)
        assert info.reason == "OFFSET_EXPIRED"
        assert int(info.metadata["earliest_offset"]) == run.earliest_offset
        assert int(info.metadata["next_offset"]) == run.next_offset
        tail = await collect(
            stub.Observe(pb.ObserveRequest(run_id=run_id, offset=run.earliest_offset))
        )
        assert_contiguous(tail.events, start=run.earliest_offset)


async def test_quiet_stream_gets_heartbeats_with_next_offset(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    # One slow delta: the stream stays quiet longer than the 0.2 s heartbeat interval.
    started = await stub.StartRun(
        pb.StartRunRequest(agent_id="scripted", input=script(text(2, delay_ms=700)))
    )
    out = await collect(stub.Observe(pb.ObserveRequest(run_id=started.run.run_id, offset=0)))
    assert out.heartbeats
    assert all(h.next_offset <= len(out.events) for h in out.heartbeats)
    assert_contiguous(out.events)


async def test_client_disconnect_never_stops_the_run(stub: pb_grpc.AgentServiceStub) -> None:
    call = stub.Stream(pb.StreamRequest(agent_id="scripted", input=script(text(40, delay_ms=2))))
    first = await collect(call, max_events=3)
    call.cancel()
    rest = await collect(stub.Observe(pb.ObserveRequest(run_id=first.run_id, offset=0)))
    assert payloads(rest.events)[-1] == "finish"
    assert_contiguous(rest.events)


@pytest.mark.executors
async def test_cancel_run_ends_it_with_abort_and_cancelled_state(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    started = await stub.StartRun(
        pb.StartRunRequest(agent_id="scripted", input=script(text(1000, delay_ms=10)))
    )
    run_id = started.run.run_id
    watching = asyncio.create_task(collect(stub.Observe(pb.ObserveRequest(run_id=run_id))))
    await asyncio.sleep(0.1)
    cancelled = await stub.CancelRun(pb.CancelRunRequest(run_id=run_id, reason="user asked"))
    assert cancelled.run.state == pb.RUN_STATE_CANCELLED
    assert cancelled.run.error == "user asked"
    out = await watching  # the stream ends OK right after the abort event
    assert payloads(out.events)[-1] == "abort"
    assert out.events[-1].abort.reason == "user asked"
    assert_contiguous(out.events)
    again = await stub.CancelRun(pb.CancelRunRequest(run_id=run_id))
    assert again.run.state == pb.RUN_STATE_CANCELLED


@pytest.mark.executors
async def test_start_run_returns_at_once_and_request_id_makes_it_idempotent(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    request = pb.StartRunRequest(
        agent_id="scripted", input=script(text(500, delay_ms=10)), request_id="req-1"
    )
    first = await stub.StartRun(request)
    assert first.run.state in (pb.RUN_STATE_QUEUED, pb.RUN_STATE_RUNNING)
    second = await stub.StartRun(request)
    assert second.run.run_id == first.run.run_id
    streamed = await collect(
        stub.Stream(pb.StreamRequest(agent_id="scripted", input=request.input, request_id="req-1")),
        max_events=1,
    )
    assert streamed.run_id == first.run.run_id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.StartRun(
            pb.StartRunRequest(agent_id="scripted", input=script(text(1)), request_id="req-1")
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(err.value).reason == "REQUEST_ID_REUSED"
    await stub.CancelRun(pb.CancelRunRequest(run_id=first.run.run_id))


async def test_get_and_list_runs_filter_by_agent_and_state_with_paging(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    done = [await finished_run(stub, script(text(1))) for _ in range(5)]
    live = await stub.StartRun(
        pb.StartRunRequest(agent_id="scripted", input=script(text(1000, delay_ms=10)))
    )
    got = await stub.GetRun(pb.GetRunRequest(run_id=done[0].run_id))
    assert got.run.state == pb.RUN_STATE_SUCCEEDED and got.run.agent_id == "scripted"
    assert got.run.next_offset == len(done[0].events)

    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListRuns(
            pb.ListRunsRequest(states=[pb.RUN_STATE_SUCCEEDED], page_size=2, page_token=token)
        )
        assert len(page.runs) <= 2
        seen += [r.run_id for r in page.runs]
        token = page.next_page_token
        if not token:
            break
    assert seen == [d.run_id for d in reversed(done)]  # newest first, each once
    running = await stub.ListRuns(
        pb.ListRunsRequest(states=[pb.RUN_STATE_RUNNING, pb.RUN_STATE_QUEUED])
    )
    assert [r.run_id for r in running.runs] == [live.run.run_id]
    other = await stub.ListRuns(pb.ListRunsRequest(agent_id="someone-else"))
    assert list(other.runs) == []
    await stub.CancelRun(pb.CancelRunRequest(run_id=live.run.run_id))


async def test_list_agents_describes_the_scripted_agent(stub: pb_grpc.AgentServiceStub) -> None:
    agents = (await stub.ListAgents(pb.ListAgentsRequest())).agents
    scripted = next(a for a in agents if a.agent_id == "scripted")
    tools = {t.name: t for t in scripted.tools}
    assert {"record", "approve_me", "fail"} <= set(tools)
    assert tools["approve_me"].requires_approval
    assert not tools["record"].requires_approval


@pytest.mark.executors
async def test_failed_run_is_not_an_rpc_error(stub: pb_grpc.AgentServiceStub) -> None:
    # The model fails (as a provider outage would): the run fails, and its
    # stream still ends OK after an `error` event.
    out = await collect(
        stub.Stream(
            pb.StreamRequest(agent_id="scripted", input=script(text(2), {"error": "model down"}))
        )
    )
    assert payloads(out.events)[-1] == "error"
    assert "model down" in out.events[-1].error.message
    assert_contiguous(out.events)
    run = (await stub.GetRun(pb.GetRunRequest(run_id=out.run_id))).run
    assert run.state == pb.RUN_STATE_FAILED and "model down" in run.error


async def test_graceful_shutdown_says_not_serving_and_ends_streams_with_unavailable(
    keel: Keel, channel: grpc.aio.Channel, stub: pb_grpc.AgentServiceStub
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service="keel.v1.AgentService"))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    started = await stub.StartRun(
        pb.StartRunRequest(agent_id="scripted", input=script(text(100, delay_ms=10)))
    )
    observe = stub.Observe(pb.ObserveRequest(run_id=started.run.run_id))
    seen = await collect(observe, max_events=5)
    stopping = asyncio.create_task(keel.stop())
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for response in observe:
            seen.add(response)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(err.value).reason == "SERVER_DRAINING"
    assert_contiguous(seen.events)
    await stopping  # the run had its grace time and finished
    settings = keel.settings
    if not (settings.redis_url or settings.postgres_url):
        assert (await keel.log.get_run(started.run.run_id)).state.terminal
        return
    # The server closed its log: read the store anew.
    log = await open_event_log(
        settings.redis_url or None,
        postgres_url=settings.postgres_url or None,
        key_prefix=settings.key_prefix,
    )
    try:
        assert (await log.get_run(started.run.run_id)).state.terminal
    finally:
        await log.close()
