"""Human decisions on a suspended run's interrupts, and how they are stored.

An interrupt is a tool call the run waits on: one that needs approval
(answered with approve or deny) or a deferred call (answered with its
result). Decisions are stored with the run (RunRecord.decisions) as JSON:

    {"<tool_call_id>": {"d": <decision>, "at": <offset>}, ...}

where <decision> is {"approve": {"override_args": {...} | null}},
{"deny": {"message": "..."}} or {"result": <any JSON>}, and <offset> is the
index of the first event after the suspension the decision answered: where
a Resume that carried it streams from. Decisions of every suspension of the
run stay, so a repeated Resume is recognised after the run went on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic_ai import DeferredToolResults, ToolApproved, ToolDenied

from server.agents.checkpoint import Checkpoint
from server.errors import FieldViolation, InterruptResolved, InvalidArgument
from server.events.log import RunRecord, RunState

Kind = Literal["approve", "deny", "result"]
# Which decisions answer which kind of interrupt.
ANSWERS: Mapping[str, frozenset[Kind]] = {
    "approval": frozenset({"approve", "deny"}),
    "call": frozenset({"result"}),
}


@dataclass(frozen=True, slots=True)
class Decision:
    """One answer to one interrupt."""

    tool_call_id: str
    kind: Kind
    override_args: dict[str, Any] | None = None  # approve: replaces the model's arguments
    message: str = ""  # deny: what the model is told
    result: Any = None  # result: the deferred call's result

    def to_json(self) -> dict[str, Any]:
        match self.kind:
            case "approve":
                return {"approve": {"override_args": self.override_args}}
            case "deny":
                return {"deny": {"message": self.message}}
            case "result":
                return {"result": self.result}

    @classmethod
    def from_json(cls, tool_call_id: str, body: Mapping[str, Any]) -> Decision:
        if "approve" in body:
            return cls(tool_call_id, "approve", override_args=body["approve"]["override_args"])
        if "deny" in body:
            return cls(tool_call_id, "deny", message=body["deny"]["message"])
        return cls(tool_call_id, "result", result=body["result"])


@dataclass(frozen=True, slots=True)
class Stored:
    """A decision as stored with the run, with the offset its Resume streams from."""

    decision: Decision
    offset: int


def load(record: RunRecord) -> dict[str, Stored]:
    """The run's decisions so far, by tool_call_id."""
    if not record.decisions:
        return {}
    return {
        tool_call_id: Stored(Decision.from_json(tool_call_id, entry["d"]), int(entry["at"]))
        for tool_call_id, entry in json.loads(record.decisions).items()
    }


def dump(decisions: Mapping[str, Stored]) -> bytes:
    body = {
        tool_call_id: {"d": stored.decision.to_json(), "at": stored.offset}
        for tool_call_id, stored in decisions.items()
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def fingerprint(decisions: Iterable[Decision]) -> str:
    """The same text for the same set of decisions, in any order (request_id checks)."""
    body = sorted([d.tool_call_id, d.to_json()] for d in decisions)
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


def pending_interrupts(record: RunRecord) -> list[dict[str, Any]]:
    """The interrupts a SUSPENDED run still waits on (none for any other state)."""
    if record.state is not RunState.SUSPENDED or not record.checkpoint:
        return []
    answered = load(record)
    interrupts = Checkpoint.decode(record.checkpoint).interrupts
    return [i for i in interrupts if i["tool_call_id"] not in answered]


def deferred_results(checkpoint: Checkpoint, record: RunRecord) -> DeferredToolResults:
    """pydantic-ai's DeferredToolResults for the checkpoint's interrupts, from the decisions."""
    stored = load(record)
    results = DeferredToolResults()
    for interrupt in checkpoint.interrupts:
        decision = stored[interrupt["tool_call_id"]].decision
        match decision.kind:
            case "approve":
                results.approvals[decision.tool_call_id] = (
                    ToolApproved(override_args=decision.override_args)
                    if decision.override_args is not None
                    else True
                )
            case "deny":
                results.approvals[decision.tool_call_id] = ToolDenied(decision.message)
            case "result":
                results.calls[decision.tool_call_id] = decision.result
    return results


def repeat_offset(
    run_id: str, stored: Mapping[str, Stored], answers: Sequence[Decision]
) -> int | None:
    """The offset of an earlier Resume with exactly these decisions, or None if any is new.

    Raises InterruptResolved when an interrupt was already answered otherwise.
    """
    offsets = []
    for answer in answers:
        earlier = stored.get(answer.tool_call_id)
        if earlier is None:
            return None
        if earlier.decision != answer:
            raise InterruptResolved(run_id, answer.tool_call_id)
        offsets.append(earlier.offset)
    return min(offsets)


def check_answers(checkpoint: Checkpoint, answers: Sequence[Decision]) -> None:
    """Every answer names a pending interrupt of the checkpoint, with a fitting kind."""
    pending = {i["tool_call_id"]: i for i in checkpoint.interrupts}
    violations = []
    for n, answer in enumerate(answers):
        interrupt = pending.get(answer.tool_call_id)
        if interrupt is None:
            violations.append(
                FieldViolation(
                    f"decisions[{n}].tool_call_id",
                    f"{answer.tool_call_id!r} names no pending interrupt of the run; "
                    f"pending: {', '.join(sorted(pending)) or 'none'}",
                )
            )
        elif answer.kind not in ANSWERS[interrupt["kind"]]:
            wanted = " or ".join(sorted(ANSWERS[interrupt["kind"]]))
            violations.append(
                FieldViolation(
                    f"decisions[{n}]",
                    f"tool call {answer.tool_call_id!r} waits for {wanted}, not {answer.kind}",
                )
            )
    if violations:
        raise InvalidArgument(*violations)
