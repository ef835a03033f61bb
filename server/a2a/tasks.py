"""A Keel run as an A2A task, and its events as A2A stream events (docs/a2a.md).

A task is a run (task id = run id), its contextId the run's thread. The run's
text is one artifact ("text") streamed in chunks; structured output one data
artifact ("output"); tool activity and suspensions are status messages. Every
event sent carries NEXT_OFFSET in its metadata: the Keel event index to resume
a SubscribeToTask from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from a2a.types import a2a_pb2 as a2a
from google.protobuf import struct_pb2
from keel.v1.agent_service_pb2 import AgentEvent

from server.events.log import RunRecord, RunState
from server.runs.decisions import pending_interrupts

NEXT_OFFSET = "keel.dev/next_offset"  # in every stream event's (and a task's) metadata
TEXT_ARTIFACT = "text"
OUTPUT_ARTIFACT = "output"

Event = a2a.Task | a2a.TaskStatusUpdateEvent | a2a.TaskArtifactUpdateEvent

STATES: dict[RunState, a2a.TaskState] = {
    RunState.QUEUED: a2a.TASK_STATE_SUBMITTED,
    RunState.ENQUEUED: a2a.TASK_STATE_SUBMITTED,
    RunState.RUNNING: a2a.TASK_STATE_WORKING,
    RunState.SUSPENDED: a2a.TASK_STATE_INPUT_REQUIRED,
    RunState.SUCCEEDED: a2a.TASK_STATE_COMPLETED,
    RunState.FAILED: a2a.TASK_STATE_FAILED,
    RunState.CANCELLED: a2a.TASK_STATE_CANCELED,
}


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def data_part(value: Any) -> a2a.Part:
    part = a2a.Part(media_type="application/json")
    part.data.CopyFrom(struct_pb2.Value())
    _set_value(part.data, value)
    return part


def _set_value(target: struct_pb2.Value, value: Any) -> None:
    holder = struct_pb2.Struct()
    holder.update({"v": value})
    target.CopyFrom(holder.fields["v"])


def _json(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def pending(record: RunRecord) -> list[dict[str, Any]]:
    """The run's interrupts waiting for a decision, as the input-required message lists them."""
    return [
        {
            "tool_call_id": i["tool_call_id"],
            "tool_name": i["tool_name"],
            "args": _json(i["args_json"]),
            "kind": i["kind"],
        }
        for i in pending_interrupts(record)
    ]


def agent_message(task_id: str, context_id: str, *parts: a2a.Part, id_: str) -> a2a.Message:
    return a2a.Message(
        message_id=id_,
        context_id=context_id,
        task_id=task_id,
        role=a2a.ROLE_AGENT,
        parts=list(parts),
    )


def input_required_message(
    task_id: str, context_id: str, interrupts: list[dict[str, Any]], id_: str
) -> a2a.Message:
    """The status message of an input-required task: what its pending calls wait for."""
    names = ", ".join(f"{i['tool_name']} ({i['tool_call_id']}, {i['kind']})" for i in interrupts)
    return agent_message(
        task_id,
        context_id,
        a2a.Part(text=f"waiting for decisions on: {names}"),
        data_part({"pending": interrupts}),
        id_=id_,
    )


def status(record: RunRecord, final_event: AgentEvent | None = None) -> a2a.TaskStatus:
    result = a2a.TaskStatus(state=STATES[record.state])
    result.timestamp.FromMilliseconds(record.update_time_ms)
    if record.state is RunState.SUSPENDED:
        result.message.CopyFrom(
            input_required_message(
                record.run_id,
                record.thread_id,
                pending(record),
                f"{record.run_id}-{record.next_index - 1}",
            )
        )
    elif record.state in (RunState.FAILED, RunState.CANCELLED) and record.error:
        result.message.CopyFrom(
            agent_message(
                record.run_id,
                record.thread_id,
                a2a.Part(text=record.error),
                id_=f"{record.run_id}-end",
            )
        )
    return result


