"""A thread's history: one entry per pydantic-ai ModelMessage, each tagged with its run.

An entry is JSON, `{"run_id": "...", "message": <ModelMessage>}`, and the
store keeps a thread's entries in the order they were added (a list). A run
adds its own messages when it ends, in the same atomic write as its terminal
event, so a thread never holds half a run:

- SUCCEEDED: every message of the run, up to its final response;
- FAILED or CANCELLED: the messages of its last checkpoint, that is up to the
  last step boundary it reached; a response whose tool calls never ran is
  kept as it is; a run that ended before its first model response was
  complete leaves its user prompt alone;
- rolled back (ROLLBACK): nothing;
- SUSPENDED: nothing yet; the run keeps the thread until it ends.

A new run starts from the thread's messages, repaired the way pydantic-ai
repairs a history (a tool call left without a result gets a synthesized one),
so a history that ends on a cancelled step is still valid for any provider.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pydantic import TypeAdapter
from pydantic_ai.messages import (
    ModelMessage,
    ModelMessagesTypeAdapter,
    ModelRequest,
    UserPromptPart,
    repair_messages,
)
from typing_extensions import TypedDict


class _Entry(TypedDict):
    run_id: str
    message: ModelMessage


_ENTRY: TypeAdapter[_Entry] = TypeAdapter(_Entry)

# Read a thread's whole history in one call (a list's positions are far below this).
ALL = 1 << 62


class TaskLike(Protocol):
    """What a task result needs of a task (server.tasks.records.TaskRecord)."""

    @property
    def task_id(self) -> str: ...
    @property
    def tool_name(self) -> str: ...
    @property
    def run_id(self) -> str: ...


@dataclass(frozen=True, slots=True)
class ThreadMessage:
    """One message of a thread, with its position and the run that produced it."""

    index: int
    run_id: str
    message: ModelMessage


def entries(run_id: str, messages_json: bytes) -> list[bytes]:
    """The thread entries of a run's own messages (ModelMessagesTypeAdapter JSON)."""
    return [
        _ENTRY.dump_json({"run_id": run_id, "message": message})
        for message in ModelMessagesTypeAdapter.validate_json(messages_json)
    ]


def prompt_entry(run_id: str, prompt: str) -> bytes:
    """The entry of a run's user prompt alone (a run that ended before its first response)."""
    request = ModelRequest(parts=[UserPromptPart(prompt)])
    return _ENTRY.dump_json({"run_id": run_id, "message": request})


# How a background task's outcome reaches a model: a user message of this form
# (the scripted agent recognises it; see server/agents/testing.py).
TASK_RESULT_PREFIX = "[task "


def task_result_prompt(
    task_id: str, tool_name: str, status: str, *, result_json: str = "", error: str = ""
) -> str:
    """The message that tells a model how one of its background tasks ended."""
    outcome = result_json if status == "completed" else error
    return f"{TASK_RESULT_PREFIX}{task_id}] {tool_name} {status}: {outcome}"


def task_result_entry(
    task: TaskLike, status: str, *, result_json: str = "", error: str = ""
) -> bytes:
    """The thread entry of a background task's late outcome (its run did not wait for it)."""
    prompt = task_result_prompt(
        task.task_id, task.tool_name, status, result_json=result_json, error=error
    )
    return prompt_entry(task.run_id, prompt)


def decode(index: int, entry: bytes) -> ThreadMessage:
    body = _ENTRY.validate_json(entry)
    return ThreadMessage(index, body["run_id"], body["message"])


def history(stored: Sequence[bytes]) -> list[ModelMessage]:
    """The messages a new run of the thread starts from (see the module docstring)."""
    messages = [decode(index, entry).message for index, entry in enumerate(stored)]
    return repair_messages(messages, repair_last_response=True) if messages else []
