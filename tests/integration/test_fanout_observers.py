"""Live fan-out to many observers of one run: every event once, in order, the same bytes
for all; heartbeats on quiet stretches name exactly the next event."""

from __future__ import annotations

import asyncio
from typing import Any

from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from tests.integration.conftest import assert_contiguous, payloads, script, text


async def _follow(stub: pb_grpc.AgentServiceStub, run_id: str) -> list[Any]:
    """Everything after the snapshot: events, and heartbeats as ("heartbeat", next_offset)."""
    received: list[Any] = []
    async for response in stub.Observe(pb.ObserveRequest(run_id=run_id, offset=0)):
        kind = response.WhichOneof("kind")
        if kind == "events":
            received.extend(response.events.events)
        elif kind == "heartbeat":
            received.append(("heartbeat", response.heartbeat.next_offset))
    return received


async def test_fifty_live_observers_get_the_same_events_once_and_heartbeats_in_place(
    stub: pb_grpc.AgentServiceStub,
) -> None:
    # Deltas every few ms, then one that takes longer than the 0.2 s heartbeat interval.
    steps = script(text(60, delay_ms=3), text(2, delay_ms=700))
    run_id = (await stub.StartRun(pb.StartRunRequest(agent_id="scripted", input=steps))).run.run_id
    streams = await asyncio.gather(*(_follow(stub, run_id) for _ in range(50)))
    first = [e.SerializeToString() for e in streams[0] if not isinstance(e, tuple)]
    for received in streams:
        events = [e for e in received if not isinstance(e, tuple)]
        assert_contiguous(events)
        assert payloads(events)[-1] == "finish"
        assert [e.SerializeToString() for e in events] == first
        # A heartbeat names the index of the next event this stream delivers.
        assert any(isinstance(item, tuple) for item in received)
        delivered = 0
        for item in received:
            if isinstance(item, tuple):
                assert item[1] == delivered
            else:
                delivered += 1
