"""Checkpoints: where a run's agent loop stood at a step boundary, so another process can go on.

The loop reaches a boundary twice per step (docs/durability.md):

- RESPONSE: the step's model response is complete and in the history, and
  none of its tool calls has run, so a re-run executes the *same* calls with
  the same ids (the tool journal answers those that already finished);
- STEP: the step is complete: its tool results are in the history.

A run also has one STARTED checkpoint, committed with its `start` event,
and a SUSPENDED one when a tool call needs a human (committed with the
`suspended` event, so the suspension is persisted before it is announced),
followed by a RESUMED one when the decisions arrived. A checkpoint is
committed in the same atomic append as the events before it, so the log and
the checkpoint can never disagree: `next_index` is the index
of the first event *after* the checkpoint, and any event from there on
belongs to an attempt that the checkpoint does not cover.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter
from pydantic_ai.messages import ModelMessage, ModelMessagesTypeAdapter
from pydantic_ai.usage import RunUsage

_USAGE = TypeAdapter(RunUsage)
_VERSION = 1


class Phase(enum.StrEnum):
    """Which boundary a checkpoint was taken at."""

    STARTED = "started"  # the run started; no step has run
    RESPONSE = "response"  # the step's model response is complete; its tools have not run
    STEP = "step"  # the step is complete
    SUSPENDED = "suspended"  # the step's tools half waits for decisions on `interrupts`
    RESUMED = "resumed"  # the decisions arrived (stored with the run); the tools half goes on
    WAITING = "waiting"  # the model is done; the run waits for its background tasks (until_idle)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The loop's state at a boundary, serialized into the run's record."""

    phase: Phase
    step: int  # the step the phase refers to; 0 for STARTED
    attempt: int = 1  # the attempt of `step` that reached the boundary
    # The run's own messages (not the history it started from), ModelMessagesTypeAdapter JSON.
    messages: bytes = b"[]"
    usage: RunUsage = field(default_factory=RunUsage)  # the run's usage so far
    step_start_usage: RunUsage = field(default_factory=RunUsage)  # usage when `step` began
    next_index: int = -1  # index of the first event after the checkpoint; set when committed
    interrupts: tuple[dict[str, Any], ...] = ()  # pending tool calls of a suspended run
    # Background tasks: the run's task log entries already turned into events, and
    # (until_idle) the outcomes already given to the model ("<task id>@<attempt>").
    task_mark: int = 0
    fed: tuple[str, ...] = ()
    # Goals: how many attempts the judge has evaluated (each committed with its event).
    judged: int = 0
    # WAITING: the output the run finishes with if no task result follows.
    output_text: str = ""
    output_json: str = ""

    def encode(self) -> bytes:
        header = {
            "v": _VERSION,
            "phase": self.phase.value,
            "step": self.step,
            "attempt": self.attempt,
            "next_index": self.next_index,
            "usage": _USAGE.dump_python(self.usage, mode="json"),
            "step_start_usage": _USAGE.dump_python(self.step_start_usage, mode="json"),
            "interrupts": list(self.interrupts),
            "task_mark": self.task_mark,
            "fed": list(self.fed),
            "judged": self.judged,
            "output_text": self.output_text,
            "output_json": self.output_json,
        }
        # The history is already JSON: splice it in rather than parse and re-encode it.
        return (
            json.dumps(header, separators=(",", ":")).encode()[:-1]
            + b',"messages":'
            + (self.messages + b"}")
        )

    @classmethod
    def decode(cls, data: bytes) -> Checkpoint:
        body = json.loads(data)
        if body.get("v") != _VERSION:
            raise ValueError(f"unsupported checkpoint version {body.get('v')!r}")
        return cls(
            phase=Phase(body["phase"]),
            step=int(body["step"]),
            attempt=int(body["attempt"]),
            messages=json.dumps(body["messages"], separators=(",", ":")).encode(),
            usage=_USAGE.validate_python(body["usage"]),
            step_start_usage=_USAGE.validate_python(body["step_start_usage"]),
            next_index=int(body["next_index"]),
            interrupts=tuple(body["interrupts"]),
            task_mark=int(body.get("task_mark", 0)),
            fed=tuple(body.get("fed", ())),
            judged=int(body.get("judged", 0)),
            output_text=body.get("output_text", ""),
            output_json=body.get("output_json", ""),
        )

    def history(self) -> list[ModelMessage]:
        """The message history to resume from, without any interrupted partial response.

        Checkpoints are only taken at boundaries, so none should be there; the
        filter keeps a partial response pydantic-ai marked interrupted (a
        cancelled stream) from ever reaching the model as if it were whole.
        """
        messages = ModelMessagesTypeAdapter.validate_json(self.messages)
        return [m for m in messages if getattr(m, "state", "complete") != "interrupted"]


def dump_messages(messages: list[ModelMessage]) -> bytes:
    return ModelMessagesTypeAdapter.dump_json(messages)
