"""Keel's domain errors: one tree, mapped to gRPC status in one place (server/api/status.py).

KeelError
├── InvalidArgument           a malformed request (carries field violations)
│   └── UnknownAgent          agent_id names no agent of this server
├── RunNotFound               no such run, or it expired
├── ThreadNotFound            no such thread: never created, deleted or expired
├── RequestIdReused           request_id already made a different run or thread
├── ThreadAlreadyExists       a thread with the chosen thread_id exists
├── ThreadBusy                the thread has an active run (REJECT, DeleteThread)
├── OffsetExpired             offset below the earliest retained index
├── OffsetBeyondEnd           offset past the last event of an ended run
├── RunNotResumable           a live-only run's events below its head are not kept
├── TaskNotFound              no such background task, or its run expired
├── TaskNotRetryable          RetryTask of a task that is not failed or cancelled
├── StaleEpoch                a fenced writer tried to write (never reaches a client as such)
├── IndexConflict             an append did not start at the run's next index
├── StoreUnavailable          Redis unreachable
└── ServerDraining            the server is shutting down; resume elsewhere
"""

from __future__ import annotations

from dataclasses import dataclass


class KeelError(Exception):
    """Base of every error Keel raises on purpose."""


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request: its name and what is wrong with it."""

    field: str
    description: str


class InvalidArgument(KeelError):
    """A request field is missing or malformed."""

    def __init__(self, *violations: FieldViolation) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))


class UnknownAgent(InvalidArgument):
    """The request names an agent this server does not have."""

    def __init__(self, agent_id: str, known: list[str]) -> None:
        self.agent_id = agent_id
        self.known = known
        super().__init__(
            FieldViolation(
                "agent_id",
                f"unknown agent {agent_id!r}; this server runs: {', '.join(known) or 'none'}",
            )
        )


class RunNotFound(KeelError):
    """No run has this id (it never existed, or its retention time passed)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id!r} not found")


class RequestIdReused(KeelError):
    """A request_id that already made a run (or thread) was sent with other content."""

    def __init__(
        self, request_id: str, run_id: str = "", *, thread_id: str = "", schedule_id: str = ""
    ) -> None:
        self.request_id = request_id
        self.run_id = run_id
        self.thread_id = thread_id
        self.schedule_id = schedule_id
        if schedule_id:
            message = (
                f"request_id {request_id!r} already created schedule {schedule_id!r} "
                "with other fields"
            )
        elif thread_id:
            message = (
                f"request_id {request_id!r} already created thread {thread_id!r} "
                "with another resource_id or metadata"
            )
        else:
            message = (
                f"request_id {request_id!r} already started run {run_id!r} "
                "with another agent or input"
            )
        super().__init__(message)


class ThreadNotFound(KeelError):
    """No thread has this id (it never existed, was deleted, or its idle time ran out)."""

    def __init__(self, thread_id: str) -> None:
        self.thread_id = thread_id
        super().__init__(f"thread {thread_id!r} not found")


class ThreadAlreadyExists(KeelError):
    """CreateThread named a thread_id that is taken."""

    def __init__(self, thread_id: str) -> None:
        self.thread_id = thread_id
        super().__init__(f"thread {thread_id!r} already exists")


class ThreadBusy(KeelError):
    """The thread has a run that has not ended (or one waiting for its turn)."""

    def __init__(self, thread_id: str, active_run_id: str) -> None:
        self.thread_id = thread_id
        self.active_run_id = active_run_id
        super().__init__(
            f"thread {thread_id!r} is busy with run {active_run_id!r}; wait for it to end, "
            "cancel it, or send the run with another busy_policy"
        )


class LogRolledBack(KeelError):
    """The run's log no longer holds events a client received: its store came back with an
    older state (events/lineage.py). From `diverged_at` (None: unknown) on, the events the
    client holds are not the log's."""

    def __init__(
        self, run_id: str, offset: int, next_offset: int, incarnation: str, diverged_at: int | None
    ) -> None:
        self.run_id = run_id
        self.offset = offset
        self.next_offset = next_offset
        self.incarnation = incarnation
        self.diverged_at = diverged_at
        where = "at an unknown index" if diverged_at is None else f"from index {diverged_at}"
        super().__init__(
            f"run {run_id!r}: the store lost events this client received (it holds events up "
            f"to {offset - 1} of incarnation {incarnation!r}; the log's head is {next_offset} "
            f"and its history differs {where}); read the run again from "
            f"{0 if diverged_at is None else diverged_at}"
        )


class RunNotResumable(KeelError):
    """The run's agent keeps no events: it can only be followed live, from its head."""

    def __init__(self, run_id: str, offset: int, next_offset: int) -> None:
        self.run_id = run_id
        self.offset = offset
        self.next_offset = next_offset
        super().__init__(
            f"run {run_id!r} is live only (its agent keeps no events): offset {offset} is gone; "
            f"follow it live from offset {next_offset}"
        )


