"""The scripted agent (docs/agents.md): a deterministic stand-in for an LLM.

Serve it with `--agents server.agents.testing:registry`; its id is `scripted`.
The run's input is a JSON script:

    {"steps": [
       {"text": 200, "delay_ms": 5},
       {"tool": "record", "args": {"key": "k1"}},
       {"tool": "approve_me", "args": {"action": "deploy"}},
       {"tool": "fail", "args": {"message": "boom"}},
       {"text": 20}
    ]}

- `{"text": N, "delay_ms": D}` streams N text deltas "t0 ", "t1 ", ...,
  sleeping D ms between two deltas. Deltas are numbered continuously across
  the whole run (the first delta of the second text step follows the last of
  the first), so a client can check it saw every delta once, in order, by
  reading the run's text alone.
- `{"tool": "record", "args": {"key": K, "delay_ms": D}}` calls `record`,
  which counts the call in the run's counter "calls:K", takes D ms (default
  0), then increments the run's counter K once per tool call (keyed by the
  call's idempotency key) and returns K's new count: how tests prove a tool
  ran exactly once across crashes ("calls:K" shows how often it was invoked).
- `{"tool": "approve_me", "args": {...}}` calls `approve_me`, a tool that
  requires approval (any JSON object is accepted as its arguments).
- `{"tool": "fail", "args": {"message": M}}` calls `fail`, which raises
  ModelRetry(M): the model sees the failure (a tool_error event) and the
  script goes on; the run does not fail.
- `{"tool": "slow", "args": {"key": K, "duration_ms": D, "fail_times": N}}`
  calls `slow`, a background tool (3 retries): the model gets the task's id
  at once, and the task, off the agent loop, counts the attempt in the run's
  counter "attempts:K", reports progress 0.5 halfway, sleeps D ms in all,
  fails its first N attempts, and then increments the run's counter K once
  per task (keyed by the task id) and returns K's new count.
- `{"tool": "slow_reject", "args": {...}}` is `slow` declared with overflow
  "reject": when every task slot is taken, the model is told the system is
  busy and no task is made.
- `{"parallel": [tool step, ...]}` makes one model response call several
  tools at once (ids "call_<n>_<k>"), e.g. two approvals pending together.
- `{"error": M}` makes the model request fail with M (as a provider outage
  would): the run ends with an `error` event and state FAILED.
- `{"echo_history": true}` streams one text delta "history=N ", where N is
  the number of user prompts in the history the run started with (its
  thread's earlier turns; its own input is not counted). It does not advance
  the "tK " numbering.
- After the last step the model answers "done", and the run's output is
  exactly "done": text deltas streamed in the same (final) model response are
  narration before the answer, as they are in every other response. So the
  output never depends on where step boundaries fall.
- A user message that tells the model how a background task ended (a run
  with until_idle, see server/threads/history.py), "[task <id>] <tool>
  <status>: <result or error>", is answered with one text delta "got " +
  that message + " ", then "done".
- Goals (server/goals): a user message with the judge's reason ("[goal]
  ...") starts the run's next attempt, which plays the script again from its
  first step (delta numbers and tool call ids run on: attempt 2 of a script
  streaming N deltas starts at "tN "). With the top-level key
  `"satisfy_on": K` (`{"steps": [...], "satisfy_on": 3}`), the final answer
  of attempts 1 to K - 1 is "done not yet", and from attempt K on "done
  DONE".

The judge `scripted-judge` (an agent whose output is a Verdict) is satisfied,
with score 1, exactly when the judged attempt's output contains "DONE"; else
its score is 0 and its reason "the output does not say DONE".

pydantic-ai ends a run on a model response without tool calls, so one model
response streams the script's text up to the next tool step and then calls
that tool (tool_call_id "call_<n>", n counting the run's model responses from
0). The model is stateless: its script is the last user prompt of the
history (a run on a thread sees the earlier turns' prompts before it), and
which segment of the script to play is derived from the number of model
responses after that prompt, so a step re-run from a checkpoint replays
exactly the same deltas and tool calls.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic_ai import Agent, DeferredToolRequests, ModelRetry, RunContext, TextOutput, Tool
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart, UserPromptPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel

from server.agents.types import AgentSpec, RunInfo
from server.errors import FieldViolation, InvalidArgument
from server.goals.judge import FEEDBACK_PREFIX, attempt_output
from server.goals.records import MAX_ATTEMPTS, Verdict
from server.tasks import background, task_context
from server.threads.history import TASK_RESULT_PREFIX

MAX_TEXT_DELTAS = 1_000_000  # per text step, and in the whole script
MAX_DELAY_MS = 60_000
MAX_STEPS = 10_000
FINAL_ANSWER = "done"
SATISFIED = "DONE"  # in an attempt's output, what the scripted judge is satisfied with
NOT_YET = "not yet"
SLOW_RETRIES = 3  # failed attempts of a `slow` task that are tried again
_MAX_REPORTED_ERRORS = 5


# -- the script ---------------------------------------------------------------


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextStep(_Step):
    text: int = Field(ge=0, le=MAX_TEXT_DELTAS, description="how many text deltas to stream")
    delay_ms: int = Field(default=0, ge=0, le=MAX_DELAY_MS, description="sleep between two deltas")


class EchoHistoryStep(_Step):
    echo_history: Literal[True] = Field(
        description="stream the number of earlier user prompts in the history"
    )


class ErrorStep(_Step):
    error: str = Field(min_length=1, max_length=10_000, description="the model fails with this")


class RecordArgs(_Step):
    key: str = Field(min_length=1, max_length=256)
    delay_ms: int = Field(default=0, ge=0, le=MAX_DELAY_MS, description="time the tool takes")


class RecordStep(_Step):
    tool: Literal["record"]
    args: RecordArgs


class ApproveStep(_Step):
    tool: Literal["approve_me"]
    args: dict[str, Any] = Field(default_factory=dict)


class FailArgs(_Step):
    message: str = Field(max_length=10_000)


class FailStep(_Step):
    tool: Literal["fail"]
    args: FailArgs


class SlowArgs(_Step):
    key: str = Field(min_length=1, max_length=256)
    duration_ms: int = Field(default=0, ge=0, le=MAX_DELAY_MS, description="the task's work")
    fail_times: int = Field(default=0, ge=0, le=100, description="attempts that fail first")


class SlowStep(_Step):
    tool: Literal["slow", "slow_reject"]
    args: SlowArgs


ToolStep = Annotated[RecordStep | ApproveStep | FailStep | SlowStep, Field(discriminator="tool")]
_TOOL_NAMES = ("record", "approve_me", "fail", "slow", "slow_reject")


class ParallelStep(_Step):
    parallel: list[ToolStep] = Field(min_length=1, max_length=16)


def _step_kind(value: Any) -> str | None:
    # Pick the step model by which key is present, so an unknown kind gets one
    # clear error instead of one error per candidate model.
    if isinstance(value, dict):
        if "text" in value:
            return "text"
        if "echo_history" in value:
            return "echo"
        if "tool" in value:
            return "tool"
        if "error" in value:
            return "error"
        if "parallel" in value:
            return "parallel"
    elif isinstance(value, _Step):
        if isinstance(value, EchoHistoryStep):
            return "echo"
        if isinstance(value, ErrorStep):
            return "error"
        if isinstance(value, ParallelStep):
            return "parallel"
        return "tool" if hasattr(value, "tool") else "text"
    return None


Step = Annotated[
    Annotated[TextStep, Tag("text")]
    | Annotated[EchoHistoryStep, Tag("echo")]
    | Annotated[ToolStep, Tag("tool")]
    | Annotated[ErrorStep, Tag("error")]
    | Annotated[ParallelStep, Tag("parallel")],
    Discriminator(
        _step_kind,
        custom_error_type="unknown_step_kind",
        custom_error_message=(
            'a step is an object with "text", "echo_history", "tool", "parallel" or "error"'
        ),
    ),
]


class Script(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: list[Step] = Field(max_length=MAX_STEPS)
    # For runs with a goal: from this attempt on, the final answer ends with "DONE"
    # (what the scripted judge is satisfied with), before it with "not yet".
    satisfy_on: int | None = Field(default=None, ge=1, le=MAX_ATTEMPTS)

    @model_validator(mode="after")
    def _bounded_text(self) -> Script:
        total = sum(step.text for step in self.steps if isinstance(step, TextStep))
        if total > MAX_TEXT_DELTAS:
            raise ValueError(f"the script streams {total} text deltas; at most {MAX_TEXT_DELTAS}")
        return self


def _location(loc: tuple[int | str, ...]) -> str:
    """A readable path like "steps[2].args.key".

    Pydantic puts the tags of the step unions into the location ("steps", 2,
    "tool", "record", "args", ...); a script's author never wrote those.
    """
    parts: list[str] = []
    items = list(loc)
    while items:
        item = items.pop(0)
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{item}]"]
            if items and items[0] in ("text", "echo", "tool"):
                tag = items.pop(0)
                if tag == "tool" and items and items[0] in _TOOL_NAMES:
                    items.pop(0)
        else:
            parts.append(item)
    return ".".join(parts)


def _describe(error: ValidationError) -> list[FieldViolation]:
    violations = []
    for detail in error.errors(include_url=False)[:_MAX_REPORTED_ERRORS]:
        where = _location(detail["loc"])
        prefix = f"{where}: " if where else ""
        violations.append(FieldViolation("input", f"invalid script: {prefix}{detail['msg']}"))
    return violations


def parse_script(text: str) -> Script:
    """Parse a script; raise InvalidArgument (field "input") saying what is wrong."""
    try:
        return Script.model_validate_json(text)
    except ValidationError as error:
        raise InvalidArgument(*_describe(error)) from None


def validate_input(text: str) -> None:
    """AgentSpec.validate_input: reject a malformed script before the run is created."""
    parse_script(text)


# -- the model ----------------------------------------------------------------


class ScriptedModelError(RuntimeError):
    """The scripted model failing on purpose (an `{"error": M}` step)."""


@dataclass(frozen=True, slots=True)
class Segment:
    """What one model response plays: text deltas, then maybe one tool call."""

    first_delta: int  # the number of the first delta ("t<first_delta> ")
    text_steps: tuple[TextStep | EchoHistoryStep, ...]
    # The tool to call (or the model failure) that ends the segment; None: the final answer.
    tool: RecordStep | ApproveStep | FailStep | SlowStep | ParallelStep | ErrorStep | None


def segments(script: Script) -> list[Segment]:
    """Split a script at its tool steps: segment i is model response i."""
    result: list[Segment] = []
    pending: list[TextStep | EchoHistoryStep] = []
    first = delta = 0
    for step in script.steps:
        if isinstance(step, EchoHistoryStep):
            pending.append(step)
        elif isinstance(step, TextStep):
            pending.append(step)
            delta += step.text
        else:
            result.append(Segment(first, tuple(pending), step))
            pending, first = [], delta
    result.append(Segment(first, tuple(pending), None))
    return result


@dataclass(frozen=True, slots=True)
class _Plan:
    segments: tuple[Segment, ...]
    satisfy_on: int | None
    deltas: int  # text deltas the script streams in all (one attempt)

    def answer(self, attempt: int) -> str:
        """The final answer of a goal's attempt (just FINAL_ANSWER without satisfy_on)."""
        if self.satisfy_on is None:
            return FINAL_ANSWER
        return f"{FINAL_ANSWER} {SATISFIED if attempt >= self.satisfy_on else NOT_YET}"


