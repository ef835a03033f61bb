"""The task runner: each server runs background tasks whenever a slot is free.

1. Dispatch (woken when a task is queued or a slot frees here, and every
   poll_interval_s for what other servers did): for each due task, oldest
   first, whose agent this server has, take a global slot and one of the
   agent's (TaskStore.acquire_slot; every global slot taken ends the round),
   then, off the dispatch loop, start the task's next attempt
   (TaskStore.start_task); a task another server started first, or that
   was cancelled, gives its slots back.
2. An attempt runs the tool's function with the task's arguments, under
   the task's timeout, with task_context() set; its lease and slots are
   renewed every third of the lease TTL. A lease that is lost (another
   server took the task over) or a cancel request stops the attempt.
3. The outcome ends the attempt: COMPLETED with the result; a failure or a
   timeout RETRYING (after a capped exponential backoff) while retries are
   left, else FAILED; CANCELLED. The slots are given back and dispatch
   runs again.
4. A sweep (every sweep_interval_s) queues again the RUNNING tasks whose
   lease lapsed: their server died, and the task runs again, with the same
   task id, on whichever server starts it (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import pydantic_core
from pydantic_ai import Tool
from pydantic_ai.toolsets import AbstractToolset, FunctionToolset

from server import metrics
from server.agents.types import AgentSpec, Counters
from server.errors import StaleEpoch, StoreUnavailable, TaskNotFound
from server.events.log import Subscription
from server.tasks import context
from server.tasks.records import TaskRecord, TaskStatus, background_options
from server.tasks.store import Renewal, Slot, TaskStore
from server.threads.history import task_result_entry

log = logging.getLogger(__name__)

_DISPATCH_BATCH = 100


@dataclass(frozen=True, slots=True)
class TaskLimits:
    """The task runner's settings (see server/settings.py)."""

    global_concurrency: int = 10
    default_timeout_s: float = 300.0
    retry_backoff_s: float = 1.0  # the wait before the first retry; doubles each time
    retry_backoff_max_s: float = 60.0
    poll_interval_s: float = 0.5
    sweep_interval_s: float = 1.0
    lease_ttl_s: float = 5.0


def background_tool(spec: AgentSpec, name: str) -> Tool[Any] | None:
    """The agent's background tool called `name`, or None."""
    found: list[Tool[Any]] = []

    def visit(toolset: AbstractToolset[Any]) -> None:
        if isinstance(toolset, FunctionToolset) and name in toolset.tools:
            tool = toolset.tools[name]
            if background_options(tool.metadata) is not None:
                found.append(tool)

    for toolset in spec.agent.toolsets:
        toolset.apply(visit)
    return found[0] if found else None


@dataclass(slots=True)
class _Attempt:
    task: TaskRecord  # as queued until the attempt starts, then as started
    runner: asyncio.Task[None]
    stop_reason: str = ""  # set when a cancel request or a lost lease stops it
    ending: bool = False  # the tool returned: its outcome is being written
    started: bool = False  # TaskStore.start_task made it this server's attempt
    stopping: bool = False  # its cancellation arrived: it is writing how it stopped


@dataclass(slots=True)
class _Listening:
    """The one subscription to a run's task channel that its attempts here share."""

    subscribing: asyncio.Future[Subscription]
    attempts: int = 0


class _CancelListener:
    """Hears cancel requests for the tasks of one run that run here."""

    def __init__(self, runner: TaskRunner) -> None:
        self._runner = runner

    def on_task_log(self) -> None:
        pass

    def on_task_cancel(self, task_id: str) -> None:
        self._runner.stop(task_id, "cancelled")