def task(
    record: RunRecord,
    final_event: AgentEvent | None = None,
    history_length: int | None = None,
    text: str | None = None,
) -> a2a.Task:
    """The run as a task; `final_event`: its `finish` event, for a succeeded run's outputs;
    `text`: the run's text so far (its text artifact; None: the finish event's output)."""
    result = a2a.Task(
        id=record.run_id,
        context_id=record.thread_id,
        status=status(record),
        metadata=struct({NEXT_OFFSET: record.next_index, "keel.dev/agent_id": record.agent_id}),
    )
    history = [
        a2a.Message(
            message_id=f"{record.run_id}-input",
            context_id=record.thread_id,
            task_id=record.run_id,
            role=a2a.ROLE_USER,
            parts=[a2a.Part(text=record.input)],
        )
    ]
    if text:
        result.artifacts.append(
            a2a.Artifact(artifact_id=TEXT_ARTIFACT, name="text", parts=[a2a.Part(text=text)])
        )
    if final_event is not None and final_event.WhichOneof("payload") == "finish":
        finish = final_event.finish
        if finish.output_text:
            if text is None:
                result.artifacts.append(
                    a2a.Artifact(
                        artifact_id=TEXT_ARTIFACT,
                        name="text",
                        parts=[a2a.Part(text=finish.output_text)],
                    )
                )
            history.append(
                agent_message(
                    record.run_id,
                    record.thread_id,
                    a2a.Part(text=finish.output_text),
                    id_=f"{record.run_id}-output",
                )
            )
        if finish.output_json:
            result.artifacts.append(
                a2a.Artifact(
                    artifact_id=OUTPUT_ARTIFACT,
                    name="output",
                    parts=[data_part(_json(finish.output_json))],
                )
            )
    if history_length is None:
        result.history.extend(history)
    elif history_length > 0:
        result.history.extend(history[-history_length:])
    return result


