"""Domain records -> proto messages, and event batches sized for gRPC messages."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import pydantic_core
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from keel.v1 import agent_service_pb2 as pb
from keel.v1.agent_service_pb2 import AgentEvent
from pydantic_ai import messages as ai

from server.agents.events import tool_result_json
from server.agents.types import AgentSpec
from server.events import lineage
from server.events.codec import varint
from server.events.log import RunRecord, RunState, ThreadRecord
from server.goals.records import Goal, GoalProgress
from server.runs.decisions import pending_interrupts
from server.tasks.records import STATUS_TO_PROTO, TaskRecord
from server.threads.history import ThreadMessage

STATE_TO_PROTO: dict[RunState, pb.RunState.ValueType] = {
    RunState.QUEUED: pb.RUN_STATE_QUEUED,
    RunState.ENQUEUED: pb.RUN_STATE_QUEUED,  # waiting for its thread: not started either
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
    message = pb.Run(
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
        thread_id=record.thread_id,
        until_idle=record.until_idle,
        schedule_id=record.schedule_id,
        incarnation=lineage.latest(record.lineage),
    )
    goal = Goal.decode(record.goal)
    if goal is not None:
        message.goal.CopyFrom(goal_message(goal))
        progress = GoalProgress.decode(record.goal_progress)
        message.goal_attempts = progress.attempts
        if progress.met is not None:
            message.goal_met = progress.met
    return message


def goal_message(goal: Goal) -> pb.Goal:
    return pb.Goal(
        objective=goal.objective,
        judge_agent_id=goal.judge_agent_id,
        max_attempts=goal.max_attempts,
    )


def agent(
    agent_id: str,
    spec: AgentSpec,
    model_name: str,
    tools: Sequence[pb.Tool],
    *,
    default_retention_s: float,
) -> pb.Agent:
    retention = Duration()
    retention.FromNanoseconds(round((spec.ended_run_retention_s or default_retention_s) * 1e9))
    return pb.Agent(
        agent_id=agent_id,
        description=spec.description,
        model_name=model_name,
        tools=tools,
        live_only=not spec.resumable,
        ended_run_retention=retention,
        max_concurrent_tasks=spec.max_concurrent_tasks,
        default_goal=None if spec.default_goal is None else goal_message(spec.default_goal),
    )


def task(record: TaskRecord) -> pb.Task:
    timeout = Duration()
    timeout.FromNanoseconds(round(record.timeout_s * 1e9))
    return pb.Task(
        task_id=record.task_id,
        run_id=record.run_id,
        agent_id=record.agent_id,
        tool_name=record.tool_name,
        tool_call_id=record.tool_call_id,
        args_json=record.args_json,
        status=STATUS_TO_PROTO[record.status],
        attempt=record.attempt,
        max_retries=record.max_retries,
        timeout=timeout,
        progress=record.progress,
        result_json=record.result_json,
        error=record.error,
        create_time=_timestamp(record.create_time_ms),
        update_time=_timestamp(record.update_time_ms),
    )


def thread(record: ThreadRecord) -> pb.Thread:
    return pb.Thread(
        thread_id=record.thread_id,
        resource_id=record.resource_id,
        metadata=record.metadata,
        create_time=_timestamp(record.create_time_ms),
        update_time=_timestamp(record.update_time_ms),
        active_run_id=record.active_run_id,
        queued_run_ids=record.queued_run_ids,
        message_count=record.message_count,
        request_id=record.request_id,
    )


def thread_message(item: ThreadMessage) -> pb.ThreadMessage:
    """One message of a thread: its pydantic-ai parts as typed MessageParts."""
    message = item.message
    out = pb.ThreadMessage(
        index=item.index,
        run_id=item.run_id,
        kind=(
            pb.MESSAGE_KIND_REQUEST
            if isinstance(message, ai.ModelRequest)
            else pb.MESSAGE_KIND_RESPONSE
        ),
        parts=[_message_part(part) for part in message.parts],
    )
    # A request's own timestamp may be unset; its parts carry theirs.
    stamps = [message.timestamp, *(getattr(p, "timestamp", None) for p in message.parts)]
    made = next((stamp for stamp in stamps if stamp is not None), None)
    if made is not None:
        out.create_time.FromDatetime(made)
    return out


def _message_part(part: Any) -> pb.MessagePart:
    match part:
        case ai.UserPromptPart(content=str() as text):
            return pb.MessagePart(user_prompt=pb.UserPromptPart(text=text))
        case ai.UserPromptPart(content=content):
            text = " ".join(
                item if isinstance(item, str) else f"[{getattr(item, 'kind', 'content')}]"
                for item in content
            )
            return pb.MessagePart(user_prompt=pb.UserPromptPart(text=text))
        case ai.SystemPromptPart(content=text):
            return pb.MessagePart(system_prompt=pb.SystemPromptPart(text=text))
        case ai.TextPart(content=text):
            return pb.MessagePart(text=pb.TextPart(text=text))
        case ai.ThinkingPart(content=text):
            return pb.MessagePart(reasoning=pb.ReasoningPart(text=text))
        case ai.ToolCallPart():
            call = pb.ToolCall(
                tool_call_id=part.tool_call_id,
                tool_name=part.tool_name,
                args_json=part.args_as_json_str(),
            )
            return pb.MessagePart(tool_call=call)
        case ai.ToolReturnPart() if part.outcome in ai.ERROR_OUTCOMES:
            failed = pb.ToolError(
                tool_call_id=part.tool_call_id,
                tool_name=part.tool_name,
                message=part.model_response_str(wrap_if_error=False),
            )
            return pb.MessagePart(retry=failed)
        case ai.ToolReturnPart():
            result = pb.ToolResult(
                tool_call_id=part.tool_call_id,
                tool_name=part.tool_name,
                result_json=tool_result_json(part),
                denied=part.outcome == "denied",
            )
            return pb.MessagePart(tool_result=result)
        case ai.RetryPromptPart():
            retry = pb.ToolError(
                tool_call_id=part.tool_call_id if part.tool_name else "",
                tool_name=part.tool_name or "",
                message=part.model_response(),
            )
            return pb.MessagePart(retry=retry)
        case ai.FilePart(content=content):
            return pb.MessagePart(file=pb.File(media_type=content.media_type, data=content.data))
        case _:
            other = pb.OtherPart(
                part_kind=str(getattr(part, "part_kind", type(part).__name__)),
                part_json=pydantic_core.to_json(part).decode(),
            )
            return pb.MessagePart(other=other)


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


T = TypeVar("T")


class LastBatch(Generic[T]):
    """What a run's last batch became (its response, its JSON, its SSE text), made once:
    the streams of a run carry the same encoded batch, the same bytes object, one after
    another. The batch is held, so its identity stays unique while it is kept."""

    def __init__(self) -> None:
        self._batch: bytes | None = None
        self._made: Any = None

    def get(self, batch: bytes, make: Callable[[bytes], T]) -> T:
        if batch is not self._batch:
            self._made = make(batch)
            self._batch = batch
        made: T = self._made
        return made
