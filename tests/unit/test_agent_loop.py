"""The agent loop over real pydantic-ai agents (FunctionModel stands in for the LLM)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_ai import Agent, DeferredToolResults, RunContext, ToolApproved, ToolDenied
from pydantic_ai.messages import ModelMessage, ModelResponse
from pydantic_ai.models.function import (
    AgentInfo,
    DeltaThinkingCalls,
    DeltaThinkingPart,
    DeltaToolCall,
    DeltaToolCalls,
    FunctionModel,
)

from server.agents.checkpoint import Checkpoint, Phase
from server.agents.loop import run_agent_loop
from server.agents.testing import MAX_DELAY_MS, MAX_TEXT_DELTAS, registry, validate_input
from server.agents.types import AgentSpec, LoopResult, RunInfo
from server.errors import InvalidArgument
from tests.sinks import ListSink


class MemoryCounters:
    """A Counters store in a dict, keyed by (run_id, key)."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], int] = {}
        self.once_keys: set[str] = set()

    async def incr_counter(self, run_id: str, key: str, *, once_key: str = "") -> int:
        if once_key and once_key in self.once_keys:
            return self.values.get((run_id, key), 0)
        if once_key:
            self.once_keys.add(once_key)
        self.values[run_id, key] = self.values.get((run_id, key), 0) + 1
        return self.values[run_id, key]


SCRIPTED = registry["scripted"]


async def run_script(
    steps: list[dict[str, Any]], *, counters: MemoryCounters | None = None, run_id: str = "run-1"
) -> tuple[LoopResult, ListSink]:
    sink = ListSink()
    info = RunInfo(run_id=run_id, counters=counters or MemoryCounters())
    result = await run_agent_loop(SCRIPTED, json.dumps({"steps": steps}), run_info=info, sink=sink)
    return result, sink


async def test_scripted_run_emits_every_family_in_order() -> None:
    result, sink = await run_script(
        [
            {"text": 2},
            {"tool": "record", "args": {"key": "k1"}},
            {"tool": "fail", "args": {"message": "boom"}},
            {"text": 1},
        ]
    )

    assert sink.kinds() == [
        # step 1: text, then the record call
        "step_start",
        "text_start", "text_delta", "text_delta", "text_end",
        "tool_input_start", "tool_input_delta", "tool_input_end",
        "response_metadata",
        "tool_call", "tool_result",
        "step_finish",
        # step 2: the failing tool
        "step_start",
        "tool_input_start", "tool_input_delta", "tool_input_end",
        "response_metadata",
        "tool_call", "tool_error",
        "step_finish",
        # step 3: the rest of the text and the final answer
        "step_start",
        "text_start", "text_delta", "text_delta", "text_end",
        "response_metadata",
        "step_finish",
    ]  # fmt: skip
    assert [e.step for e in sink.events] == [1] * 12 + [2] * 8 + [3] * 7
    assert {e.attempt for e in sink.events} == {1}
    assert all(e.run_id == "" and e.index == 0 for e in sink.events), "the sink assigns these"

    assert [p.delta for p in sink.payloads("text_delta")] == ["t0 ", "t1 ", "t2 ", "done"]
    assert result.output_text == "done"
    assert result.output_json == ""

    first, second = sink.payloads("tool_input_start")
    assert (first.tool_call_id, first.tool_name) == ("call_0", "record")
    assert (second.tool_call_id, second.tool_name) == ("call_1", "fail")
    assert "".join(p.delta for p in sink.payloads("tool_input_delta")[:1]) == '{"key":"k1"}'
    assert [p.tool_call_id for p in sink.payloads("tool_input_end")] == ["call_0", "call_1"]

    (call, fail_call) = sink.payloads("tool_call")
    assert (call.tool_call_id, call.tool_name, json.loads(call.args_json)) == (
        "call_0",
        "record",
        {"key": "k1"},
    )
    assert fail_call.tool_name == "fail"
    (tool_result,) = sink.payloads("tool_result")
    assert (tool_result.tool_call_id, tool_result.tool_name) == ("call_0", "record")
    assert json.loads(tool_result.result_json) == 1
    (tool_error,) = sink.payloads("tool_error")
    assert (tool_error.tool_call_id, tool_error.tool_name, tool_error.message) == (
        "call_1",
        "fail",
        "boom",
    )

    assert {p.model_name for p in sink.payloads("response_metadata")} == {"scripted"}


