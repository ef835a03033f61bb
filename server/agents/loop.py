"""The agent loop: drives a pydantic-ai Agent one node at a time and emits Keel events.

A run is a sequence of steps (docs/ARCHITECTURE.md, "A run's life"). A step has two halves:

- the model half: one model request, streamed (step_start, text/reasoning/
  tool-input events, response_metadata);
- the tools half: pydantic-ai handles the response and runs the function
  tools it asks for (tool_call, tool_result/tool_error), then step_finish.

Each half ends at a boundary where the run's state is consistent (the model
response is complete and in the message history; the tool results are in
the history), and there the loop hands the sink a Checkpoint, which the
executor commits atomically with the events before it. A run resumed from a
checkpoint goes on from that boundary (see server/agents/checkpoint.py).

A run may start from a history of earlier messages (its thread's). A
checkpoint holds only the run's own messages, so it stays small however long
the thread is and says exactly what the run added; the history is passed in
again on every resume. The run's own messages are those pydantic-ai reports
as new (AgentRun.new_messages, which survives the normalisation pydantic-ai
applies to a history it is given), after those of the checkpoint it resumed
from.

The loop never emits start/finish/error/abort: the executor owns the run's
lifecycle and turns a returned LoopResult or a raised exception into the
terminal event. Exceptions (model errors, tool exceptions, usage limits)
propagate unchanged, and so does asyncio.CancelledError: nothing here catches
broad exceptions.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, TypeAlias

import pydantic_core
from pydantic_ai import (
    Agent,
    AgentRun,
    CallToolsNode,
    DeferredToolRequests,
    DeferredToolResults,
    ModelRequestNode,
)
from pydantic_ai._agent_graph import AgentNode  # not re-exported, but AgentRun.next returns it
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart
from pydantic_ai.result import FinalResult
from pydantic_ai.usage import RunUsage
from pydantic_graph import End

from server import tracing
from server.agents.checkpoint import Checkpoint, Phase, dump_messages
from server.agents.drain import DrainStreams
from server.agents.events import StepEvents, usage_between, usage_to_pb
from server.agents.types import AgentSpec, EventSink, LoopResult, RunInfo

# What AgentRun.next returns, whatever the agent's deps and output types.
_Node: TypeAlias = AgentNode[Any, Any] | End[FinalResult[Any]]


async def run_agent_loop(
    spec: AgentSpec,
    prompt: str,
    *,
    run_info: RunInfo,
    sink: EventSink,
    resume: Checkpoint | None = None,
    attempt: int = 1,
    capabilities: Sequence[AbstractCapability[Any]] = (),
    deferred: DeferredToolResults | None = None,
    history: Sequence[ModelMessage] = (),
    conversation_id: str | None = None,
) -> LoopResult:
    """Run `spec`'s agent on `prompt` until it ends or suspends, emitting events to `sink`.

    `history` is what the conversation held before this run (its thread's
    messages), `conversation_id` pydantic-ai's name for that conversation.
    With `resume`, go on from that checkpoint instead of starting afresh; the
    first step (or half step) run is numbered `attempt`, later ones 1. A
    SUSPENDED or RESUMED checkpoint needs `deferred`: the decisions on its
    interrupts. `capabilities` join the agent's own for this run (the
    executor's tool journal and background tools, server/runs/capability.py).
    Returns the run's output, usage and own messages, or, when a tool call
    waits for a human, a result whose `suspended` checkpoint names the
    interrupts. Raises whatever the agent raises.
    """
    deps = spec.deps(run_info) if spec.deps is not None else None
    # The caller's capabilities may drain the model's streams already (one capability
    # costs less than two: server/runs/capability.py); if not, a DrainStreams joins them.
    drain = next((c for c in capabilities if isinstance(c, DrainStreams)), None)
    if drain is None:
        drain = DrainStreams()
        capabilities = [*capabilities, drain]
    own: list[ModelMessage] = []
    if resume is None or resume.phase is Phase.STARTED:
        context = spec.agent.iter(
            prompt,
            message_history=list(history) or None,
            conversation_id=conversation_id,
            deps=deps,
            capabilities=capabilities,
        )
        step = 0
    else:
        own = resume.history()
        context = spec.agent.iter(
            None,
            message_history=[*history, *own],
            conversation_id=conversation_id,
            usage=copy.copy(resume.usage),
            deps=deps,
            capabilities=capabilities,
            deferred_tool_results=deferred,
        )
        step = resume.step
    async with context as run:
        loop = AgentLoop(run, sink, step=step, attempt=attempt, own=own, drain=drain)
        if resume is not None and resume.phase in _MID_STEP:
            loop.resume_tools_half(resume.step_start_usage)
        output = await loop.drive()
        if isinstance(output, DeferredToolRequests):
            return LoopResult("", "", usage_to_pb(run.usage), suspended=loop.suspension(output))
        return loop_result(output, run.usage, dump_messages(loop.own_messages()), loop.step)


# Checkpoints taken between a step's model response and the end of its tools half.
_MID_STEP = frozenset({Phase.RESPONSE, Phase.SUSPENDED, Phase.RESUMED})


def loop_result(output: Any, usage: RunUsage, messages: bytes = b"[]", step: int = 0) -> LoopResult:
    """The LoopResult for a run's final output: text as is, anything else as JSON."""
    # to_json serialises pydantic models, dataclasses and plain containers
    # the way pydantic-ai validated them.
    text, json_output = (output, "") if isinstance(output, str) else ("", "")
    if not isinstance(output, str):
        json_output = pydantic_core.to_json(output).decode()
    return LoopResult(
        text,
        json_output,
        usage_to_pb(usage),
        messages=messages,
        step=step,
        run_usage=copy.copy(usage),
    )


