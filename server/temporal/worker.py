"""`python -m server worker`: a Temporal worker process that executes Keel runs.

It polls the task queue for the workflows of runs (server/temporal/
workflow.py) and their activities (server/temporal/activities.py), and runs
background tasks, as a server of the local executor does. Every worker needs
the event log's Redis and the agents of the runs it may be given: a run
whose agent a worker lacks fails with an error event naming it.

SIGTERM or SIGINT: stop polling, give runs in progress shutdown_grace_s to
finish, then hand the rest back (Temporal retries their activities on
another worker, which takes them over from their checkpoints).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker

from server import tracing
from server.agents.types import AgentSpec
from server.errors import EngineUnavailable, RunNotFound, StoreUnavailable, ThreadNotFound
from server.events.factory import open_event_log
from server.events.log import EventLog
from server.metrics import serve_metrics
from server.runs.executor import LocalExecutor, Timing
from server.runs.supervisor import WriterLimits
from server.settings import Settings
from server.tasks.factory import task_store_for
from server.tasks.runner import TaskLimits
from server.temporal.activities import RunActivities
from server.temporal.engine import Engine, EngineConfig
from server.temporal.workflow import RunWorkflow

log = logging.getLogger(__name__)

_CONNECT_RETRY_S = 1.0


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(
        address=settings.temporal_address,
        namespace=settings.temporal_namespace,
        task_queue=settings.task_queue,
        heartbeat_timeout_s=settings.temporal_heartbeat_timeout_s,
    )


async def _connect(config: EngineConfig, stopping: asyncio.Event) -> Client | None:
    """Connect to Temporal, waiting for it to come up; None if told to stop first."""
    while not stopping.is_set():
        try:
            return await Client.connect(config.address, namespace=config.namespace)
        except RuntimeError as exc:
            log.warning("Temporal at %s is unreachable (%s); retrying", config.address, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), _CONNECT_RETRY_S)
    return None


def _next_turn(event_log: EventLog, engine: Engine) -> Callable[[str], Coroutine[Any, Any, None]]:
    async def wake_next(thread_id: str) -> None:
        """A run of the thread ended here: wake the workflow of its next run, if it is
        runnable (the API servers' sweep does it otherwise)."""
        try:
            active = (await event_log.get_thread(thread_id)).active_run_id
            if active and (await event_log.get_run(active)).state.runnable:
                await engine.wake(active)
        except (ThreadNotFound, RunNotFound, StoreUnavailable, EngineUnavailable) as exc:
            log.info("thread %s: its next run is left to the sweep (%s)", thread_id, exc)

    return wake_next


async def work(settings: Settings, agents: dict[str, AgentSpec]) -> None:
    """Poll for runs until SIGTERM or SIGINT; then shut down as the module says."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    config = engine_config(settings)
    event_log = await open_event_log(
        settings.redis_url,
        key_prefix=settings.key_prefix,
        terminal_ttl_s=settings.terminal_ttl_s,
        retain_events=settings.retain_events,
        lease_ttl_s=settings.lease_ttl_s,
        thread_idle_ttl_s=settings.thread_idle_ttl_s,
        wait_replicas=settings.redis_wait_replicas,
        wait_timeout_ms=settings.redis_wait_timeout_ms,
    )
    engine = Engine(config)
    task_store = task_store_for(event_log, lease_ttl_s=settings.lease_ttl_s)
    executor = LocalExecutor(
        event_log,
        agents,
        instance_id=settings.instance_id,
        task_store=task_store,
        task_limits=TaskLimits(
            global_concurrency=settings.tasks_global_concurrency,
            default_timeout_s=settings.tasks_default_timeout_s,
            retry_backoff_s=settings.tasks_retry_backoff_s,
            retry_backoff_max_s=settings.tasks_retry_backoff_max_s,
            poll_interval_s=settings.tasks_poll_interval_s,
            sweep_interval_s=settings.sweep_interval_s,
            lease_ttl_s=settings.lease_ttl_s,
        ),
        limits=WriterLimits(
            settings.write_batch_max,
            settings.write_pending_max,
            linger_s=settings.write_linger_ms / 1000,
        ),
        timing=Timing(
            lease_renew_interval_s=settings.lease_ttl_s / 3,
            sweep_interval_s=settings.sweep_interval_s,
            cancel_wait_s=settings.cancel_wait_s,
        ),
        next_turn=_next_turn(event_log, engine),
    )
    traced = tracing.from_environment()
    if traced is not None:
        tracing.enable(traced)
    metrics_server = None
    if settings.metrics_port is not None:
        metrics_server = serve_metrics(settings.host, settings.metrics_port)
    try:
        client = await _connect(config, stopping)
        if client is None:
            return
        executor.open(sweep=False)  # background tasks; runs come from Temporal
        activities = RunActivities(
            executor,
            event_log,
            heartbeat_interval_s=settings.temporal_heartbeat_timeout_s / 4,
            half_steps=settings.temporal_half_steps,
        )
        worker = Worker(
            client,
            task_queue=config.task_queue,
            workflows=[RunWorkflow],
            activities=[activities.model_request, activities.tool_calls],
            # A dead worker's workflows move to another worker after this, not 10 s.
            sticky_queue_schedule_to_start_timeout=timedelta(seconds=1),
            graceful_shutdown_timeout=timedelta(seconds=settings.shutdown_grace_s),
        )
        async with worker:
            print(f"keel worker polling {config.task_queue!r} on {config.address}", flush=True)
            await stopping.wait()
            log.info("worker shutting down")
    finally:
        await executor.drain(0)
        await task_store.close()
        await event_log.close()
        if metrics_server is not None:
            metrics_server.close()