async def test_step_usages_add_up_to_the_run_usage() -> None:
    result, sink = await run_script(
        [{"text": 3}, {"tool": "record", "args": {"key": "a"}}, {"text": 2}]
    )
    finishes = sink.payloads("step_finish")
    assert [f.usage.requests for f in finishes] == [1, 1]
    assert [f.usage.tool_calls for f in finishes] == [1, 0]
    assert all(f.usage.output_tokens > 0 and f.usage.input_tokens > 0 for f in finishes)
    for field in ("input_tokens", "output_tokens", "requests", "tool_calls"):
        assert sum(getattr(f.usage, field) for f in finishes) == getattr(result.usage, field)
    assert result.usage.requests == 2
    assert result.usage.tool_calls == 1


async def test_text_deltas_are_numbered_continuously_across_steps() -> None:
    result, sink = await run_script(
        [
            {"text": 3},
            {"tool": "record", "args": {"key": "k"}},
            {"text": 0},
            {"text": 2},
            {"tool": "record", "args": {"key": "k"}},
            {"text": 4},
        ]
    )
    deltas = [p.delta for p in sink.payloads("text_delta")]
    assert deltas == [f"t{i} " for i in range(9)] + ["done"]
    assert result.output_text == "done"


async def test_record_counts_per_run_and_key() -> None:
    counters = MemoryCounters()
    steps = [
        {"tool": "record", "args": {"key": "a"}},
        {"tool": "record", "args": {"key": "a"}},
        {"tool": "record", "args": {"key": "b"}},
    ]
    _, sink = await run_script(steps, counters=counters, run_id="r1")
    assert [json.loads(p.result_json) for p in sink.payloads("tool_result")] == [1, 2, 1]
    _, sink = await run_script(steps, counters=counters, run_id="r2")
    assert [json.loads(p.result_json) for p in sink.payloads("tool_result")] == [1, 2, 1]
    assert counters.values == {
        **{("r1", "a"): 2, ("r1", "b"): 1, ("r2", "a"): 2, ("r2", "b"): 1},
        # "calls:K" counts invocations, idempotent or not
        **{("r1", "calls:a"): 2, ("r1", "calls:b"): 1, ("r2", "calls:a"): 2, ("r2", "calls:b"): 1},
    }


async def test_fail_steps_never_exhaust_the_retry_budget() -> None:
    # pydantic-ai counts every ModelRetry against the tool's budget; the
    # scripted `fail` tool must survive as many failures as a script holds.
    steps = [{"tool": "fail", "args": {"message": f"boom {i}"}} for i in range(5)]
    result, sink = await run_script([*steps, {"text": 1}])
    assert [p.message for p in sink.payloads("tool_error")] == [f"boom {i}" for i in range(5)]
    assert result.output_text == "done"


async def test_empty_script_answers_done() -> None:
    result, sink = await run_script([])
    assert result.output_text == "done"
    assert sink.kinds() == [
        "step_start",
        "text_start",
        "text_delta",
        "text_end",
        "response_metadata",
        "step_finish",
    ]


async def test_delay_ms_sleeps_between_deltas() -> None:
    started = time.monotonic()
    await run_script([{"text": 4, "delay_ms": 30}])
    assert time.monotonic() - started >= 0.09  # three gaps between four deltas


