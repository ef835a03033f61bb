"""What the agent loop needs from the rest of Keel, as small protocols and records."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from keel.v1.agent_service_pb2 import AgentEvent, Usage
from pydantic_ai import Agent
from pydantic_ai.usage import RunUsage

from server.agents.checkpoint import Checkpoint
from server.goals.records import Goal


class EventSink(Protocol):
    """Where the loop emits events.

    The loop fills in the payload, `step` and `attempt`; the sink assigns
    run_id, index and time, and commits events to the log in batches.
    """

    async def emit(self, event: AgentEvent) -> None:
        """Queue one event for the log; may wait when the writer is behind."""

    async def checkpoint(self, checkpoint: Checkpoint) -> None:
        """Commit every event emitted so far together with `checkpoint`, atomically."""

    async def at_boundary(self) -> None:
        """The checkpoint just committed ends a half-step (a response whose tool calls
        are still to run, or a complete step): execution may stop here and go on
        elsewhere from it at no cost. A sink may stop the loop by raising."""


class Counters(Protocol):
    """A per-run counter store (Redis when configured): how tests prove a tool ran once."""

    async def incr_counter(self, run_id: str, key: str, *, once_key: str = "") -> int: ...


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What Keel knows about a run when it builds the agent's deps."""

    run_id: str
    counters: Counters

    def idempotency_key(self, tool_call_id: str) -> str:
        """A key stable across every re-run of one tool call: give it to side effects.

        A tool that finished is never called again (its result is journaled),
        but one interrupted while running (its process died) runs again after
        the takeover: at least once. A tool whose effect must happen once
        passes this key to whatever it changes (an idempotent API, a
        dedupe table) so the repeat is harmless.
        """
        return f"{self.run_id}:{tool_call_id}"


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """A registry entry: an ordinary pydantic-ai Agent plus how to build its deps for a run."""

    agent: Agent[Any, Any]
    description: str = ""
    deps: Callable[[RunInfo], Any] | None = None  # None: the agent takes no deps
    # Checks a run's input before the run is created; raises server.errors.InvalidArgument.
    validate_input: Callable[[str], None] | None = None
    approval_tools: frozenset[str] = field(default_factory=frozenset)
    # False: the agent's runs are live only. Their events go to the streams open at
    # the time and are not kept (Observe below the head is RUN_NOT_RESUMABLE); the
    # run record, checkpoints and takeover work as for any run.
    resumable: bool = True
    # How long the agent's ended runs are kept, overriding the server's terminal_ttl_s.
    ended_run_retention_s: float | None = None
    # The most background tasks of this agent running at once across every server
    # sharing the store; 0: only the server's global limit applies.
    max_concurrent_tasks: int = 0
    # The goal the agent's runs pursue when their request sets none (docs/goals.md).
    default_goal: Goal | None = None

    def __post_init__(self) -> None:
        retention = self.ended_run_retention_s
        if retention is not None and not retention > 0:
            raise ValueError(f"ended_run_retention_s must be positive, got {retention}")
        if not 0 <= self.max_concurrent_tasks <= 100_000:
            raise ValueError(
                f"max_concurrent_tasks must be in [0, 100000], got {self.max_concurrent_tasks}"
            )


@dataclass(frozen=True, slots=True)
class LoopResult:
    """How a run's agent loop ended: with its output, or suspended."""

    output_text: str  # the final output, for text output
    output_json: str  # the final output as JSON, for structured output ("" for text)
    usage: Usage
    # Set when the run suspended: the checkpoint to resume from (its `interrupts`
    # name the tool calls that wait for a decision). The output fields are then empty.
    suspended: Checkpoint | None = None
    # The run's own messages (not the history it started from), as
    # ModelMessagesTypeAdapter JSON: what joins the run's thread.
    messages: bytes = b"[]"
    step: int = 0  # the last step the loop ran
    run_usage: RunUsage = field(default_factory=RunUsage)  # the run's usage, for a checkpoint
