"""keel_client's incarnation checks against a real grpc.aio server scripted per call.

A resuming RunHandle sends the incarnation of the store that wrote the events
it holds (ObserveRequest.incarnation): the snapshot's run.incarnation, then a
heartbeat's newer one. A server whose store came back with an older state
answers FAILED_PRECONDITION (LOG_ROLLED_BACK, with an ErrorInfo in the status
details): the handle raises LogRolledBack with the metadata parsed, and never
retries it. No real rolled-back store is needed: each call of the server
below serves what its test scripts.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc
from keel_client import KeelClient, LogRolledBack
from keel_client import sync as keel_sync

RUN_ID = "run-1"
HEAD = 12


def _event(index: int) -> pb.AgentEvent:
    return pb.AgentEvent(run_id=RUN_ID, index=index, text_delta=pb.TextDelta(delta=f"t{index}"))


def snapshot(incarnation: str) -> pb.ObserveResponse:
    run = pb.Run(run_id=RUN_ID, state=pb.RUN_STATE_RUNNING, next_offset=HEAD)
    run.incarnation = incarnation
    return pb.ObserveResponse(snapshot=pb.RunSnapshot(run=run))


def events(start: int, end: int) -> pb.ObserveResponse:
    return pb.ObserveResponse(events=pb.EventBatch(events=[_event(i) for i in range(start, end)]))


def heartbeat(next_offset: int, incarnation: str = "") -> pb.ObserveResponse:
    beat = pb.Heartbeat(next_offset=next_offset)
    beat.incarnation = incarnation
    return pb.ObserveResponse(heartbeat=beat)


def rolled_back(metadata: dict[str, str]) -> status_pb2.Status:
    """The status a server sends when the log no longer holds what the client received."""
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(reason="LOG_ROLLED_BACK", domain="keel.dev", metadata=metadata)
    )
    return status_pb2.Status(
        code=code_pb2.FAILED_PRECONDITION, message="the store lost events", details=[info]
    )


@dataclass
class Script:
    """What one call serves: these messages, then OK, a plain status, or a rich one."""

    messages: Sequence[pb.ObserveResponse]
    code: grpc.StatusCode | None = None
    status: status_pb2.Status | None = None


@dataclass
class ScriptedService(pb_grpc.AgentServiceServicer):
    """Serves call number n (Observe or Stream) as scripts[n] says; records the requests."""

    scripts: list[Script] = field(default_factory=list)
    observes: list[pb.ObserveRequest] = field(default_factory=list)
    calls: int = 0

    async def _serve(
        self, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.ObserveResponse]:
        number = self.calls
        self.calls += 1
        script = self.scripts[number] if number < len(self.scripts) else Script([])
        for message in script.messages:
            yield message
        if script.status is not None:
            await context.abort_with_status(rpc_status.to_status(script.status))
        if script.code is not None:
            await context.abort(script.code, f"call {number} fails")

    async def Observe(
        self, request: pb.ObserveRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.ObserveResponse]:
        self.observes.append(request)
        async for message in self._serve(context):
            yield message

    async def Stream(
        self, request: pb.StreamRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.StreamResponse]:
        async for message in self._serve(context):
            yield pb.StreamResponse.FromString(message.SerializeToString())


@pytest.fixture
def service() -> ScriptedService:
    return ScriptedService()


@pytest.fixture
async def target(service: ScriptedService) -> AsyncIterator[str]:
    server = grpc.aio.server()
    pb_grpc.add_AgentServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture
async def client(target: str) -> AsyncIterator[KeelClient]:
    async with KeelClient(target, initial_backoff_s=0.001, max_backoff_s=0.01) as keel:
        yield keel


def sent(service: ScriptedService) -> list[tuple[int, str]]:
    """(offset, incarnation) of every Observe the server received."""
    return [(request.offset, request.incarnation) for request in service.observes]


async def test_reconnects_send_the_snapshots_incarnation_then_a_newer_heartbeats(
    service: ScriptedService, client: KeelClient
) -> None:
    unavailable = grpc.StatusCode.UNAVAILABLE
    service.scripts = [
        # Started below the head (12): the snapshot's incarnation is the one to send.
        Script([snapshot("A"), events(0, 3), heartbeat(3, ""), events(3, 5)], unavailable),
        # The store changed under the stream: a heartbeat says so before the new events.
        Script([snapshot("A"), heartbeat(5, "B"), events(5, 8)], unavailable),
        Script([snapshot("B"), events(8, HEAD)]),
    ]
    handle = client.run(RUN_ID)
    seen: list[tuple[int, str]] = []

    async for event in handle.events():
        seen.append((event.index, handle.incarnation))

    assert [index for index, _ in seen] == list(range(HEAD))
    assert sent(service) == [(0, ""), (5, "A"), (8, "B")]
    assert dict(seen)[4] == "A" and dict(seen)[5] == "B"  # the heartbeat came before event 5
    assert handle.incarnation == "B"
    assert len(handle.reconnects) == 2


async def test_stream_handle_sends_the_incarnation_its_stream_snapshot_named(
    service: ScriptedService, client: KeelClient
) -> None:
    service.scripts = [
        Script([snapshot("A"), events(0, 4)], grpc.StatusCode.UNAVAILABLE),
        Script([snapshot("A"), events(4, HEAD)]),
    ]
    handle = client.stream("scripted", "{}")

    assert [event.index async for event in handle.events()] == list(range(HEAD))
    assert sent(service) == [(4, "A")]


async def test_heartbeat_behind_the_handle_or_without_incarnation_keeps_the_handles(
    service: ScriptedService, client: KeelClient
) -> None:
    service.scripts = [
        Script([snapshot("A"), events(0, 6)], grpc.StatusCode.UNAVAILABLE),
        # A server that re-sends events the handle holds: a heartbeat among them
        # speaks for fewer events than the handle holds, one without incarnation for none.
        Script([snapshot("A"), events(3, 5), heartbeat(5, "OLD"), events(5, 7), heartbeat(7)]),
    ]
    handle = client.run(RUN_ID)

    assert [event.index async for event in handle.events()] == list(range(7))
    assert handle.incarnation == "A"


async def test_a_reconnect_before_the_first_event_sends_no_incarnation(
    service: ScriptedService, client: KeelClient
) -> None:
    service.scripts = [
        Script([snapshot("A")], grpc.StatusCode.UNAVAILABLE),
        Script([snapshot("A"), events(0, 2)]),
    ]
    handle = client.run(RUN_ID)

    assert [event.index async for event in handle.events()] == [0, 1]
    assert handle.incarnation == "A"  # remembered, but no event held at offset 0 to vouch for
    assert sent(service) == [(0, ""), (0, "")]


async def test_from_offset_past_next_offset_forgets_the_incarnation_and_below_keeps_it(
    service: ScriptedService, client: KeelClient
) -> None:
    service.scripts = [
        Script([snapshot("A"), events(0, 6)]),
        Script([snapshot("B"), events(2, 4)]),  # re-read from 2: the handle holds 0..5
        Script([snapshot("C"), events(9, 10)]),  # skip ahead to 9: it holds no event 8
        Script([snapshot("C"), events(10, HEAD)]),  # from_offset == next_offset: a resume
    ]
    handle = client.run(RUN_ID)

    assert [event.index async for event in handle.events()] == list(range(6))
    assert [event.index async for event in handle.events(from_offset=2)] == [2, 3]
    assert handle.incarnation == "B"
    assert [event.index async for event in handle.events(from_offset=9)] == [9]
    assert [event.index async for event in handle.events(from_offset=10)] == [10, 11]

    assert sent(service) == [(0, ""), (2, "A"), (9, ""), (10, "C")]


async def test_log_rolled_back_becomes_log_rolled_back_and_is_not_retried(
    service: ScriptedService, client: KeelClient
) -> None:
    metadata = {
        "run_id": RUN_ID,
        "offset": "9",
        "next_offset": "7",
        "incarnation": "A",
        "diverged_at": "5",
    }
    service.scripts = [
        Script([snapshot("A"), events(0, 9)], grpc.StatusCode.UNAVAILABLE),
        Script([], status=rolled_back(metadata)),
    ]
    handle = client.run(RUN_ID)
    seen: list[int] = []

    with pytest.raises(LogRolledBack) as raised:
        async for event in handle.events():
            seen.append(event.index)

    error = raised.value
    assert (error.run_id, error.offset, error.next_offset) == (RUN_ID, 9, 7)
    assert (error.incarnation, error.diverged_at) == ("A", 5)
    assert isinstance(error, RuntimeError)
    assert "lost events" in str(error) and "from_offset=5" in str(error)
    assert isinstance(error.__cause__, grpc.aio.AioRpcError)
    assert error.__cause__.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert seen == list(range(9))
    assert sent(service) == [(0, ""), (9, "A")]  # the rolled-back resume, not retried
    assert len(handle.reconnects) == 1
    assert pickle.loads(pickle.dumps(error)).diverged_at == 5

    # The way out the error names: read again from diverged_at (the claim still holds there).
    service.scripts.append(Script([snapshot("B"), events(5, 7)]))
    assert [event.index async for event in handle.events(from_offset=5)] == [5, 6]
    assert sent(service)[-1] == (5, "A")
    assert handle.incarnation == "B"


async def test_log_rolled_back_on_a_live_stream_without_diverged_at(
    service: ScriptedService, client: KeelClient
) -> None:
    metadata = {"run_id": RUN_ID, "offset": "4", "next_offset": "2", "incarnation": "A"}
    service.scripts = [Script([snapshot("A"), events(0, 4)], status=rolled_back(metadata))]
    handle = client.run(RUN_ID)

    with pytest.raises(LogRolledBack) as raised:
        async for _ in handle.events():
            pass

    assert (raised.value.offset, raised.value.next_offset) == (4, 2)
    assert raised.value.diverged_at is None
    assert "from_offset=0" in str(raised.value)
    assert service.calls == 1 and handle.reconnects == []


async def test_other_failed_preconditions_stay_grpc_errors(
    service: ScriptedService, client: KeelClient
) -> None:
    other = rolled_back({"run_id": RUN_ID})
    other.details[0].Pack(error_details_pb2.ErrorInfo(reason="THREAD_BUSY", domain="keel.dev"))
    service.scripts = [Script([], status=other)]

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in client.run(RUN_ID).events():
            pass

    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not isinstance(raised.value, LogRolledBack)


async def test_sync_view_surfaces_the_incarnation_and_log_rolled_back(
    service: ScriptedService, target: str
) -> None:
    metadata = {"run_id": RUN_ID, "offset": "3", "next_offset": "1", "incarnation": "A"}
    metadata["diverged_at"] = "1"
    service.scripts = [
        Script([snapshot("A"), events(0, 3)], grpc.StatusCode.UNAVAILABLE),
        Script([], status=rolled_back(metadata)),
    ]

    def read() -> tuple[list[int], str, LogRolledBack | None]:
        seen: list[int] = []
        with keel_sync.KeelClient(target, initial_backoff_s=0.001) as keel:
            handle = keel.run(RUN_ID)
            try:
                for event in handle.events():
                    seen.append(event.index)
            except keel_sync.LogRolledBack as error:
                return seen, handle.incarnation, error
        return seen, handle.incarnation, None

    seen, incarnation, error = await asyncio.to_thread(read)

    assert (seen, incarnation) == ([0, 1, 2], "A")
    assert error is not None and (error.offset, error.diverged_at) == (3, 1)
    assert sent(service) == [(0, ""), (3, "A")]