@functools.lru_cache(maxsize=16)
def _plan(text: str) -> _Plan:
    # Cached: the model needs the plan once per model request, and a long
    # script would otherwise be split again for every one of its responses.
    script = parse_script(text)
    deltas = sum(step.text for step in script.steps if isinstance(step, TextStep))
    return _Plan(tuple(segments(script)), script.satisfy_on, deltas)


@dataclass(frozen=True, slots=True)
class _Turn:
    """Where the current run stands in the history the model is shown."""

    script: str  # the run's input: the last user prompt that is not a task's outcome
    responses: int  # model responses since that prompt (the run's own)
    earlier_prompts: int  # user prompts before it (earlier turns of its thread)
    task_outcome: str  # the last message, if it tells how a background task ended
    attempt: int  # the goal's attempt: 1 + the judge's reasons given since the script
    attempt_responses: int  # model responses since the attempt began


def _turn(messages: list[ModelMessage]) -> _Turn:
    prompts: list[str] = []
    responses = attempt_responses = 0
    outcome = ""
    attempt = 1
    for message in messages:
        if isinstance(message, ModelResponse):
            responses += 1
            attempt_responses += 1
            outcome = ""
            continue
        for part in message.parts:
            if not (isinstance(part, UserPromptPart) and isinstance(part.content, str)):
                continue
            if part.content.startswith(TASK_RESULT_PREFIX):
                outcome = part.content
            elif part.content.startswith(FEEDBACK_PREFIX):
                attempt, attempt_responses = attempt + 1, 0
            else:
                prompts.append(part.content)
                responses = attempt_responses = 0
                outcome, attempt = "", 1
    if not prompts:
        raise ValueError("the scripted agent needs a user message holding its script")
    return _Turn(prompts[-1], responses, len(prompts) - 1, outcome, attempt, attempt_responses)