class AgentLoop:
    """Steps through one AgentRun, emitting each step's events and checkpoints.

    `step` is the number of the last step already run (0 for a fresh run), so
    a run resumed from a checkpoint carries its step numbering on; `attempt`
    numbers the first step (or half step) this loop runs, 1 for later ones.
    `own` are the run's messages from before this loop (its checkpoint's).
    """

    def __init__(
        self,
        run: AgentRun[Any, Any],
        sink: EventSink,
        *,
        step: int = 0,
        attempt: int = 1,
        own: Sequence[ModelMessage] = (),
        drain: DrainStreams | None = None,
    ) -> None:
        self._run = run
        self._drain = drain
        self._sink = sink
        self._own = list(own)
        self.step = step
        self._attempt = attempt
        self._events = StepEvents(step=step, attempt=attempt)
        self._usage_at_step_start = copy.copy(run.usage)

    def resume_tools_half(self, step_start_usage: RunUsage) -> None:
        """Prepare to run the tools half of step `self.step`, whose response is in the history."""
        self._events = StepEvents(step=self.step, attempt=self._take_attempt())
        self._usage_at_step_start = copy.copy(step_start_usage)

    def _take_attempt(self) -> int:
        attempt, self._attempt = self._attempt, 1
        return attempt

    def own_messages(self) -> list[ModelMessage]:
        """The run's own messages so far, without the history it started from
        (what a checkpoint serialises)."""
        return [*self._own, *self._run.new_messages()]

    @property
    def usage(self) -> RunUsage:
        """The run's usage so far."""
        return self._run.usage

    async def drive(self) -> Any:
        """Run every remaining node; return the run's final output."""
        node: _Node = self._run.next_node
        while not Agent.is_end_node(node):
            if Agent.is_model_request_node(node):
                with tracing.step_span(self.step + 1) as span:
                    node = await self.model_half(node)
                    # Boundary 1: the response is complete, no tool has run yet.
                    if span is not None:
                        span.set_attribute("keel.attempt", self._events.attempt)
                    if Agent.is_call_tools_node(node):
                        node = await self.tools_half(node)
                        # Boundary 2: the step's tool results are in the history.
            elif Agent.is_call_tools_node(node):
                with tracing.step_span(self.step):  # a step resumed after its response
                    node = await self.tools_half(node)
            else:
                # UserPromptNode, SetFinalResult: bookkeeping without events.
                node = await self._run.next(node)
        return node.data.output

    async def model_half(self, node: ModelRequestNode[Any, Any]) -> _Node:
        """Stream one model request as a new step; return the node after it."""
        self.step += 1
        self._events = StepEvents(step=self.step, attempt=self._take_attempt())
        self._usage_at_step_start = copy.copy(self._run.usage)
        await self._emit(self._events.step_start())

        # A drained request's events come through _on_model_event as the model
        # streams them, and pydantic-ai's stream has none of them; a request
        # that was not drained (see server/agents/drain.py) has them there.
        if self._drain is not None:
            self._drain.handler = self._on_model_event
        try:
            async with node.stream(self._run.ctx) as stream:
                async for event in stream:
                    await self._on_model_event(event)
                streamed = stream.response
        finally:
            if self._drain is not None:
                self._drain.handler = None
        next_node = await self._run.next(node)

        # The response pydantic-ai committed to the history is the truth (a
        # capability may have rewritten it); the streamed one is the fallback
        # for the rare request that leads straight to another request.
        response = next_node.model_response if Agent.is_call_tools_node(next_node) else streamed
        await self._emit(self._events.response_metadata(response))
        if Agent.is_call_tools_node(next_node):
            await self._checkpoint(Phase.RESPONSE)
            if next_node.model_response.tool_calls:
                await self._sink.at_boundary()  # its tool calls may run elsewhere
        else:
            # No tools half follows (e.g. a capability asked for a retry), so
            # the step ends here.
            await self._finish_step(response, next_node)
        return next_node

    async def _on_model_event(self, event: Any) -> None:
        for out in self._events.model_event(event):
            await self._sink.emit(out)

    async def tools_half(self, node: CallToolsNode[Any, Any]) -> _Node:
        """Handle the step's model response and run its tools; return the node after it."""
        async with node.stream(self._run.ctx) as stream:
            async for event in stream:
                for out in self._events.tool_event(event):
                    await self._emit(out)
        next_node = await self._run.next(node)

        if Agent.is_end_node(next_node) and isinstance(next_node.data.output, DeferredToolRequests):
            # The step is suspended, not finished: no step_finish until it resumes.
            return next_node
        await self._finish_step(node.model_response, next_node)
        return next_node

    def suspension(self, requests: DeferredToolRequests) -> Checkpoint:
        """The SUSPENDED checkpoint of a step whose tool calls wait for decisions."""
        interrupts = [_interrupt(call, "approval") for call in requests.approvals] + [
            _interrupt(call, "call") for call in requests.calls
        ]
        return Checkpoint(
            phase=Phase.SUSPENDED,
            step=self.step,
            attempt=self._events.attempt,
            messages=dump_messages(self.own_messages()),
            usage=copy.copy(self._run.usage),
            step_start_usage=copy.copy(self._usage_at_step_start),
            interrupts=tuple(interrupts),
        )

    async def _finish_step(self, response: ModelResponse, next_node: _Node) -> None:
        usage = usage_between(self._usage_at_step_start, self._run.usage)
        await self._emit(self._events.step_finish(usage, response.finish_reason))
        if not Agent.is_end_node(next_node):
            # The last step needs none: the executor commits `finish` with it.
            await self._checkpoint(Phase.STEP, next_node)
            await self._sink.at_boundary()

    async def _checkpoint(self, phase: Phase, next_node: _Node | None = None) -> None:
        messages = self.own_messages()
        if next_node is not None and Agent.is_model_request_node(next_node):
            # pydantic-ai adds the next request (holding this step's tool
            # results) to the history only when that node runs: take it now.
            messages = [*messages, next_node.request]
        await self._sink.checkpoint(
            Checkpoint(
                phase=phase,
                step=self.step,
                attempt=self._events.attempt,
                messages=dump_messages(messages),
                usage=copy.copy(self._run.usage),
                step_start_usage=copy.copy(self._usage_at_step_start),
            )
        )

    async def _emit(self, event: Any) -> None:
        await self._sink.emit(event)


def _interrupt(call: ToolCallPart, kind: str) -> dict[str, Any]:
    return {
        "tool_call_id": call.tool_call_id,
        "tool_name": call.tool_name,
        "args_json": call.args_as_json_str(),
        "kind": kind,
    }
