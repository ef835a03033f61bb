"""Goals: runs that keep going until a judge says the objective is met (docs/goals.md)."""

from server.goals.records import DEFAULT_MAX_ATTEMPTS, Goal, Verdict

__all__ = ["DEFAULT_MAX_ATTEMPTS", "Goal", "Verdict"]
