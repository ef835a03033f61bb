"""Keel's side of Temporal: one client per process, and the calls Keel makes with it.

Every call maps Temporal being unreachable to EngineUnavailable (gRPC
UNAVAILABLE with RetryInfo), so an API server whose Temporal is down keeps
serving what needs only the event log, answers the rest with a retryable
error, and recovers by itself when Temporal is back: the client connects
lazily and reconnects on the next call.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

from temporalio.client import (
    Client,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

from server.errors import EngineUnavailable
from server.temporal.workflow import RESUME, WAKE, WORKFLOW, RunInput, workflow_id

log = logging.getLogger(__name__)

# Temporal's own calls are quick; a frontend that does not answer in this long is down.
_RPC_TIMEOUT = timedelta(seconds=5)
_UNREACHABLE = frozenset(
    {RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED}
)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    address: str = "127.0.0.1:7233"
    namespace: str = "default"
    task_queue: str = "keel-runs"
    heartbeat_timeout_s: float = 10.0


@contextlib.contextmanager
def engine_errors(what: str) -> Iterator[None]:
    """Raise EngineUnavailable for a Temporal that cannot be reached."""
    try:
        yield
    except RPCError as exc:
        if exc.status in _UNREACHABLE:
            raise EngineUnavailable(f"Temporal is unreachable ({what}): {exc.message}") from exc
        raise
    except RuntimeError as exc:  # the lazy client failed to connect
        raise EngineUnavailable(f"Temporal is unreachable ({what}): {exc}") from exc


class Engine:
    """Starts, wakes, resumes and cancels the workflows of runs (server/temporal/workflow.py)."""

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._client: Client | None = None

    @property
    def config(self) -> EngineConfig:
        return self._config

    async def client(self) -> Client:
        """The process's client, made on first use in the running event loop."""
        if self._client is None:
            self._client = await Client.connect(
                self._config.address, namespace=self._config.namespace, lazy=True
            )
        return self._client

    async def start(self, run_id: str) -> None:
        """Start the run's workflow; a workflow of the run already running is kept."""
        client = await self.client()
        with engine_errors("start"):
            await client.start_workflow(
                WORKFLOW,
                self._input(run_id),
                id=workflow_id(run_id),
                task_queue=self._config.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                rpc_timeout=_RPC_TIMEOUT,
            )

    async def wake(self, run_id: str) -> None:
        """Tell the run's workflow to look at the run again, starting it if there is none
        (signal-with-start): the run may have become runnable."""
        client = await self.client()
        with engine_errors("wake"):
            await client.start_workflow(
                WORKFLOW,
                self._input(run_id),
                id=workflow_id(run_id),
                task_queue=self._config.task_queue,
                start_signal=WAKE,
                rpc_timeout=_RPC_TIMEOUT,
            )

    async def resume(self, run_id: str, tool_call_ids: Sequence[str]) -> None:
        """Send the `resume` Update: its validator checks the workflow waits for these
        interrupts. The decisions are stored with the run already, which is what the
        next activity reads, so an Update that is refused, or that no worker takes
        within the RPC timeout (every worker is down), falls back to the `wake`
        signal, which Temporal keeps for the next worker."""
        handle = await self._handle(run_id)
        with engine_errors("resume"):
            try:
                await handle.execute_update(RESUME, list(tool_call_ids), rpc_timeout=_RPC_TIMEOUT)
                return
            except WorkflowUpdateFailedError as exc:
                log.warning("run %s: resume update refused (%s); waking it", run_id, exc.cause)
            except WorkflowUpdateRPCTimeoutOrCancelledError:
                log.warning("run %s: no worker took the resume update; waking it", run_id)
            except RPCError as exc:
                if exc.status is not RPCStatusCode.NOT_FOUND:
                    raise
        await self.wake(run_id)

    async def cancel(self, run_id: str) -> None:
        """Cancel the run's workflow. A run without a running workflow (waiting in its
        thread's queue, or stored while Temporal was down) is woken instead: its
        new workflow's first attempt finds the cancel request and writes the abort."""
        handle = await self._handle(run_id)
        with engine_errors("cancel"):
            try:
                await handle.cancel(rpc_timeout=_RPC_TIMEOUT)
                return
            except RPCError as exc:
                if exc.status is not RPCStatusCode.NOT_FOUND:
                    raise
        await self.wake(run_id)

    async def _handle(self, run_id: str) -> WorkflowHandle[object, object]:
        client = await self.client()
        return client.get_workflow_handle(workflow_id(run_id))

    def _input(self, run_id: str) -> RunInput:
        return RunInput(run_id, heartbeat_timeout_s=self._config.heartbeat_timeout_s)
