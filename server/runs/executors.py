"""The Executor protocol: what the servicer, the ticker and schedules need from an executor.

Two implementations, chosen by configuration (`executor` in server/settings.py):
server/runs/executor.py (LocalExecutor: runs execute in the server process,
Redis leases hand them between replicas) and server/temporal/executor.py
(TemporalExecutor: each run is a Temporal workflow executed by worker
processes). Both store runs, decisions and cancel requests the same way
(server/runs/admission.py) and both write events through Keel's event log,
which stays the only thing clients read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from server.agents.types import AgentSpec
from server.events.log import BusyPolicy, RunRecord
from server.goals.records import Goal
from server.runs import decisions
from server.runs.executor import Resumed, Started
from server.tasks.records import TaskRecord
from server.tasks.store import TaskStore


class Executor(Protocol):
    """Starts, resumes and cancels runs; see LocalExecutor for each method's contract."""

    @property
    def agents(self) -> Mapping[str, AgentSpec]: ...

    @property
    def instance_id(self) -> str: ...

    @property
    def task_store(self) -> TaskStore: ...

    def agent(self, agent_id: str) -> AgentSpec: ...

    def open(self) -> None: ...

    async def start(
        self,
        agent_id: str,
        input: str,
        request_id: str = "",
        *,
        thread_id: str = "",
        policy: BusyPolicy = BusyPolicy.REJECT,
        until_idle: bool = False,
        goal: Goal | None = None,
        schedule_id: str = "",
        tenant: str = "",
    ) -> Started: ...

    async def resume(
        self, run_id: str, answers: Sequence[decisions.Decision], request_id: str = ""
    ) -> Resumed: ...

    async def cancel(self, run_id: str, reason: str) -> RunRecord: ...

    async def cancel_task(self, task_id: str, reason: str) -> TaskRecord: ...

    async def retry_task(self, task_id: str) -> TaskRecord: ...

    async def drain(self, grace_s: float) -> None: ...
