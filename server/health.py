"""Health that follows the store: NOT_SERVING while the event log's store is unreachable.

A load balancer (or Kubernetes readiness probe) that asks grpc.health.v1
stops sending new calls to a replica that cannot reach Redis, and sends
them again once it can. The watcher pings the store every
`health_check_interval_s`; a ping that fails, or takes longer than the
interval, counts as unreachable. Draining (SIGTERM) sets NOT_SERVING for
good: the watcher stops first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from grpc_health.v1 import health, health_pb2

from server import background
from server.errors import StoreUnavailable
from server.events.log import EventLog

log = logging.getLogger(__name__)


class StoreHealth:
    """Sets the health of `services` from the store's reachability, until closed."""

    def __init__(
        self,
        servicer: health.aio.HealthServicer,
        event_log: EventLog,
        services: Sequence[str],
        *,
        interval_s: float,
    ) -> None:
        self._servicer = servicer
        self._log = event_log
        self._services = tuple(services)
        self._interval_s = interval_s
        self._serving: bool | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def check(self) -> bool:
        """Ping the store once and set the services' health; True if it answered."""
        try:
            async with asyncio.timeout(self._interval_s):
                await self._log.ping()
            reachable = True
        except (StoreUnavailable, TimeoutError) as exc:
            reachable = False
            if self._serving is not False:
                log.warning(
                    "store unreachable, health NOT_SERVING: %s", str(exc) or "the ping timed out"
                )
        if reachable and self._serving is False:
            log.info("store reachable again, health SERVING")
        if reachable is not self._serving:
            self._serving = reachable
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if reachable
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in self._services:
                await self._servicer.set(name, status)
        return reachable

    def open(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="store-health")

    async def close(self) -> None:
        # The flag, not only the cancellation, ends the watcher: a cancellation that
        # meets the ping's own timeout or redis-py can be lost (server/background.py).
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            await background.stop(task)

    async def _watch(self) -> None:
        while not self._closed:
            await self.check()
            await asyncio.sleep(self._interval_s)
