"""The running tool's view of the tool journal (server/runs/journal.py): its note, kept for
a re-run of the call and fenced like the result, and its ToolOutput events."""

from __future__ import annotations

from typing import Any, cast

import pytest
from a2a.types import a2a_pb2 as a2a
from keel.v1.agent_service_pb2 import ToolOutput
from pydantic_ai.messages import ToolCallPart
from pydantic_ai.tools import ToolDefinition

from server.a2a.remote import RemoteTask, state_name
from server.a2a.tasks import data_part
from server.errors import StaleEpoch
from server.events.log import RunRecord, RunState
from server.events.memory import MemoryEventLog
from server.runs.journal import JournaledCall, ToolJournal, current_call
from server.runs.writer import EventWriter


async def new_run(log: MemoryEventLog) -> RunRecord:
    record, _ = await log.create_run(
        RunRecord(
            run_id="run-1",
            agent_id="echo",
            input="hello",
            request_id="",
            state=RunState.RUNNING,
            create_time_ms=1,
            update_time_ms=1,
            epoch=1,
            owner="instance-a",
        )
    )
    return record


async def execute(journal: ToolJournal, tool_call_id: str, tool: Any) -> Any:
    """One tool call through the journal, `tool` standing for the tool."""

    async def handler(args: Any) -> Any:
        return await tool()

    return await journal.wrap_tool_execute(
        cast(Any, None),
        call=ToolCallPart("remote", {}, tool_call_id=tool_call_id),
        tool_def=ToolDefinition(name="remote"),
        args={},
        handler=handler,
    )


async def test_a_note_outlives_an_interrupted_call_and_outputs_are_events() -> None:
    log = MemoryEventLog()
    await new_run(log)
    writer = EventWriter(log, "run-1", epoch=1, next_index=0)
    writer.step, writer.attempt = 2, 1
    journal = ToolJournal(log, "run-1", 1, writer)
    seen: list[tuple[bytes | None, JournaledCall]] = []

    async def interrupted() -> str:
        call = current_call()
        assert call is not None
        seen.append((await call.noted(), call))
        await call.note(b"task-7")
        await call.note(b"a later note")  # the first one stays
        await call.output({"state": "working"})
        raise RuntimeError("the process died")

    async def again() -> str:
        call = current_call()
        assert call is not None
        seen.append((await call.noted(), call))
        return "answer"

    assert current_call() is None
    with pytest.raises(RuntimeError):
        await execute(journal, "call_0", interrupted)
    assert current_call() is None
    assert await execute(journal, "call_0", again) == "answer"
    assert [noted for noted, _ in seen] == [None, b"task-7"]
    assert {(c.run_id, c.tool_call_id) for _, c in seen} == {("run-1", "call_0")}
    # Journaled now: not run a third time.
    assert await execute(journal, "call_0", interrupted) == "answer"

    await writer.commit()
    [event] = await log.read("run-1", 0, 10)
    assert event.WhichOneof("payload") == "tool_output"
    assert (event.step, event.attempt) == (2, 1)
    assert event.tool_output == ToolOutput(tool_call_id="call_0", output_json='{"state":"working"}')
    await writer.close()


async def test_a_fenced_owner_cannot_note() -> None:
    log = MemoryEventLog()
    await new_run(log)
    await log.release("run-1", 1)
    claimed = await log.claim("run-1", "instance-b")
    assert claimed is not None
    stale = ToolJournal(log, "run-1", 1)

    async def noting() -> str:
        call = current_call()
        assert call is not None
        await call.output("no writer: nothing happens")
        await call.note(b"late")
        return "never"

    with pytest.raises(StaleEpoch):
        await execute(stale, "call_0", noting)
    assert await log.journaled_tool("run-1", "call_0#note") is None


def test_a_remote_task_is_rebuilt_from_its_stream() -> None:
    task = RemoteTask()
    first = a2a.StreamResponse(
        task=a2a.Task(id="t1", status=a2a.TaskStatus(state=a2a.TASK_STATE_WORKING))
    )
    assert task.add(first) == [{"task_id": "t1", "state": "working"}]

    def chunk(text: str, *, append: bool) -> a2a.StreamResponse:
        update = a2a.TaskArtifactUpdateEvent(
            task_id="t1",
            artifact=a2a.Artifact(artifact_id="text", parts=[a2a.Part(text=text)]),
            append=append,
        )
        return a2a.StreamResponse(artifact_update=update)

    task.add(chunk("stale", append=False))
    task.add(chunk("a ", append=False))  # replaces
    task.add(chunk("b", append=True))
    data = a2a.TaskArtifactUpdateEvent(
        task_id="t1", artifact=a2a.Artifact(artifact_id="output", parts=[data_part({"x": 1})])
    )
    task.add(a2a.StreamResponse(artifact_update=data))
    done = a2a.TaskStatusUpdateEvent(
        task_id="t1", status=a2a.TaskStatus(state=a2a.TASK_STATE_COMPLETED)
    )
    assert task.add(a2a.StreamResponse(status_update=done)) == [
        {"task_id": "t1", "state": "completed"}
    ]
    assert task.ended and not task.waiting
    assert task.answer() == {"text": "a b", "data": [{"x": 1}]}
    assert state_name(a2a.TASK_STATE_INPUT_REQUIRED) == "input-required"
