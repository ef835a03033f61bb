"""A run's goal, from the run's side: judging each attempt, and going on after a miss.

The supervisor calls `judge_attempt` when an attempt is over (the model is
done, and with until_idle its tasks too). The judgment's `goal_evaluated`
event is committed together with what follows it, in one append: with the
run's terminal `finish` when the goal is met or no attempt is left, else
with a STEP checkpoint whose history ends with the judge's reason as a new
user message (`retry_checkpoint`), from which the agent loop goes on. So a
judgment is never lost nor repeated across a takeover: before the append, a
new owner judges the attempt again; after it, the judgment is in the log and
in the checkpoint (Checkpoint.judged).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from keel.v1 import agent_service_pb2 as pb
from pydantic_ai.messages import ModelMessagesTypeAdapter, ModelRequest, UserPromptPart

from server.agents.checkpoint import Checkpoint, Phase, dump_messages
from server.agents.types import AgentSpec, LoopResult, RunInfo
from server.goals.judge import feedback_prompt, judge, judge_of
from server.goals.records import Goal, GoalProgress, Verdict


@dataclass(frozen=True, slots=True)
class Judgment:
    """The judge's verdict on one attempt, and what it means for the run."""

    goal: Goal
    attempt: int
    verdict: Verdict

    @property
    def final(self) -> bool:
        """The run ends with this attempt: the goal is met, or no attempt is left."""
        return self.verdict.satisfied or self.attempt >= self.goal.max_attempts

    @property
    def progress(self) -> GoalProgress:
        return GoalProgress(self.attempt, self.verdict.satisfied if self.final else None)

    @property
    def event(self) -> pb.AgentEvent:
        return pb.AgentEvent(
            goal_evaluated=pb.GoalEvaluated(
                attempt=self.attempt,
                satisfied=self.verdict.satisfied,
                score=self.verdict.score,
                reason=self.verdict.reason,
                max_attempts=self.goal.max_attempts,
            )
        )


async def judge_attempt(
    agents: Mapping[str, AgentSpec], goal: Goal, result: LoopResult, attempt: int, run: RunInfo
) -> Judgment:
    """Have the goal's judge (one of `agents`) evaluate the attempt that ended in `result`."""
    spec = agents.get(goal.judge_agent_id)
    if spec is None:  # a server serving the run's agent but not its judge took it over
        raise LookupError(f"this server has no judge agent {goal.judge_agent_id!r}")
    judge_of(agents, goal)  # it still judges (its registry entry may have changed)
    output = result.output_text or result.output_json
    verdict = await judge(spec, goal, output, attempt, run)
    return Judgment(goal, attempt, verdict)


def retry_checkpoint(result: LoopResult, judgment: Judgment) -> Checkpoint:
    """A STEP checkpoint whose history ends with the judge's reason as a user message:
    resuming from it makes the model's next request, the next attempt."""
    prompt = feedback_prompt(judgment.goal, judgment.verdict, judgment.attempt)
    own = ModelMessagesTypeAdapter.validate_json(result.messages)
    told = [*own, ModelRequest(parts=[UserPromptPart(prompt)])]
    return Checkpoint(
        phase=Phase.STEP,
        step=result.step,
        messages=dump_messages(told),
        usage=result.run_usage,
        step_start_usage=result.run_usage,
        judged=judgment.attempt,
    )
