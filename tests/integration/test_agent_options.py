"""Per-agent options of the registry (AgentSpec), over gRPC on both backends:
live-only agents (resumable=False) and a retention of the agent's own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.app import Keel
from tests.integration.conftest import assert_contiguous, collect, payloads, script, text
from tests.integration.test_streams import error_info
from tests.registries import BRIEF_RETENTION_S


@pytest.fixture
async def options_stub(start_keel: Callable[..., Any]) -> AsyncIterator[pb_grpc.AgentServiceStub]:
    keel: Keel = await start_keel(agents="tests.registries:options", terminal_ttl_s=3600)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}") as channel:
        yield pb_grpc.AgentServiceStub(channel)


async def test_list_agents_shows_live_only_and_each_agents_retention(
    options_stub: pb_grpc.AgentServiceStub,
) -> None:
    agents = {a.agent_id: a for a in (await options_stub.ListAgents(pb.ListAgentsRequest())).agents}
    assert [agents[a].live_only for a in ("scripted", "scripted-live", "scripted-brief")] == [
        False,
        True,
        False,
    ]
    assert agents["scripted"].ended_run_retention.ToSeconds() == 3600
    assert agents["scripted-brief"].ended_run_retention.ToMilliseconds() == BRIEF_RETENTION_S * 1000


async def test_a_live_only_run_streams_every_event_live_and_refuses_observe_from_zero(
    options_stub: pb_grpc.AgentServiceStub,
) -> None:
    out = await collect(
        options_stub.Stream(
            pb.StreamRequest(agent_id="scripted-live", input=script(text(30), text(5)))
        )
    )
    assert_contiguous(out.events)  # from `start` on: the Stream listened before the run began
    assert payloads(out.events)[0] == "start" and payloads(out.events)[-1] == "finish"
    end = len(out.events)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await collect(options_stub.Observe(pb.ObserveRequest(run_id=out.run_id, offset=0)))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(refused.value)
    assert info.reason == "RUN_NOT_RESUMABLE"
    assert info.metadata["next_offset"] == str(end)
    at_head = await collect(options_stub.Observe(pb.ObserveRequest(run_id=out.run_id, offset=end)))
    assert at_head.events == [] and at_head.snapshots[0].run.next_offset == end
    run = (await options_stub.GetRun(pb.GetRunRequest(run_id=out.run_id))).run
    assert (run.state, run.next_offset) == (pb.RUN_STATE_SUCCEEDED, end)


async def test_a_live_only_run_can_be_joined_at_its_head_while_it_runs(
    options_stub: pb_grpc.AgentServiceStub,
) -> None:
    started = await options_stub.StartRun(
        pb.StartRunRequest(agent_id="scripted-live", input=script(text(60, delay_ms=20)))
    )
    run_id = started.run.run_id
    head = 0
    while head < 5:
        await asyncio.sleep(0.05)
        head = (await options_stub.GetRun(pb.GetRunRequest(run_id=run_id))).run.next_offset
    with pytest.raises(grpc.aio.AioRpcError) as behind:
        await collect(options_stub.Observe(pb.ObserveRequest(run_id=run_id, offset=1)))
    assert error_info(behind.value).reason == "RUN_NOT_RESUMABLE"
    # Joining at (or past) the head follows the rest live. The head moves on every 20 ms,
    # so on a loaded machine it may pass the offset before the Observe call arrives: then
    # the call fails as it should, and the join is tried again 5 events ahead.
    for _attempt in range(10):
        try:
            joined = await collect(
                options_stub.Observe(pb.ObserveRequest(run_id=run_id, offset=head))
            )
            break
        except grpc.aio.AioRpcError as late:
            assert error_info(late).reason == "RUN_NOT_RESUMABLE"
            current = await options_stub.GetRun(pb.GetRunRequest(run_id=run_id))
            head = current.run.next_offset + 5
    else:
        pytest.fail("the head kept passing the offset")
    assert_contiguous(joined.events, start=head)
    assert payloads(joined.events)[-1] == "finish"


async def test_a_live_only_stream_that_falls_behind_ends_with_run_not_resumable(
    start_keel: Callable[..., Any],
) -> None:
    keel: Keel = await start_keel(agents="tests.registries:options", observer_queue_size=1)
    # Without BDP probing the client's HTTP/2 window stays small, so a client that
    # stops reading soon stops the server's sends too.
    options = [("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keel.port}", options=options) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        call = stub.Stream(
            pb.StreamRequest(agent_id="scripted-live", input=script(text(3000, delay_ms=1)))
        )
        first = await call.read()  # the snapshot; then stop reading while the run goes on
        assert first.WhichOneof("kind") == "snapshot"
        await asyncio.sleep(3)
        with pytest.raises(grpc.aio.AioRpcError) as lost:
            while True:
                message = await call.read()
                assert message is not grpc.aio.EOF, "the stream ended without an error"
        assert lost.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(lost.value).reason == "RUN_NOT_RESUMABLE"


async def test_an_agents_own_retention_expires_its_ended_runs_and_no_others(
    options_stub: pb_grpc.AgentServiceStub,
) -> None:
    brief = await collect(
        options_stub.Stream(pb.StreamRequest(agent_id="scripted-brief", input=script(text(1))))
    )
    usual = await collect(
        options_stub.Stream(pb.StreamRequest(agent_id="scripted", input=script(text(1))))
    )
    await asyncio.sleep(BRIEF_RETENTION_S + 0.5)
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await options_stub.GetRun(pb.GetRunRequest(run_id=brief.run_id))
    assert expired.value.code() == grpc.StatusCode.NOT_FOUND
    kept = (await options_stub.GetRun(pb.GetRunRequest(run_id=usual.run_id))).run
    assert kept.state == pb.RUN_STATE_SUCCEEDED
