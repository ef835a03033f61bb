"""Background tasks: what a task is, how a tool is declared background, and its events.

A background tool is an ordinary pydantic-ai tool whose metadata says so
(`metadata=background(...)`). When the model calls it, the run records a
task and gives the model an immediate result naming it; the tool's function
then runs as the task, outside the agent loop, on whichever server has a
free slot (server/tasks/runner.py).

A task's life, as its status:

    QUEUED ──▶ RUNNING ──▶ COMPLETED
      ▲          │ ├──▶ FAILED           (an attempt failed, no retry left)
      │          │ └──▶ CANCELLED        (CancelTask, CancelRun)
      └─ RETRYING ◀┘                      (an attempt failed or timed out)

and every change is one entry of its run's task log, which the run's owner
turns into TaskUpdate events on the run's stream.
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from keel.v1 import agent_service_pb2 as pb

Overflow = Literal["queue", "reject"]
_METADATA_KEY = "keel_background"


class TaskStatus(enum.StrEnum):
    """Where a task is in its life."""

    QUEUED = "queued"  # waits for a slot under the concurrency limits
    RUNNING = "running"  # an attempt runs (the API calls it STARTED)
    RETRYING = "retrying"  # an attempt failed; waits for its backoff, then queues again
    COMPLETED = "completed"  # the tool returned
    FAILED = "failed"  # the last attempt failed and no retry is left
    CANCELLED = "cancelled"  # CancelTask, or its run was cancelled

    @property
    def ended(self) -> bool:
        return self in _ENDED


_ENDED = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})


@dataclass(frozen=True, slots=True)
class Background:
    """How a background tool runs (the options of `background()`)."""

    timeout_s: float | None = None  # None: the server's KEEL_TASKS_DEFAULT_TIMEOUT_S
    max_retries: int = 0  # failed (or timed out) attempts retried, with capped backoff
    overflow: Overflow = "queue"  # over the limits: wait in the queue, or tell the model

    def __post_init__(self) -> None:
        if self.timeout_s is not None and not 0 < self.timeout_s <= 7 * 86_400:
            raise ValueError(f"timeout_s must be in (0, 1 week], got {self.timeout_s}")
        if not 0 <= self.max_retries <= 100:
            raise ValueError(f"max_retries must be in [0, 100], got {self.max_retries}")
        if self.overflow not in ("queue", "reject"):
            raise ValueError(f"overflow must be 'queue' or 'reject', got {self.overflow!r}")


def background(
    *, timeout_s: float | None = None, max_retries: int = 0, overflow: Overflow = "queue"
) -> dict[str, Any]:
    """The metadata that makes a pydantic-ai tool a background tool.

        agent = Agent(..., tools=[Tool(scrape, metadata=background(timeout_s=120))])

    `timeout_s` bounds each attempt (default: the server's
    KEEL_TASKS_DEFAULT_TIMEOUT_S), `max_retries` is how many failed or timed
    out attempts are tried again (capped exponential backoff), and
    `overflow` says what a call does when every slot is taken: "queue" (wait,
    FIFO) or "reject" (the model is told the system is busy, and no task is
    made). The function must not take a RunContext: inside the task,
    `server.tasks.task_context()` gives the task's id, attempt and progress
    reporting.
    """
    options = Background(timeout_s=timeout_s, max_retries=max_retries, overflow=overflow)
    return {
        _METADATA_KEY: {
            "timeout_s": options.timeout_s,
            "max_retries": options.max_retries,
            "overflow": options.overflow,
        }
    }


def background_options(metadata: Mapping[str, Any] | None) -> Background | None:
    """The options of a tool's metadata, or None for a tool that is not background."""
    if not metadata or _METADATA_KEY not in metadata:
        return None
    return Background(**metadata[_METADATA_KEY])


def task_id_for(run_id: str, tool_call_id: str) -> str:
    """A task's id: its run's id, then a digest of the tool call's id.

    Deterministic, so a step re-run after a takeover finds the task its first
    attempt made; and the run id is its prefix (before the last "."), so a
    task's keys can share its run's slot.
    """
    digest = hashlib.sha256(tool_call_id.encode()).hexdigest()[:16]
    return f"{run_id}.{digest}"


def run_id_of(task_id: str) -> str:
    """The run a task id belongs to ("" if it is not a task id)."""
    run_id, dot, digest = task_id.rpartition(".")
    return run_id if dot and len(digest) == 16 else ""


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task as the store keeps it."""

    task_id: str
    run_id: str
    agent_id: str
    tool_name: str
    tool_call_id: str
    args_json: str
    status: TaskStatus
    create_time_ms: int
    update_time_ms: int
    timeout_s: float
    max_retries: int
    attempt: int = 0  # the current (or last) attempt; 0 before the first
    failures: int = 0  # failed attempts since it was (re)queued: the retry budget spent
    progress: float = 0.0
    result_json: str = ""
    error: str = ""
    epoch: int = 0  # fencing token of the runner of the current attempt
    owner: str = ""  # the instance running it
    not_before_ms: int = 0  # a retrying task waits until then
    cancel_reason: str = ""  # asked to stop (its runner stops it)
    thread_id: str = ""  # its run's thread: where a late result goes
    until_idle: bool = False  # its run feeds its result to the model (not to the thread)
    tenant: str = ""  # its run's tenant


@dataclass(frozen=True, slots=True)
class TaskPageCursor:
    """Where a page of list_tasks ends: ordered by (create_time_ms, task_id), newest first."""

    create_time_ms: int
    task_id: str


# -- the task log: one entry per change, turned into TaskUpdate events ----------

STATUS_TO_PROTO: dict[str, pb.TaskStatus.ValueType] = {
    TaskStatus.QUEUED: pb.TASK_STATUS_QUEUED,
    TaskStatus.RUNNING: pb.TASK_STATUS_STARTED,
    TaskStatus.RETRYING: pb.TASK_STATUS_RETRYING,
    TaskStatus.COMPLETED: pb.TASK_STATUS_COMPLETED,
    TaskStatus.FAILED: pb.TASK_STATUS_FAILED,
    TaskStatus.CANCELLED: pb.TASK_STATUS_CANCELLED,
    "progress": pb.TASK_STATUS_PROGRESS,
}


def log_entry(
    task: TaskRecord,
    status: str,
    *,
    attempt: int | None = None,
    progress: float = 0.0,
    message: str = "",
    result_json: str = "",
) -> bytes:
    """One entry of a run's task log (JSON, so the Lua scripts can write them too)."""
    return json.dumps(
        {
            "time_ms": time.time_ns() // 1_000_000,
            "task_id": task.task_id,
            "name": task.tool_name,
            "tool_call_id": task.tool_call_id,
            "status": status,
            "attempt": task.attempt if attempt is None else attempt,
            "progress": progress,
            "message": message,
            "result_json": result_json,
        },
        separators=(",", ":"),
    ).encode()


def task_update(entry: bytes) -> pb.TaskUpdate:
    """The TaskUpdate event payload of a task log entry."""
    body = json.loads(entry)
    update = pb.TaskUpdate(
        task_id=body["task_id"],
        name=body["name"],
        status=STATUS_TO_PROTO[body["status"]],
        progress=float(body["progress"]),
        message=body["message"],
        attempt=int(body["attempt"]),
        tool_call_id=body["tool_call_id"],
        result_json=body["result_json"],
    )
    update.time.FromMilliseconds(int(body["time_ms"]))
    return update


def entry_status(entry: bytes) -> tuple[str, str]:
    """(task_id, status) of a task log entry."""
    body = json.loads(entry)
    return body["task_id"], body["status"]