async def _play(
    messages: list[ModelMessage], info: AgentInfo
) -> AsyncIterator[str | DeltaToolCalls]:
    """FunctionModel stream function: play the segment this response stands for."""
    turn = _turn(messages)
    plan = _plan(turn.script)
    if turn.task_outcome:
        yield f"got {turn.task_outcome} "
        yield plan.answer(turn.attempt)
        return
    # Each attempt of a goal plays the script again; tool call ids and delta
    # numbers run on across attempts.
    number = turn.responses
    if turn.attempt_responses >= len(plan.segments):
        raise ValueError(
            f"the script has {len(plan.segments)} model responses; "
            f"response {turn.attempt_responses} asked for"
        )
    segment = plan.segments[turn.attempt_responses]

    delta = segment.first_delta + (turn.attempt - 1) * plan.deltas
    for step in segment.text_steps:
        if isinstance(step, EchoHistoryStep):
            yield f"history={turn.earlier_prompts} "
            continue
        for i in range(step.text):
            if i and step.delay_ms:
                await asyncio.sleep(step.delay_ms / 1000)
            yield f"t{delta} "
            delta += 1
    if segment.tool is None:
        yield plan.answer(turn.attempt)
        return
    if isinstance(segment.tool, ErrorStep):
        raise ScriptedModelError(segment.tool.error)
    if isinstance(segment.tool, ParallelStep):
        calls = [(f"call_{number}_{k}", tool) for k, tool in enumerate(segment.tool.parallel)]
    else:
        calls = [(f"call_{number}", segment.tool)]
    for part, (call_id, tool) in enumerate(calls):
        # Name and id first, arguments after, as real providers stream them.
        args = tool.args
        args_json = json.dumps(
            args if isinstance(args, dict) else args.model_dump(exclude_unset=True),
            separators=(",", ":"),
        )
        yield {part: DeltaToolCall(name=tool.tool, tool_call_id=call_id)}
        yield {part: DeltaToolCall(json_args=args_json)}