class OffsetExpired(KeelError):
    """The requested offset is below the earliest index the log still retains."""

    def __init__(self, run_id: str, offset: int, earliest_offset: int, next_offset: int) -> None:
        self.run_id = run_id
        self.offset = offset
        self.earliest_offset = earliest_offset
        self.next_offset = next_offset
        super().__init__(
            f"offset {offset} of run {run_id!r} is no longer retained; "
            f"the earliest retained offset is {earliest_offset}"
        )


class OffsetBeyondEnd(KeelError):
    """The run has ended and the requested offset is past its last event."""

    def __init__(self, run_id: str, offset: int, next_offset: int) -> None:
        self.run_id = run_id
        self.offset = offset
        self.next_offset = next_offset
        super().__init__(
            f"run {run_id!r} has ended with {next_offset} events; offset {offset} will never exist"
        )


class RunNotSuspended(KeelError):
    """Resume needs a suspended run; this one is in another state."""

    def __init__(self, run_id: str, state: str) -> None:
        self.run_id = run_id
        self.state = state
        super().__init__(f"run {run_id!r} is {state}, not suspended: there is nothing to resume")


class InterruptResolved(KeelError):
    """The interrupt was already answered, with another decision."""

    def __init__(self, run_id: str, tool_call_id: str) -> None:
        self.run_id = run_id
        self.tool_call_id = tool_call_id
        super().__init__(
            f"tool call {tool_call_id!r} of run {run_id!r} was already answered differently"
        )


class ConcurrentModification(KeelError):
    """Another request changed the run between our read and our write."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(
            f"run {run_id!r} was changed by another request (a racing Resume or cancel); "
            "read it again and retry if still relevant"
        )


class TaskNotFound(KeelError):
    """No background task has this id (or its run's retention time passed)."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"task {task_id!r} not found")


class TaskNotRetryable(KeelError):
    """Only a failed or cancelled task can be run again."""

    def __init__(self, task_id: str, status: str) -> None:
        self.task_id = task_id
        self.status = status
        super().__init__(
            f"task {task_id!r} is {status}: only a failed or cancelled task can be retried"
        )


class ScheduleNotFound(KeelError):
    """No schedule has this id (it never existed, or was deleted)."""

    def __init__(self, schedule_id: str) -> None:
        self.schedule_id = schedule_id
        super().__init__(f"schedule {schedule_id!r} not found")


class ScheduleAlreadyExists(KeelError):
    """CreateSchedule named a schedule_id that is taken."""

    def __init__(self, schedule_id: str) -> None:
        self.schedule_id = schedule_id
        super().__init__(f"schedule {schedule_id!r} already exists")


class ScheduleChanged(KeelError):
    """A schedule changed between a read and a compare-and-set write of it."""

    def __init__(self, schedule_id: str) -> None:
        self.schedule_id = schedule_id
        super().__init__(
            f"schedule {schedule_id!r} was changed by another request; read it again and retry"
        )


class StaleEpoch(KeelError):
    """A writer's epoch is older than the run's: another owner took the run over."""

    def __init__(self, run_id: str, epoch: int, current_epoch: int) -> None:
        self.run_id = run_id
        self.epoch = epoch
        self.current_epoch = current_epoch
        super().__init__(f"run {run_id!r}: epoch {epoch} is fenced by epoch {current_epoch}")


class IndexConflict(KeelError):
    """An append did not start at the run's next index (a bug or a second writer)."""

    def __init__(self, run_id: str, first_index: int, next_index: int) -> None:
        self.run_id = run_id
        self.first_index = first_index
        self.next_index = next_index
        super().__init__(
            f"run {run_id!r}: append starts at {first_index} but the next index is {next_index}"
        )


class SchemaTooNew(Exception):
    """The database's schema was migrated by a newer Keel than this one."""

    def __init__(self, schema: str, revision: str, head: str) -> None:
        self.schema, self.revision, self.head = schema, revision, head
        super().__init__(
            f"PostgreSQL schema {schema!r} is at revision {revision!r}, which this Keel does "
            f"not know (its newest is {head!r}): the database was migrated by a newer Keel; "
            "run that version (or a newer one), never an older one, on this database"
        )


class StoreUnavailable(KeelError):
    """The store (Redis) could not be reached."""


class Unauthenticated(KeelError):
    """The call carries no valid credentials (API key or client certificate)."""


class PermissionDenied(KeelError):
    """The caller's role may not make this call."""

    def __init__(self, method: str, role: str, needed: str) -> None:
        self.method, self.role, self.needed = method, role, needed
        super().__init__(f"role {role!r} may not call {method}: it needs {needed!r} or above")


class EngineUnavailable(KeelError):
    """The workflow engine (Temporal) could not be reached."""


class ServerDraining(KeelError):
    """The server is shutting down; the client should resume on another replica."""

    def __init__(self) -> None:
        super().__init__("server is shutting down; resume from the next offset on another replica")
