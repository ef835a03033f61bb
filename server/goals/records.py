"""What a goal is, and what a judge answers.

A goal travels with its run: the run's record stores it (as JSON) when the
run is created, so a run taken over by another server pursues the goal it
started with, whatever that server's registry says now.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MAX_ATTEMPTS = 3
MAX_ATTEMPTS = 100
MAX_OBJECTIVE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Goal:
    """An objective, the agent that judges each attempt, and how many attempts there are."""

    objective: str
    judge_agent_id: str
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    def __post_init__(self) -> None:
        if not self.objective:
            raise ValueError("a goal needs an objective")
        if not self.judge_agent_id:
            raise ValueError("a goal needs a judge_agent_id")
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS:
            raise ValueError(
                f"max_attempts must be in [1, {MAX_ATTEMPTS}], got {self.max_attempts}"
            )

    def encode(self) -> str:
        return json.dumps(
            {
                "objective": self.objective,
                "judge_agent_id": self.judge_agent_id,
                "max_attempts": self.max_attempts,
            },
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, text: str) -> Goal | None:
        """The goal stored as `text`; None for "" (a run without a goal)."""
        if not text:
            return None
        body = json.loads(text)
        return cls(str(body["objective"]), str(body["judge_agent_id"]), int(body["max_attempts"]))


class Verdict(BaseModel):
    """A judge's answer about one attempt: a judge agent's output type (or a subclass)."""

    model_config = ConfigDict(frozen=True)

    satisfied: bool = Field(description="whether the attempt meets the objective")
    score: float = Field(ge=0, le=1, description="how close it comes, from 0 to 1")
    reason: str = Field(description="why; the agent reads it before its next attempt")


@dataclass(frozen=True, slots=True)
class GoalProgress:
    """How far the judge got with a run: attempts judged, and the verdict on the last
    one if it ended the run (met, or the last attempt); `met` is None until then."""

    attempts: int = 0
    met: bool | None = None

    def encode(self) -> str:
        return f"{self.attempts}" if self.met is None else f"{self.attempts}:{int(self.met)}"

    @classmethod
    def decode(cls, text: str) -> GoalProgress:
        if not text:
            return cls()
        attempts, _, met = text.partition(":")
        return cls(int(attempts), None if not met else met == "1")
