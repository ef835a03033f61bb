"""Mapping from pydantic-ai's stream events to Keel's AgentEvent payloads.

The loop (loop.py) decides *when* things happen (step boundaries, response
metadata, step usage); this module only decides *what* a pydantic-ai event
looks like on the wire. Every function is pure: it returns the events to emit
and never talks to the sink, so the mapping is easy to test and to reuse when
a later issue replays a step from a checkpoint.

JSON conventions (see AgentEvent in the proto): tool arguments, tool results
and structured output travel as JSON text. Tool input deltas are the raw JSON
fragments the model streamed, so their concatenation is the arguments' JSON;
the complete, normalised arguments arrive in `tool_call.args_json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from keel.v1 import agent_service_pb2 as pb
from pydantic_ai.messages import (
    ERROR_OUTCOMES,
    AgentStreamEvent,
    BaseToolReturnPart,
    FilePart,
    FunctionToolCallEvent,
    FunctionToolResultEvent,
    ModelResponse,
    ModelResponsePart,
    NativeToolCallPart,
    NativeToolReturnPart,
    PartDeltaEvent,
    PartEndEvent,
    PartStartEvent,
    TextPart,
    TextPartDelta,
    ThinkingPart,
    ThinkingPartDelta,
    ToolCallPart,
    ToolCallPartDelta,
    tool_return_ta,
)
from pydantic_ai.usage import RunUsage


def usage_to_pb(usage: RunUsage) -> Any:
    """A pydantic-ai RunUsage as a keel.v1.Usage."""
    return pb.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        requests=usage.requests,
        tool_calls=usage.tool_calls,
    )


def usage_between(before: RunUsage, after: RunUsage) -> Any:
    """The usage a step added to the run, as a keel.v1.Usage.

    Taking the difference of the run's totals (rather than the response's own
    RequestUsage) counts the step's tool calls too, and keeps the invariant
    that the step_finish usages of a run add up to its final usage.
    """
    return pb.Usage(
        input_tokens=after.input_tokens - before.input_tokens,
        output_tokens=after.output_tokens - before.output_tokens,
        requests=after.requests - before.requests,
        tool_calls=after.tool_calls - before.tool_calls,
    )


def tool_result_json(part: BaseToolReturnPart[Any]) -> str:
    """A tool's return value as JSON text (a str result becomes a JSON string)."""
    return tool_return_ta.dump_json(part.content).decode()