async def test_approval_tool_suspends_the_run_with_a_checkpoint_naming_the_interrupt() -> None:
    sink = ListSink()
    info = RunInfo(run_id="r", counters=MemoryCounters())
    script = json.dumps({"steps": [{"tool": "approve_me", "args": {"action": "deploy"}}]})
    result = await run_agent_loop(SCRIPTED, script, run_info=info, sink=sink)
    assert result.suspended is not None
    assert result.suspended.phase is Phase.SUSPENDED and result.suspended.step == 1
    assert list(result.suspended.interrupts) == [
        {
            "tool_call_id": "call_0",
            "tool_name": "approve_me",
            "args_json": '{"action":"deploy"}',
            "kind": "approval",
        }
    ]
    # The step is suspended, not finished.
    assert "step_finish" not in sink.kinds()


async def _resume_with(decision: Any) -> tuple[LoopResult, ListSink]:
    info = RunInfo(run_id="r", counters=MemoryCounters())
    script = json.dumps(
        {"steps": [{"tool": "approve_me", "args": {"action": "deploy"}}, {"text": 2}]}
    )
    suspended = await run_agent_loop(SCRIPTED, script, run_info=info, sink=ListSink())
    assert suspended.suspended is not None
    checkpoint = Checkpoint.decode(suspended.suspended.encode())
    sink = ListSink()
    result = await run_agent_loop(
        SCRIPTED,
        script,
        run_info=info,
        sink=sink,
        resume=checkpoint,
        deferred=DeferredToolResults(approvals={"call_0": decision}),
    )
    return result, sink


async def test_an_approved_call_runs_and_the_step_and_run_go_on() -> None:
    result, sink = await _resume_with(True)
    assert result.output_text == "done" and result.suspended is None
    (tool_result,) = sink.payloads("tool_result")
    assert json.loads(tool_result.result_json) == {"approved": True, "args": {"action": "deploy"}}
    assert not tool_result.denied
    assert sink.kinds()[-1] == "step_finish" and sink.events[0].step == 1


async def test_a_denied_call_reaches_the_model_as_a_denial() -> None:
    result, sink = await _resume_with(ToolDenied("not on a friday"))
    assert result.output_text == "done"
    (tool_result,) = sink.payloads("tool_result")
    assert tool_result.denied and "not on a friday" in tool_result.result_json


async def test_approval_with_overridden_arguments_runs_the_tool_with_them() -> None:
    _, sink = await _resume_with(ToolApproved(override_args={"action": "rollback"}))
    (tool_result,) = sink.payloads("tool_result")
    assert json.loads(tool_result.result_json)["args"] == {"action": "rollback"}


async def test_cancellation_propagates_untouched() -> None:
    sink = ListSink()
    info = RunInfo(run_id="r", counters=MemoryCounters())
    script = json.dumps({"steps": [{"text": 1000, "delay_ms": 10}]})
    task = asyncio.create_task(run_agent_loop(SCRIPTED, script, run_info=info, sink=sink))
    while len(sink.payloads("text_delta")) < 3:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "step_finish" not in sink.kinds()


