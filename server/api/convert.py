"""Domain records -> proto messages, and event batches sized for gRPC messages."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from google.protobuf.timestamp_pb2 import Timestamp
from keel.v1 import agent_service_pb2 as pb
from keel.v1.agent_service_pb2 import AgentEvent

from server.agents.types import AgentSpec
from server.events.codec import varint
from server.events.log import RunRecord, RunState
from server.runs.decisions import pending_interrupts

STATE_TO_PROTO: dict[RunState, pb.RunState.ValueType] = {
    RunState.QUEUED: pb.RUN_STATE_QUEUED,
    RunState.RUNNING: pb.RUN_STATE_RUNNING,
    RunState.SUSPENDED: pb.RUN_STATE_SUSPENDED,
    RunState.SUCCEEDED: pb.RUN_STATE_SUCCEEDED,
    RunState.FAILED: pb.RUN_STATE_FAILED,
    RunState.CANCELLED: pb.RUN_STATE_CANCELLED,
}


def _timestamp(ms: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts


INTERRUPT_KINDS: dict[str, pb.InterruptKind.ValueType] = {
    "approval": pb.INTERRUPT_KIND_APPROVAL,
    "call": pb.INTERRUPT_KIND_CALL,
}


def run(record: RunRecord) -> pb.Run:
    return pb.Run(
        run_id=record.run_id,
        agent_id=record.agent_id,
        state=STATE_TO_PROTO[record.state],
        input=record.input,
        request_id=record.request_id,
        next_offset=record.next_index,
        earliest_offset=record.earliest_index,
        create_time=_timestamp(record.create_time_ms),
        update_time=_timestamp(record.update_time_ms),
        error=record.error,
        pending_interrupts=[
            pb.Interrupt(
                tool_call_id=i["tool_call_id"],
                tool_name=i["tool_name"],
                args_json=i["args_json"],
                kind=INTERRUPT_KINDS[i["kind"]],
            )
            for i in pending_interrupts(record)
        ],
    )


def agent(agent_id: str, spec: AgentSpec, model_name: str, tools: Sequence[pb.Tool]) -> pb.Agent:
    return pb.Agent(
        agent_id=agent_id, description=spec.description, model_name=model_name, tools=tools
    )


def batches(events: Sequence[AgentEvent], max_bytes: int) -> Iterator[Sequence[AgentEvent]]:
    """Split consecutive events into runs that each fit a gRPC message of about max_bytes."""
    start, size = 0, 0
    for i, event in enumerate(events):
        event_size = event.ByteSize() + 8  # field tag and length prefix
        if size and size + event_size > max_bytes:
            yield events[start:i]
            start, size = i, 0
        size += event_size
    if start < len(events):
        yield events[start:]


# Field 2 (`events`, length-delimited) of StreamResponse, ObserveResponse and ResumeResponse.
_EVENTS_FIELD_TAG = b"\x12"


def events_response(encoded_batch: bytes) -> bytes:
    """A serialized Stream/Observe/ResumeResponse carrying an already serialized EventBatch.

    The three responses share one layout, so one encoding serves every stream
    that sends this batch, without copying or re-serializing its events.
    """
    return _EVENTS_FIELD_TAG + varint(len(encoded_batch)) + encoded_batch