class TaskRunner:
    """Runs background tasks of this server's agents; see the module docstring."""

    def __init__(
        self,
        store: TaskStore,
        counters: Counters,
        agents: Mapping[str, AgentSpec],
        *,
        instance_id: str,
        limits: TaskLimits,
    ) -> None:
        self._store = store
        self._counters = counters
        self._agents = agents
        self._instance_id = instance_id
        self._limits = limits
        self._wakeup = asyncio.Event()
        self._attempts: dict[str, _Attempt] = {}
        self._listening: dict[str, _Listening] = {}  # run id -> its shared subscription
        self._loops: list[asyncio.Task[None]] = []
        self._draining = False

    @property
    def running(self) -> frozenset[str]:
        """Ids of the tasks with an attempt running here now."""
        return frozenset(self._attempts)

    def open(self) -> None:
        """Start dispatching, renewing and sweeping."""
        if not self._loops:
            self._loops = [
                asyncio.create_task(self._dispatch_forever(), name="task-dispatch"),
                asyncio.create_task(self._renew_forever(), name="task-leases"),
                asyncio.create_task(self._sweep_forever(), name="task-sweep"),
            ]

    def wake(self) -> None:
        """Dispatch now: a task was queued, or a slot freed."""
        self._wakeup.set()

    def stop(self, task_id: str, reason: str) -> None:
        """Stop the task's attempt running here, if any (its outcome: CANCELLED).

        Told again while the attempt still runs, it cancels it again (keeping the
        first reason): a cancellation can be lost, since redis-py sends commands
        through asyncio.wait_for, which on Python 3.11 may swallow one that lands as
        the send completes. The lease renewal tells it again until it stops.
        """
        attempt = self._attempts.get(task_id)
        if attempt is None:
            return
        again = bool(attempt.stop_reason)
        if not again:
            attempt.stop_reason = reason
        # Cancelled before it began, an attempt would run none of its cleanup;
        # cancelled while starting, it would leave a started task nobody runs.
        # Until it has started, it finds the reason itself. Once it is writing its
        # outcome or how it stopped, a second cancellation would cut that short.
        if attempt.started and not (again and (attempt.ending or attempt.stopping)):
            attempt.runner.cancel()

    async def drain(self) -> None:
        """Stop dispatching; stop the attempts running here (their leases lapse and
        another server runs them again)."""
        self._draining = True
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        attempts = list(self._attempts.values())
        for attempt in attempts:
            self.stop(attempt.task.task_id, "shutdown")
        await asyncio.gather(*(a.runner for a in attempts), return_exceptions=True)

    async def dispatch_once(self) -> int:
        """Step 1 of the module docstring; returns how many slots it took."""
        taken = 0
        due = [i for i in await self._store.due(_DISPATCH_BATCH) if i not in self._attempts]
        found = await asyncio.gather(
            *(self._store.get_task(i) for i in due), return_exceptions=True
        )
        for task in found:
            if self._draining:
                break
            if isinstance(task, TaskNotFound):
                continue
            if isinstance(task, BaseException):
                raise task
            spec = self._agents.get(task.agent_id)
            if spec is None or task.task_id in self._attempts:
                continue  # a server that has the agent runs it
            slot = await self._store.acquire_slot(
                task.task_id,
                task.agent_id,
                global_limit=self._limits.global_concurrency,
                agent_limit=spec.max_concurrent_tasks,
            )
            if slot is Slot.FULL:
                break  # no task can start until a slot frees (and wakes dispatch)
            if slot is Slot.AGENT_FULL:
                continue  # another agent's task may still fit
            self._spawn(task, spec)
            taken += 1
        return taken

    def _spawn(self, task: TaskRecord, spec: AgentSpec) -> None:
        runner = asyncio.create_task(self._attempt(task, spec), name=f"task:{task.task_id}")
        self._attempts[task.task_id] = _Attempt(task, runner)

    async def _attempt(self, queued: TaskRecord, spec: AgentSpec) -> None:
        """Steps 2 and 3 of the module docstring, once its slots are held."""
        attempt = self._attempts[queued.task_id]
        task = queued
        listening = False
        try:
            if attempt.stop_reason:
                return  # stopped before it started: nothing of it to undo
            running = await self._store.start_task(queued.task_id, self._instance_id)
            if running is None:
                return  # another server started it first, or it ended
            task = attempt.task = running
            attempt.started = True
            metrics.TASKS_STARTED.inc()
            metrics.TASKS_RUNNING.inc()
            if attempt.stop_reason:  # told while it was starting
                attempt.stopping = True
                await self._stopped(attempt, task)
                return
            await self._listen(task.run_id)
            listening = True
            if task.cancel_reason:  # asked before this attempt began
                await self._finish(task, TaskStatus.CANCELLED, error=task.cancel_reason)
                return
            tool = background_tool(spec, task.tool_name)
            if tool is None:
                await self._finish(
                    task,
                    TaskStatus.FAILED,
                    error=f"agent {task.agent_id!r} has no background tool {task.tool_name!r}",
                )
                return
            outcome = await self._call(task, tool)
            attempt.ending = True  # a renewal refused from now on is its own ending
            await self._end(task, outcome)
        except asyncio.CancelledError:
            if not attempt.stop_reason:
                raise  # not ours: the event loop is going away
            attempt.stopping = True
            await self._stopped(attempt, task)
        except (StaleEpoch, TaskNotFound):
            log.info("task %s was taken over or is gone; stopping", task.task_id)
        except StoreUnavailable as exc:
            log.warning("task %s stopped: the store is unreachable (%s)", task.task_id, exc)
        finally:
            if attempt.started:
                metrics.TASKS_RUNNING.dec()
            self._attempts.pop(task.task_id, None)
            with contextlib.suppress(StoreUnavailable, TaskNotFound):
                await self._give_slot_back(task, attempt.started)
            if listening:
                await self._unlisten(task.run_id)

    async def _stopped(self, attempt: _Attempt, task: TaskRecord) -> None:
        """A started attempt told to stop: "cancelled" ends the task CANCELLED; "shutdown"
        and "lost" write nothing (another server runs the task again)."""
        if attempt.stop_reason == "cancelled":
            asked = await self._store.get_task(task.task_id)
            await self._finish(task, TaskStatus.CANCELLED, error=asked.cancel_reason)

    async def _give_slot_back(self, task: TaskRecord, started: bool) -> None:
        """Release the task's slots, held under its id, and dispatch again. An attempt
        that never started leaves them to a server that started the task meanwhile."""
        if not started and (await self._store.get_task(task.task_id)).status is (
            TaskStatus.RUNNING
        ):
            return
        await self._store.release_slot(task.task_id, task.agent_id)
        self.wake()

    async def _listen(self, run_id: str) -> None:
        """Hear cancel requests for the run's tasks (one subscription per run here)."""
        listening = self._listening.get(run_id)
        if listening is None:
            subscribing = asyncio.ensure_future(
                self._store.subscribe_tasks(run_id, _CancelListener(self))
            )
            listening = self._listening[run_id] = _Listening(subscribing)
        listening.attempts += 1
        try:
            await asyncio.shield(listening.subscribing)
        except BaseException:
            await self._unlisten(run_id)
            raise

    async def _unlisten(self, run_id: str) -> None:
        listening = self._listening[run_id]
        listening.attempts -= 1
        if listening.attempts:
            return
        del self._listening[run_id]
        with contextlib.suppress(Exception):
            subscription = await listening.subscribing
            await subscription.close()

    async def _call(self, task: TaskRecord, tool: Tool[Any]) -> tuple[str, Any]:
        """One attempt of the tool: ("ok", result) or ("error", message)."""

        async def report(progress: float, message: str) -> None:
            await self._store.report_progress(task.task_id, task.epoch, progress, message)

        token = context.enter(
            context.TaskContext(
                task_id=task.task_id,
                run_id=task.run_id,
                attempt=task.attempt,
                counters=self._counters,
                report=report,
            )
        )
        try:
            schema = tool.function_schema
            args = schema.validator.validate_json(task.args_json or "{}")
            async with asyncio.timeout(task.timeout_s):
                # A background tool takes no RunContext (checked when it is declared).
                result = await schema.call(args, cast(Any, None))
            return "ok", result
        except TimeoutError:
            return "error", f"timed out after {task.timeout_s:g} s"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the tool's failure is the task's outcome
            return "error", str(exc) or type(exc).__name__
        finally:
            context.leave(token)

    async def _end(self, task: TaskRecord, outcome: tuple[str, Any]) -> None:
        kind, value = outcome
        if kind == "ok":
            try:
                result_json = pydantic_core.to_json(value).decode()
            except pydantic_core.PydanticSerializationError:
                result_json = pydantic_core.to_json(str(value)).decode()
            await self._finish(task, TaskStatus.COMPLETED, result_json=result_json)
            return
        if task.failures < task.max_retries:
            backoff_s = min(
                self._limits.retry_backoff_max_s,
                self._limits.retry_backoff_s * 2**task.failures,
            )
            retry_at_ms = time.time_ns() // 1_000_000 + round(backoff_s * 1000)
            await self._finish(task, TaskStatus.RETRYING, error=value, retry_at_ms=retry_at_ms)
            # Look again when it is due (another server may start it first: fine).
            asyncio.get_running_loop().call_later(backoff_s, self.wake)
            return
        await self._finish(task, TaskStatus.FAILED, error=value)

    async def _finish(
        self,
        task: TaskRecord,
        status: TaskStatus,
        *,
        result_json: str = "",
        error: str = "",
        retry_at_ms: int = 0,
    ) -> None:
        entry = b""
        if task.thread_id and not task.until_idle:
            entry = task_result_entry(task, status, result_json=result_json, error=error)
        metrics.TASKS_ENDED.labels(status.value).inc()
        await self._store.finish_task(
            task.task_id,
            task.epoch,
            status,
            result_json=result_json,
            error=error,
            retry_at_ms=retry_at_ms,
            thread_entry=entry,
        )

    # The loops stop when cancelled, and also when draining: a Redis client may turn
    # a cancellation that lands mid-command into a connection error (swallowed here
    # as an outage), and drain must not wait for a loop that went on.

    async def _dispatch_forever(self) -> None:
        while not self._draining:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._limits.poll_interval_s):
                    await self._wakeup.wait()
            self._wakeup.clear()
            try:
                while await self.dispatch_once():
                    pass  # started some: there may be more room
            except StoreUnavailable as exc:
                stop_if_cancelled()
                log.warning("task dispatch failed: %s", exc)

    async def _renew_forever(self) -> None:
        while not self._draining:
            await asyncio.sleep(self._limits.lease_ttl_s / 3)
            for task_id, attempt in list(self._attempts.items()):
                if not attempt.started:
                    continue
                task = attempt.task
                try:
                    renewed = await self._store.renew_task(task_id, task.epoch)
                    await self._store.renew_slot(task_id, task.agent_id)
                except StoreUnavailable as exc:
                    stop_if_cancelled()
                    log.warning("renewing task %s failed: %s", task_id, exc)
                    continue
                if renewed is Renewal.CANCEL_REQUESTED:
                    self.stop(task_id, "cancelled")  # its message may never have come
                elif renewed is Renewal.LOST and not attempt.ending:
                    log.warning("task %s was taken over by another server", task_id)
                    self.stop(task_id, "lost")

    async def _sweep_forever(self) -> None:
        while not self._draining:
            try:
                if await self._store.lapsed(_DISPATCH_BATCH):
                    self.wake()
            except StoreUnavailable as exc:
                stop_if_cancelled()
                log.warning("task sweep failed: %s", exc)
            await asyncio.sleep(self._limits.sweep_interval_s)


def stop_if_cancelled() -> None:
    """Raise CancelledError if the current task was asked to stop (see the loops above)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