class Translator:
    """One stream's A2A events for the run's Keel events, in order.

    The text artifact is built from text deltas: its first chunk replaces
    (append false), later ones append; a superseded attempt's text is taken back
    by sending the text kept so far again with append false. A stream from an
    offset has its translator see the events before it first (their A2A events
    are dropped).
    """

    def __init__(self, record: RunRecord) -> None:
        self._task_id = record.run_id
        self._context_id = record.thread_id
        self._text: list[tuple[int, str]] = []  # (event index, delta) of the text so far
        self._interrupts: dict[str, dict[str, Any]] = {}  # calls that waited, by id
        self._sent_text = False

    @property
    def text(self) -> str:
        """The text artifact as the events so far make it."""
        return "".join(delta for _, delta in self._text)

    def _metadata(self, event: AgentEvent) -> struct_pb2.Struct:
        return struct({NEXT_OFFSET: event.index + 1})

    def _status(
        self,
        event: AgentEvent,
        state: a2a.TaskState,
        *parts: a2a.Part,
    ) -> a2a.TaskStatusUpdateEvent:
        update = a2a.TaskStatusUpdateEvent(
            task_id=self._task_id,
            context_id=self._context_id,
            status=a2a.TaskStatus(state=state),
            metadata=self._metadata(event),
        )
        update.status.timestamp.CopyFrom(event.time)
        if parts:
            update.status.message.CopyFrom(
                agent_message(
                    self._task_id,
                    self._context_id,
                    *parts,
                    id_=f"{self._task_id}-{event.index}",
                )
            )
        return update

    def _chunk(
        self, event: AgentEvent, text: str, *, append: bool, last: bool = False
    ) -> a2a.TaskArtifactUpdateEvent:
        return a2a.TaskArtifactUpdateEvent(
            task_id=self._task_id,
            context_id=self._context_id,
            artifact=a2a.Artifact(
                artifact_id=TEXT_ARTIFACT, name="text", parts=[a2a.Part(text=text)]
            ),
            append=append,
            last_chunk=last,
            metadata=self._metadata(event),
        )

    def translate(
        self, events: Sequence[AgentEvent], suspended: RunRecord | None = None
    ) -> list[Event]:
        """The A2A events for these Keel events; `suspended`: the run's record, read
        after a `suspended` event among them (its pending interrupts)."""
        out: list[Event] = []
        for event in events:
            match event.WhichOneof("payload"):
                case "start" | "resumed":
                    out.append(self._status(event, a2a.TASK_STATE_WORKING))
                case "text_delta":
                    delta = event.text_delta.delta
                    self._text.append((event.index, delta))
                    out.append(self._chunk(event, delta, append=self._sent_text))
                    self._sent_text = True
                case "step_superseded":
                    start = event.step_superseded.from_index
                    kept = [(i, d) for i, d in self._text if i < start]
                    if len(kept) != len(self._text):
                        self._text = kept
                        out.append(self._chunk(event, "".join(d for _, d in kept), append=False))
                        self._sent_text = True
                case "tool_call":
                    call = event.tool_call
                    out.append(
                        self._status(
                            event,
                            a2a.TASK_STATE_WORKING,
                            a2a.Part(text=f"calling {call.tool_name}"),
                            data_part(
                                {
                                    "tool_call": {
                                        "tool_call_id": call.tool_call_id,
                                        "tool_name": call.tool_name,
                                        "args": _json(call.args_json),
                                    }
                                }
                            ),
                        )
                    )
                case "tool_result":
                    result = event.tool_result
                    out.append(
                        self._status(
                            event,
                            a2a.TASK_STATE_WORKING,
                            a2a.Part(
                                text=f"{result.tool_name} "
                                + ("was denied" if result.denied else "returned")
                            ),
                            data_part(
                                {
                                    "tool_result": {
                                        "tool_call_id": result.tool_call_id,
                                        "tool_name": result.tool_name,
                                        "result": _json(result.result_json),
                                        "denied": result.denied,
                                    }
                                }
                            ),
                        )
                    )
                case "tool_output":
                    output = event.tool_output
                    out.append(
                        self._status(
                            event,
                            a2a.TASK_STATE_WORKING,
                            a2a.Part(text="tool output"),
                            data_part(
                                {
                                    "tool_output": {
                                        "tool_call_id": output.tool_call_id,
                                        "output": _json(output.output_json),
                                    }
                                }
                            ),
                        )
                    )
                case "tool_error":
                    error = event.tool_error
                    out.append(
                        self._status(
                            event,
                            a2a.TASK_STATE_WORKING,
                            a2a.Part(text=f"{error.tool_name} failed: {error.message}"),
                            data_part(
                                {
                                    "tool_error": {
                                        "tool_call_id": error.tool_call_id,
                                        "tool_name": error.tool_name,
                                        "message": error.message,
                                    }
                                }
                            ),
                        )
                    )
                case "tool_call_approval" | "tool_call_suspended":
                    approval = event.HasField("tool_call_approval")
                    waiting = event.tool_call_approval if approval else event.tool_call_suspended
                    self._interrupts[waiting.tool_call_id] = {
                        "tool_call_id": waiting.tool_call_id,
                        "tool_name": waiting.tool_name,
                        "args": _json(waiting.args_json),
                        "kind": "approval" if approval else "call",
                    }
                case "suspended":
                    update = self._status(event, a2a.TASK_STATE_INPUT_REQUIRED)
                    ids = list(event.suspended.tool_call_ids)
                    interrupts = [self._interrupts[i] for i in ids if i in self._interrupts]
                    if len(interrupts) != len(ids) and suspended is not None:
                        interrupts = pending(suspended)  # a stream that missed their calls
                    update.status.message.CopyFrom(
                        input_required_message(
                            self._task_id,
                            self._context_id,
                            interrupts,
                            f"{self._task_id}-{event.index}",
                        )
                    )
                    out.append(update)
                case "finish":
                    finish = event.finish
                    if self._sent_text:
                        out.append(self._chunk(event, "", append=True, last=True))
                    if finish.output_json:
                        out.append(
                            a2a.TaskArtifactUpdateEvent(
                                task_id=self._task_id,
                                context_id=self._context_id,
                                artifact=a2a.Artifact(
                                    artifact_id=OUTPUT_ARTIFACT,
                                    name="output",
                                    parts=[data_part(_json(finish.output_json))],
                                ),
                                last_chunk=True,
                                metadata=self._metadata(event),
                            )
                        )
                    out.append(self._status(event, a2a.TASK_STATE_COMPLETED))
                case "abort":
                    out.append(
                        self._status(
                            event, a2a.TASK_STATE_CANCELED, a2a.Part(text=event.abort.reason)
                        )
                    )
                case "error":
                    out.append(
                        self._status(
                            event, a2a.TASK_STATE_FAILED, a2a.Part(text=event.error.message)
                        )
                    )
                case _:
                    pass
        return out