async def test_model_errors_propagate() -> None:
    async def broken(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        yield "partial "
        raise RuntimeError("provider exploded")

    spec = AgentSpec(agent=Agent(FunctionModel(stream_function=broken)))
    sink = ListSink()
    with pytest.raises(RuntimeError, match="provider exploded"):
        await run_agent_loop(spec, "hi", run_info=RunInfo("r", MemoryCounters()), sink=sink)
    assert sink.kinds()[:3] == ["step_start", "text_start", "text_delta"]


async def test_tool_exceptions_propagate() -> None:
    async def call_tool(
        messages: list[ModelMessage], info: AgentInfo
    ) -> AsyncIterator[DeltaToolCalls]:
        yield {0: DeltaToolCall(name="explode", json_args="{}", tool_call_id="c1")}

    agent = Agent(FunctionModel(stream_function=call_tool))

    @agent.tool_plain
    def explode() -> str:
        raise KeyError("tool bug")

    with pytest.raises(KeyError, match="tool bug"):
        await run_agent_loop(
            AgentSpec(agent=agent), "hi", run_info=RunInfo("r", MemoryCounters()), sink=ListSink()
        )


async def test_reasoning_parts_become_reasoning_events() -> None:
    async def think_then_answer(
        messages: list[ModelMessage], info: AgentInfo
    ) -> AsyncIterator[str | DeltaThinkingCalls]:
        yield {0: DeltaThinkingPart(content="let me ")}
        yield {0: DeltaThinkingPart(content="think")}
        yield {0: DeltaThinkingPart(signature="sig")}  # no text: no reasoning_delta
        yield "42"

    spec = AgentSpec(agent=Agent(FunctionModel(stream_function=think_then_answer)))
    sink = ListSink()
    result = await run_agent_loop(spec, "q", run_info=RunInfo("r", MemoryCounters()), sink=sink)

    assert sink.kinds() == [
        "step_start",
        "reasoning_start", "reasoning_delta", "reasoning_delta", "reasoning_end",
        "text_start", "text_delta", "text_end",
        "response_metadata",
        "step_finish",
    ]  # fmt: skip
    assert [p.delta for p in sink.payloads("reasoning_delta")] == ["let me ", "think"]
    assert [p.part_index for p in sink.payloads("reasoning_start")] == [0]
    assert [p.part_index for p in sink.payloads("text_start")] == [1]
    assert result.output_text == "42"


class Weather(BaseModel):
    city: str
    celsius: float


async def test_structured_output_is_returned_as_json() -> None:
    async def answer(
        messages: list[ModelMessage], info: AgentInfo
    ) -> AsyncIterator[DeltaToolCalls]:
        (output_tool,) = info.output_tools
        yield {0: DeltaToolCall(name=output_tool.name, tool_call_id="out")}
        yield {0: DeltaToolCall(json_args='{"city": "Oslo", ')}
        yield {0: DeltaToolCall(json_args='"celsius": -3.5}')}

    agent = Agent(FunctionModel(stream_function=answer), output_type=Weather)
    sink = ListSink()
    result = await run_agent_loop(
        AgentSpec(agent=agent), "weather?", run_info=RunInfo("r", MemoryCounters()), sink=sink
    )
    assert result.output_text == ""
    assert json.loads(result.output_json) == {"city": "Oslo", "celsius": -3.5}
    # The output tool's arguments stream like any tool input, but no function tool runs.
    deltas = "".join(p.delta for p in sink.payloads("tool_input_delta"))
    assert json.loads(deltas) == {"city": "Oslo", "celsius": -3.5}
    assert "tool_call" not in sink.kinds()


async def test_run_without_deps_gets_none() -> None:
    seen: list[Any] = []

    async def respond(
        messages: list[ModelMessage], info: AgentInfo
    ) -> AsyncIterator[str | DeltaToolCalls]:
        n = sum(isinstance(m, ModelResponse) for m in messages)
        if n == 0:
            yield {0: DeltaToolCall(name="peek", json_args="{}", tool_call_id="p")}
        else:
            yield "ok"

    agent: Agent[None, str] = Agent(FunctionModel(stream_function=respond))

    @agent.tool
    def peek(ctx: RunContext[None]) -> str:
        seen.append(ctx.deps)
        return "peeked"

    result = await run_agent_loop(
        AgentSpec(agent=agent), "hi", run_info=RunInfo("r", MemoryCounters()), sink=ListSink()
    )
    assert result.output_text == "ok"
    assert seen == [None]


# -- input validation -----------------------------------------------------------


def test_valid_scripts_pass() -> None:
    validate_input('{"steps": []}')
    validate_input(
        json.dumps(
            {
                "steps": [
                    {"text": 200, "delay_ms": 5},
                    {"tool": "record", "args": {"key": "k1"}},
                    {"tool": "approve_me", "args": {"action": "deploy"}},
                    {"tool": "approve_me"},
                    {"tool": "fail", "args": {"message": "boom"}},
                    {"text": 20},
                ]
            }
        )
    )


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("not json", "Invalid JSON"),
        ("", "Invalid JSON"),
        ("[]", "Input should be an object"),
        ("{}", "steps: Field required"),
        (
            '{"steps": [{"sing": 3}]}',
            'steps[0]: a step is an object with "text", "echo_history", "tool", "parallel" or '
            '"error"',
        ),
        ('{"steps": [42]}', '"text", "echo_history", "tool", "parallel" or "error"'),
        ('{"steps": [{"tool": "rm_rf", "args": {}}]}', "steps[0]: Input tag 'rm_rf'"),
        ('{"steps": [{"tool": "record", "args": {}}]}', "steps[0].args.key: Field required"),
        ('{"steps": [{"tool": "record", "args": {"key": 1}}]}', "valid string"),
        ('{"steps": [{"tool": "fail"}]}', "steps[0].args: Field required"),
        ('{"steps": [{"text": -1}]}', "steps[0].text: Input should be greater than or equal to 0"),
        ('{"steps": [{"text": 3, "delay_ms": -5}]}', "greater than or equal to 0"),
        ('{"steps": [{"text": 1.5}]}', "valid integer"),
        ('{"steps": [{"text": 3, "colour": "red"}]}', "steps[0].colour: Extra inputs"),
        ('{"steps": [{"text": 1, "tool": "fail"}]}', "steps[0].tool: Extra inputs"),
        ('{"steps": {}}', "steps: Input should be a valid array"),
        (json.dumps({"steps": [{"text": MAX_TEXT_DELTAS + 1}]}), "less than or equal to"),
        (json.dumps({"steps": [{"text": 1, "delay_ms": MAX_DELAY_MS + 1}]}), "less than or equal"),
        (json.dumps({"steps": [{"text": MAX_TEXT_DELTAS}] * 2}), "at most 1000000"),
    ],
)
def test_invalid_scripts_are_rejected_with_a_clear_message(script: str, expected: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_input(script)
    violations = caught.value.violations
    assert violations and all(v.field == "input" for v in violations)
    message = "; ".join(v.description for v in violations)
    assert message.startswith("invalid script")
    assert expected in message


async def test_loop_checkpoints_at_both_halves_of_every_step_but_the_last() -> None:
    _, sink = await run_script([{"text": 3}, {"tool": "record", "args": {"key": "k"}}, {"text": 2}])
    phases = [(c.phase, c.step) for c in sink.checkpoints]
    assert phases == [(Phase.RESPONSE, 1), (Phase.STEP, 1), (Phase.RESPONSE, 2)]
    for checkpoint in sink.checkpoints:
        decoded = Checkpoint.decode(checkpoint.encode())
        assert decoded == checkpoint
        assert decoded.history()  # a valid pydantic-ai history


async def test_resuming_from_any_checkpoint_replays_exactly_the_rest_of_the_run() -> None:
    steps: list[dict[str, Any]] = [
        {"text": 4},
        {"tool": "record", "args": {"key": "a"}},
        {"tool": "fail", "args": {"message": "no"}},
        {"text": 3},
        {"tool": "record", "args": {"key": "b"}},
        {"text": 2},
    ]
    counters = MemoryCounters()
    whole_result, whole = await run_script(steps, counters=counters, run_id="r")

    def strip(events: list[Any]) -> list[bytes]:
        out = []
        for event in events:
            copy = type(event)()
            copy.CopyFrom(event)
            copy.attempt = 0
            out.append(copy.SerializeToString(deterministic=True))
        return out

    for checkpoint in whole.checkpoints:
        resumed = ListSink()
        info = RunInfo(run_id="r", counters=counters)  # same counters: record is idempotent
        result = await run_agent_loop(
            SCRIPTED,
            json.dumps({"steps": steps}),
            run_info=info,
            sink=resumed,
            resume=checkpoint,
            attempt=2,
        )
        assert result.output_text == whole_result.output_text
        assert strip(resumed.events) == strip(whole.events[checkpoint.next_index :])
        assert resumed.events[0].attempt == 2  # the re-run (half) step is the next attempt
        assert all(e.attempt == 1 for e in resumed.events if e.step > resumed.events[0].step)
    assert counters.values["r", "a"] == 1 and counters.values["r", "b"] == 1