@dataclass(frozen=True, slots=True)
class StepEvents:
    """Builds the AgentEvents of one attempt of one step.

    The loop creates one per step; run_id, index and time are the sink's job.
    """

    step: int
    attempt: int = 1

    def _event(self, **payload: Any) -> Any:
        return pb.AgentEvent(step=self.step, attempt=self.attempt, **payload)

    # -- step boundaries ---------------------------------------------------

    def step_start(self) -> Any:
        return self._event(step_start=pb.StepStart())

    def step_finish(self, usage: Any, finish_reason: str | None) -> Any:
        return self._event(
            step_finish=pb.StepFinish(usage=usage, finish_reason=finish_reason or "")
        )

    def response_metadata(self, response: ModelResponse) -> Any:
        return self._event(
            response_metadata=pb.ResponseMetadata(
                model_name=response.model_name or "",
                provider_response_id=response.provider_response_id or "",
                provider_name=response.provider_name or "",
            )
        )

    # -- the model half: streamed response parts ---------------------------

    def model_event(self, event: AgentStreamEvent) -> list[Any]:
        """The events for one event of a model response stream (often none)."""
        if isinstance(event, PartStartEvent):
            return self._part_start(event.index, event.part)
        if isinstance(event, PartDeltaEvent):
            return self._part_delta(event)
        if isinstance(event, PartEndEvent):
            return self._part_end(event.index, event.part)
        # FinalResultEvent only says which part pydantic-ai will take as output;
        # events a capability emits into the stream have no Keel counterpart.
        return []

    def _part_start(self, index: int, part: ModelResponsePart) -> list[Any]:
        if isinstance(part, TextPart):
            events = [self._event(text_start=pb.TextStart(part_index=index))]
            if part.content:
                # The first chunk of text arrives inside the start event.
                events.append(
                    self._event(text_delta=pb.TextDelta(part_index=index, delta=part.content))
                )
            return events
        if isinstance(part, ThinkingPart):
            events = [self._event(reasoning_start=pb.ReasoningStart(part_index=index))]
            if part.content:
                events.append(
                    self._event(
                        reasoning_delta=pb.ReasoningDelta(part_index=index, delta=part.content)
                    )
                )
            return events
        if isinstance(part, ToolCallPart):
            events = [
                self._event(
                    tool_input_start=pb.ToolInputStart(
                        part_index=index, tool_call_id=part.tool_call_id, tool_name=part.tool_name
                    )
                )
            ]
            if isinstance(part.args, str) and part.args:
                events.append(self._input_delta(index, part.args))
            elif isinstance(part.args, dict) and part.args:
                # Providers that send arguments as objects send them whole.
                events.append(self._input_delta(index, part.args_as_json_str()))
            return events
        # Native (provider-run) tool parts, files and the rest are reported
        # whole when they end.
        return []

    def _part_delta(self, event: PartDeltaEvent) -> list[Any]:
        delta, index = event.delta, event.index
        if isinstance(delta, TextPartDelta):
            if not delta.content_delta:  # e.g. a citations-only delta
                return []
            return [
                self._event(text_delta=pb.TextDelta(part_index=index, delta=delta.content_delta))
            ]
        if isinstance(delta, ThinkingPartDelta):
            if not delta.content_delta:  # e.g. a signature-only delta
                return []
            return [
                self._event(
                    reasoning_delta=pb.ReasoningDelta(part_index=index, delta=delta.content_delta)
                )
            ]
        if isinstance(delta, ToolCallPartDelta) and isinstance(delta.args_delta, str):
            # Dict deltas are merged, not appended, so they cannot be JSON
            # fragments; their effect shows in tool_call.args_json.
            if not delta.args_delta:
                return []
            return [self._input_delta(index, delta.args_delta)]
        return []

    def _part_end(self, index: int, part: ModelResponsePart) -> list[Any]:
        if isinstance(part, TextPart):
            return [self._event(text_end=pb.TextEnd(part_index=index))]
        if isinstance(part, ThinkingPart):
            return [self._event(reasoning_end=pb.ReasoningEnd(part_index=index))]
        if isinstance(part, ToolCallPart):
            # The id in the end event is authoritative: some providers send it late.
            return [
                self._event(
                    tool_input_end=pb.ToolInputEnd(part_index=index, tool_call_id=part.tool_call_id)
                )
            ]
        if isinstance(part, NativeToolCallPart):
            # The provider runs these tools itself, inside the model response.
            return [self._tool_call(part.tool_call_id, part.tool_name, part.args_as_json_str())]
        if isinstance(part, NativeToolReturnPart):
            return [self._tool_return(part)]
        if isinstance(part, FilePart):
            return [
                self._event(
                    file=pb.File(media_type=part.content.media_type, data=bytes(part.content.data))
                )
            ]
        return []

    def _input_delta(self, index: int, delta: str) -> Any:
        return self._event(tool_input_delta=pb.ToolInputDelta(part_index=index, delta=delta))

    # -- the tools half: function tool calls and their results -------------

    def tool_event(self, event: AgentStreamEvent) -> list[Any]:
        """The events for one event of a call-tools node's stream (often none)."""
        if isinstance(event, FunctionToolCallEvent):
            part = event.part
            return [self._tool_call(part.tool_call_id, part.tool_name, part.args_as_json_str())]
        if isinstance(event, FunctionToolResultEvent):
            return [self._tool_return(event.part)]
        # Output-tool events carry the final result, which the executor reports
        # in `finish`; deferred-tool requests are handled by the loop.
        return []

    def _tool_call(self, tool_call_id: str, tool_name: str, args_json: str) -> Any:
        return self._event(
            tool_call=pb.ToolCall(
                tool_call_id=tool_call_id, tool_name=tool_name, args_json=args_json
            )
        )

    def _tool_return(self, part: BaseToolReturnPart[Any]) -> Any:
        if part.outcome in ERROR_OUTCOMES:
            # 'retried' (ModelRetry, invalid arguments) and 'failed': the model
            # is told and the run goes on, so this is a tool_error, not a run error.
            return self._event(
                tool_error=pb.ToolError(
                    tool_call_id=part.tool_call_id,
                    tool_name=part.tool_name,
                    message=part.model_response_str(wrap_if_error=False),
                )
            )
        return self._event(
            tool_result=pb.ToolResult(
                tool_call_id=part.tool_call_id,
                tool_name=part.tool_name,
                result_json=tool_result_json(part),
                denied=part.outcome == "denied",
            )
        )