async def _final_answer(text: str) -> str:
    # Async, so pydantic-ai calls it on the loop instead of in a worker thread.
    # The last response's text is its trailing "tK " deltas (or "got ...", or
    # "attempt N ") followed by the answer; they were already delivered as
    # text_delta events.
    start = text.rfind(FINAL_ANSWER)
    return text[start:] if start >= 0 else text


# -- the tools ----------------------------------------------------------------


async def record(ctx: RunContext[RunInfo], key: str, delay_ms: int = 0) -> int:
    """Increment the run's counter `key` once per tool call and return its new value."""
    info = ctx.deps
    await info.counters.incr_counter(info.run_id, f"calls:{key}")  # every invocation
    if delay_ms:
        await asyncio.sleep(delay_ms / 1000)
    assert ctx.tool_call_id is not None  # pydantic-ai always sets it for tool calls
    once_key = info.idempotency_key(ctx.tool_call_id)
    return await info.counters.incr_counter(info.run_id, key, once_key=once_key)


async def slow(key: str, duration_ms: int = 0, fail_times: int = 0) -> int:
    """Work for duration_ms off the agent loop; fail the first fail_times attempts."""
    task = task_context()
    await task.counters.incr_counter(task.run_id, f"attempts:{key}")
    await asyncio.sleep(duration_ms / 2000)
    await task.progress(0.5, "halfway")
    await asyncio.sleep(duration_ms / 2000)
    if task.attempt <= fail_times:
        raise RuntimeError(f"slow {key!r} failed on purpose (attempt {task.attempt})")
    return await task.counters.incr_counter(task.run_id, key, once_key=task.idempotency_key)


