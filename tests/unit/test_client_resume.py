"""keel_client's resume loop against a real grpc.aio server that drops streams.

The server is a small hand-written AgentService serving one run of N fixed
events. Each test tells it, per call (0 for the first call, 1 for the next,
...), where to abort and with which code; on every resumed Observe it
re-sends a few events the client already has, so dedupe is exercised too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc
from keel_client import KeelClient, Reconnect, StreamContractError

RUN_ID = "run-1"
N_EVENTS = 20
BATCH_SIZE = 3


def _event(index: int) -> pb.AgentEvent:
    return pb.AgentEvent(run_id=RUN_ID, index=index, text_delta=pb.TextDelta(delta=f"t{index} "))


@dataclass
class Call:
    """One request the server received."""

    rpc: str
    key: str  # request_id for Stream, run_id for Observe
    offset: int


@dataclass
class FakeAgentService(pb_grpc.AgentServiceServicer):
    """Serves RUN_ID's N_EVENTS events, failing calls as a test scripts it."""

    # Call number -> index before which that call aborts with `abort_code`
    # (-1: before the snapshot). Calls not listed serve to the end, OK.
    abort_at: dict[int, int] = field(default_factory=dict)
    abort_code: dict[int, grpc.StatusCode] = field(default_factory=dict)
    duplicates: int = 3  # events below the requested offset re-sent by Observe
    skip_index: int | None = None  # an index never sent: a server bug (a gap)
    calls: list[Call] = field(default_factory=list)
    resumes: list[pb.ResumeRequest] = field(default_factory=list)

    def _run(self, request_id: str = "") -> pb.Run:
        return pb.Run(
            run_id=RUN_ID,
            agent_id="scripted",
            state=pb.RUN_STATE_RUNNING,
            request_id=request_id,
            next_offset=N_EVENTS,
        )

    async def _serve(
        self, context: grpc.aio.ServicerContext[object, object], start: int, run: pb.Run
    ) -> AsyncIterator[pb.ObserveResponse]:
        """The messages of call number len(calls) - 1, from index `start`."""
        number = len(self.calls) - 1
        stop = self.abort_at.get(number, N_EVENTS)
        code = self.abort_code.get(number, grpc.StatusCode.UNAVAILABLE)
        if stop < 0:
            await context.abort(code, f"call {number} fails before its snapshot")
        yield pb.ObserveResponse(snapshot=pb.RunSnapshot(run=run))
        indices = [i for i in range(start, min(stop, N_EVENTS)) if i != self.skip_index]
        for first in range(0, len(indices), BATCH_SIZE):
            batch = [_event(i) for i in indices[first : first + BATCH_SIZE]]
            yield pb.ObserveResponse(events=pb.EventBatch(events=batch))
            yield pb.ObserveResponse(heartbeat=pb.Heartbeat(next_offset=batch[-1].index + 1))
        if stop < N_EVENTS:
            await context.abort(code, f"call {number} fails at index {stop}")

    async def Stream(
        self, request: pb.StreamRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.StreamResponse]:
        self.calls.append(Call("Stream", request.request_id, 0))
        async for message in self._serve(context, 0, self._run(request.request_id)):
            yield pb.StreamResponse.FromString(message.SerializeToString())

    async def Observe(
        self, request: pb.ObserveRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.ObserveResponse]:
        self.calls.append(Call("Observe", request.run_id, request.offset))
        start = max(0, request.offset - self.duplicates)
        async for message in self._serve(context, start, self._run()):
            yield message

    async def Resume(
        self, request: pb.ResumeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.ResumeResponse]:
        self.calls.append(Call("Resume", request.request_id, N_EVENTS))
        self.resumes.append(request)
        async for message in self._serve(context, N_EVENTS, self._run()):
            yield pb.ResumeResponse.FromString(message.SerializeToString())

    async def StartRun(
        self, request: pb.StartRunRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.StartRunResponse:
        run = self._run(request.request_id)
        run.agent_id, run.input = request.agent_id, request.input
        return pb.StartRunResponse(run=run)

    async def GetRun(
        self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetRunResponse:
        if request.run_id != RUN_ID:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"run {request.run_id!r} not found")
        return pb.GetRunResponse(run=self._run())

    async def ListRuns(
        self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ListRunsResponse:
        token = f"{request.agent_id}|{list(request.states)}|{request.page_size}"
        return pb.ListRunsResponse(runs=[self._run()], next_page_token=token)

    async def CancelRun(
        self, request: pb.CancelRunRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.CancelRunResponse:
        run = self._run()
        run.state, run.error = pb.RUN_STATE_CANCELLED, request.reason
        return pb.CancelRunResponse(run=run)

    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ListAgentsResponse:
        return pb.ListAgentsResponse(agents=[pb.Agent(agent_id="scripted")])


@pytest.fixture
def service() -> FakeAgentService:
    return FakeAgentService()


@pytest.fixture
async def client(service: FakeAgentService) -> AsyncIterator[KeelClient]:
    server = grpc.aio.server()
    pb_grpc.add_AgentServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with KeelClient(
            f"127.0.0.1:{port}", initial_backoff_s=0.001, max_backoff_s=0.01
        ) as keel:
            yield keel
    finally:
        await server.stop(None)


async def _indices(events: AsyncIterator[pb.AgentEvent]) -> list[int]:
    return [event.index async for event in events]


async def test_stream_yields_every_event_exactly_once_across_drops(
    service: FakeAgentService, client: KeelClient
) -> None:
    service.abort_at = {0: 7, 1: 13}
    seen: list[Reconnect] = []
    handle = client.stream("scripted", "{}", on_reconnect=seen.append)

    assert await _indices(handle.events()) == list(range(N_EVENTS))

    request_id = service.calls[0].key
    assert request_id  # generated, so a retried Stream is idempotent
    assert service.calls == [
        Call("Stream", request_id, 0),
        Call("Observe", RUN_ID, 7),
        Call("Observe", RUN_ID, 13),
    ]
    assert [(r.rpc, r.offset, r.attempt) for r in seen] == [("Observe", 7, 1), ("Observe", 13, 1)]
    assert handle.reconnects == seen
    assert (handle.run_id, handle.next_offset) == (RUN_ID, N_EVENTS)
    assert handle.snapshot is not None and handle.snapshot.run.run_id == RUN_ID


async def test_stream_dropped_before_its_snapshot_is_retried_with_the_same_request_id(
    service: FakeAgentService, client: KeelClient
) -> None:
    service.abort_at = {0: -1, 1: -1}
    handle = client.stream("scripted", "{}", request_id="req-1")

    assert await _indices(handle.events()) == list(range(N_EVENTS))
    assert service.calls == [Call("Stream", "req-1", 0)] * 3
    assert [(r.rpc, r.offset, r.attempt) for r in handle.reconnects] == [
        ("Stream", 0, 1),
        ("Stream", 0, 2),
    ]


async def test_run_handle_resumes_at_the_offset_it_was_given(
    service: FakeAgentService, client: KeelClient
) -> None:
    service.abort_at = {0: 9}
    handle = client.run(RUN_ID)

    assert await _indices(handle.events(from_offset=5)) == list(range(5, N_EVENTS))
    assert service.calls == [Call("Observe", RUN_ID, 5), Call("Observe", RUN_ID, 9)]


async def test_reader_that_stops_resumes_at_last_index_plus_one(
    service: FakeAgentService, client: KeelClient
) -> None:
    handle = client.stream("scripted", "{}")
    async with contextlib.aclosing(handle.events()) as events:
        async for event in events:
            if event.index == 4:
                break
    assert handle.next_offset == 5

    assert await _indices(handle.events()) == list(range(5, N_EVENTS))
    assert service.calls[-1] == Call("Observe", RUN_ID, 5)


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
    ],
)
async def test_status_other_than_unavailable_is_raised_at_once(
    service: FakeAgentService, client: KeelClient, code: grpc.StatusCode
) -> None:
    service.abort_at, service.abort_code = {0: 4}, {0: code}
    handle = client.run(RUN_ID)
    seen: list[int] = []

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for event in handle.events():
            seen.append(event.index)

    assert raised.value.code() == code
    assert seen == [0, 1, 2, 3]
    assert len(service.calls) == 1
    assert handle.reconnects == []


async def test_gives_up_after_max_reconnects_without_progress(
    service: FakeAgentService, client: KeelClient
) -> None:
    service.abort_at = dict.fromkeys(range(10), -1)
    async with KeelClient(client.target, initial_backoff_s=0.001, max_reconnects=3) as keel:
        handle = keel.run(RUN_ID)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _indices(handle.events())

    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(service.calls) == 4  # the first call and 3 reconnects
    assert [r.attempt for r in handle.reconnects] == [1, 2, 3]


async def test_reconnects_that_bring_events_do_not_count_towards_the_limit(
    service: FakeAgentService, client: KeelClient
) -> None:
    service.abort_at = {0: 5, 1: 10, 2: 15}
    async with KeelClient(client.target, initial_backoff_s=0.001, max_reconnects=1) as keel:
        handle = keel.run(RUN_ID)
        assert await _indices(handle.events()) == list(range(N_EVENTS))
    assert [r.offset for r in handle.reconnects] == [5, 10, 15]


async def test_gap_in_indices_raises_instead_of_hiding_lost_events(
    service: FakeAgentService, client: KeelClient
) -> None:
    service.skip_index = 6
    seen: list[int] = []

    with pytest.raises(StreamContractError, match="expected event 6, got 7"):
        async for event in client.run(RUN_ID).events():
            seen.append(event.index)

    assert seen == list(range(6))
    assert len(service.calls) == 1


async def test_events_sends_no_request_until_first_iteration(
    service: FakeAgentService, client: KeelClient
) -> None:
    events = client.stream("scripted", "{}").events()
    await asyncio.sleep(0.05)
    assert service.calls == []

    first = await anext(events)
    assert first.index == 0
    assert len(service.calls) == 1
    await events.aclose()


def test_client_can_be_built_outside_an_event_loop() -> None:
    client = KeelClient("127.0.0.1:1")
    handle = client.run(RUN_ID)
    assert handle.next_offset == 0
    assert client._channel is None  # created on first use, inside the loop


async def test_close_is_safe_to_call_twice(client: KeelClient) -> None:
    await client.get_run(RUN_ID)
    await client.close()
    await client.close()
    # A closed client opens a new channel on its next use.
    assert (await client.get_run(RUN_ID)).run_id == RUN_ID


async def test_unary_helpers_return_proto_messages(client: KeelClient) -> None:
    started = await client.start_run("scripted", "hi", request_id="req-2")
    assert (started.agent_id, started.input, started.request_id) == ("scripted", "hi", "req-2")
    assert (await client.get_run(RUN_ID)).run_id == RUN_ID
    page = await client.list_runs("scripted", states=[pb.RUN_STATE_RUNNING], page_size=5)
    assert [run.run_id for run in page.runs] == [RUN_ID]
    assert page.next_page_token == "scripted|[2]|5"
    cancelled = await client.cancel_run(RUN_ID, reason="enough")
    assert (cancelled.state, cancelled.error) == (pb.RUN_STATE_CANCELLED, "enough")
    assert [agent.agent_id for agent in await client.list_agents()] == ["scripted"]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.get_run("nope")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_decision_dropped_before_its_snapshot_is_sent_again_with_the_same_request_id(
    service: FakeAgentService, client: KeelClient
) -> None:
    service.abort_at = {0: -1, 1: -1}

    snapshot = await client.approve(RUN_ID, "call_1", override_args={"a": 1})

    assert snapshot.run.run_id == RUN_ID
    assert [call.rpc for call in service.calls] == ["Resume"] * 3
    assert len({call.key for call in service.calls}) == 1  # one generated request_id
    decision = service.resumes[0].decisions[0]
    assert (decision.tool_call_id, decision.approve.override_args_json) == ("call_1", '{"a": 1}')


async def test_refused_decision_is_raised_at_once(
    service: FakeAgentService, client: KeelClient
) -> None:
    service.abort_at, service.abort_code = {0: -1}, {0: grpc.StatusCode.FAILED_PRECONDITION}

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.deny(RUN_ID, "call_1", "no", request_id="r-1")

    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert service.calls == [Call("Resume", "r-1", N_EVENTS)]
