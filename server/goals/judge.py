"""Judging an attempt: the prompts, and running the judge agent.

After each attempt of a run with a goal (the model is done, and with
until_idle its tasks too), the goal's judge, an ordinary registered agent
whose output type is a Verdict, reads the objective and the attempt's output
in `judge_prompt` and answers. An unsatisfied attempt with attempts left is
followed by `feedback_prompt`, a new user message with the judge's reason,
and the agent's loop goes on in the same run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from server.agents.types import AgentSpec, RunInfo
from server.errors import FieldViolation, InvalidArgument
from server.goals.records import Goal, Verdict

# Starts every message that tells the agent an attempt fell short (the
# scripted agent recognises it, as a model would recognise the wording).
FEEDBACK_PREFIX = "[goal]"
_OUTPUT_OPEN = "<output"
_OUTPUT_CLOSE = "</output>"


def judge_prompt(goal: Goal, output: str, attempt: int) -> str:
    """What the judge is asked about one attempt (Keel's default judge prompt)."""
    return (
        "You judge whether an AI agent's work meets an objective.\n\n"
        f"<objective>\n{goal.objective}\n</objective>\n\n"
        f'{_OUTPUT_OPEN} attempt="{attempt}" of="{goal.max_attempts}">\n'
        f"{output}\n{_OUTPUT_CLOSE}\n\n"
        "Answer with `satisfied` (true only if the output fully meets the objective), "
        "a `score` from 0 to 1, and a short `reason` the agent can act on."
    )


def attempt_output(prompt: str) -> str:
    """The attempt's output inside a judge_prompt (what a scripted judge reads)."""
    start = prompt.find("\n", prompt.find(_OUTPUT_OPEN)) + 1
    end = prompt.rfind(f"\n{_OUTPUT_CLOSE}")
    return prompt[start:end] if 0 < start <= end else ""


def feedback_prompt(goal: Goal, verdict: Verdict, attempt: int) -> str:
    """The user message that starts the next attempt."""
    return (
        f"{FEEDBACK_PREFIX} Attempt {attempt} of {goal.max_attempts} does not meet the "
        f"objective yet: {verdict.reason}\nObjective: {goal.objective}\nTry again."
    )


def is_verdict_type(output_type: Any) -> bool:
    """Whether an agent's output type is a verdict: Verdict, or a pydantic model with its
    fields (satisfied, score, reason)."""
    if not (isinstance(output_type, type) and issubclass(output_type, BaseModel)):
        return False
    return issubclass(output_type, Verdict) or set(Verdict.model_fields) <= set(
        output_type.model_fields
    )


def judge_of(agents: Mapping[str, AgentSpec], goal: Goal, field: str = "goal") -> AgentSpec:
    """The goal's judge among `agents`, or InvalidArgument saying why it cannot judge."""
    spec = agents.get(goal.judge_agent_id)
    if spec is None:
        raise InvalidArgument(
            FieldViolation(
                f"{field}.judge_agent_id",
                f"unknown agent {goal.judge_agent_id!r}; this server runs: "
                f"{', '.join(sorted(agents)) or 'none'}",
            )
        )
    if not is_verdict_type(spec.agent.output_type):
        raise InvalidArgument(
            FieldViolation(
                f"{field}.judge_agent_id",
                f"agent {goal.judge_agent_id!r} cannot judge: its output type is not a "
                "verdict (server.goals.Verdict: satisfied, score, reason)",
            )
        )
    return spec


def check_default_goals(agents: Mapping[str, AgentSpec]) -> None:
    """Refuse (ValueError, at startup) an agent whose default goal names no judge here."""
    for agent_id, spec in sorted(agents.items()):
        if spec.default_goal is None:
            continue
        try:
            judge_of(agents, spec.default_goal, field="default_goal")
        except InvalidArgument as exc:
            raise ValueError(f"agent {agent_id!r}: {exc}") from None


async def judge(spec: AgentSpec, goal: Goal, output: str, attempt: int, run: RunInfo) -> Verdict:
    """Run the judge agent on one attempt and return its verdict."""
    deps = spec.deps(run) if spec.deps is not None else None
    result = await spec.agent.run(judge_prompt(goal, output, attempt), deps=deps)
    return Verdict.model_validate(result.output, from_attributes=True)