async def fail(message: str) -> str:
    """Fail with `message`; the model is asked to go on."""
    raise ModelRetry(message)


async def _approve_me(**args: Any) -> dict[str, Any]:
    return {"approved": True, "args": args}


def _approve_me_tool() -> Tool[RunInfo]:
    # from_schema accepts any JSON object as arguments (the script passes
    # whatever it likes); it has no requires_approval parameter, so set it after.
    tool: Tool[RunInfo] = Tool.from_schema(
        _approve_me,
        name="approve_me",
        description="Do something that a human must approve first.",
        json_schema={"type": "object", "additionalProperties": True},
    )
    tool.requires_approval = True
    return tool


def build_scripted_agent() -> Agent[RunInfo, str | DeferredToolRequests]:
    """A fresh scripted agent (tests may build their own)."""
    return Agent(
        FunctionModel(stream_function=_play, model_name="scripted"),
        deps_type=RunInfo,
        output_type=[TextOutput(_final_answer), DeferredToolRequests],
        name="scripted",
        description="Plays a JSON script of text and tool steps (tests, demos, benchmarks).",
        tools=[
            Tool(record, takes_ctx=True),
            # A script may fail any number of times; each ModelRetry counts
            # against the tool's retry budget, which would otherwise end the run.
            Tool(fail, takes_ctx=False, max_retries=MAX_STEPS),
            _approve_me_tool(),
            Tool(slow, takes_ctx=False, metadata=background(max_retries=SLOW_RETRIES)),
            Tool(
                slow,
                name="slow_reject",
                takes_ctx=False,
                metadata=background(max_retries=SLOW_RETRIES, overflow="reject"),
            ),
        ],
    )


# -- the judge ----------------------------------------------------------------


def _judge(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """FunctionModel function: satisfied when the judged attempt's output says DONE."""
    prompt = next(
        part.content
        for message in reversed(messages)
        for part in message.parts
        if isinstance(part, UserPromptPart) and isinstance(part.content, str)
    )
    satisfied = SATISFIED in attempt_output(prompt)
    verdict = Verdict(
        satisfied=satisfied,
        score=1.0 if satisfied else 0.0,
        reason=f"the output says {SATISFIED}"
        if satisfied
        else f"the output does not say {SATISFIED}",
    )
    [output_tool] = info.output_tools
    return ModelResponse(parts=[ToolCallPart(output_tool.name, verdict.model_dump())])


def build_scripted_judge() -> Agent[None, Verdict]:
    """A judge for goals that is satisfied exactly when the attempt's output holds "DONE"."""
    return Agent(
        FunctionModel(function=_judge, model_name="scripted-judge"),
        output_type=Verdict,
        name="scripted-judge",
    )


registry: dict[str, AgentSpec] = {
    "scripted": AgentSpec(
        agent=build_scripted_agent(),
        description="Plays a JSON script of text and tool steps (tests, demos, benchmarks).",
        deps=lambda info: info,
        validate_input=validate_input,
        approval_tools=frozenset({"approve_me"}),
    ),
    "scripted-judge": AgentSpec(
        agent=build_scripted_judge(),
        description=f"Judges a goal's attempt: satisfied when its output holds {SATISFIED!r}.",
    ),
}
