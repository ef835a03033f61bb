"""The push dispatcher: delivers every task change to the task's push-notification configs,
at least once, from whichever server is alive (docs/a2a.md, "Push notifications").

Every server runs one. Each `sweep_interval_s` (and at once when a config is added here)
it claims the due runs of the PushStore and watches each of them:

- it listens to the run's events; a change of the task's state (a start, suspension,
  resumption or end) wakes it, and so does a gap in the notifications;
- on waking it reads the run and, for each config whose last delivered mark differs from
  the run's (mark_of), POSTs the task as it is now (sender.py). Success records the mark;
  failure records the attempt and retries with doubling backoff, from retry_initial_ms
  up to retry_max_ms, for as long as the run is kept;
- it renews its hold on the run every third of hold_ms; a server that dies stops
  renewing, the run becomes due, and another server's sweep takes it over and delivers
  what is missing (so a notification may arrive twice, never not at all);
- adding a config makes the run due at once and ends its hold, wherever it is held, so
  the next watcher (maybe the same server's) reads the new config;
- once the run has ended and every config has its final state, it lets go, and the
  configs expire with the run.

Notifications are level-triggered: each carries the task as it is when sent, so changes
that come faster than a delivery fold into the next one; the final state always arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from a2a.types import a2a_pb2 as a2a
from keel.v1.agent_service_pb2 import AgentEvent

from server import background
from server.a2a import tasks
from server.a2a.push.sender import Sender
from server.a2a.push.store import Delivery, PushConfig, PushStore
from server.errors import KeelError, RunNotFound
from server.events.log import EventLog, RunRecord, Subscription

log = logging.getLogger(__name__)

CLAIM_BATCH = 100
# A watched run is read again when its state may have changed, when a retry is due, and
# at least this often (a safety net; between, the watcher only renews its hold).
LOOK_AGAIN_MS = 30_000
# The events after which the task's state may differ.
_STATE_EVENTS = frozenset({"start", "suspended", "resumed", "finish", "error", "abort"})


def mark_of(record: RunRecord) -> str:
    """What a delivery of the run as it is now is recorded as: the task's state and the
    run's epoch, so that a second suspension (after a resume, which takes a new epoch)
    is a change too."""
    return f"{a2a.TaskState.Name(tasks.STATES[record.state])}:{record.epoch}"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Wake:
    """A run's listener: wakes its watcher when the task's state may have changed."""

    def __init__(self, event: asyncio.Event) -> None:
        self._event = event

    def on_events(self, events: Sequence[AgentEvent]) -> None:
        if any(e.WhichOneof("payload") in _STATE_EVENTS for e in events):
            self._event.set()

    def on_gap(self) -> None:
        self._event.set()


class Dispatcher:
    def __init__(
        self,
        event_log: EventLog,
        store: PushStore,
        sender: Sender,
        snapshot: Callable[[RunRecord], Awaitable[a2a.Task]],
        *,
        instance_id: str,
        hold_ms: int,
        sweep_interval_s: float,
        retry_initial_ms: int,
        retry_max_ms: int,
        retention_ms: int,
    ) -> None:
        self._log = event_log
        self._store = store
        self._sender = sender
        self._snapshot = snapshot
        self._owner = instance_id
        self._hold_ms = hold_ms
        self._sweep_interval_s = sweep_interval_s
        self._retry_initial_ms = retry_initial_ms
        self._retry_max_ms = retry_max_ms
        self._retention_ms = retention_ms
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._wakes: dict[str, asyncio.Event] = {}
        self._reclaimed: set[str] = set()  # claimed again while watched (see _sweep_forever)
        self._poked = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def store(self) -> PushStore:
        return self._store

    def open(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="push-sweeper")

    def poke(self, run_id: str = "") -> None:
        """A config was added (to `run_id`): look at due runs now, and at `run_id` again
        if this server watches it."""
        wake = self._wakes.get(run_id)
        if wake is not None:
            wake.set()
        self._poked.set()

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            await background.stop(self._sweeper)
        for watcher in list(self._watchers.values()):
            await background.stop(watcher)
        await self._sender.close()

    async def _sweep_forever(self) -> None:
        while not self._closed:
            try:
                for run_id in await self._store.claim(self._owner, CLAIM_BATCH, self._hold_ms):
                    if run_id in self._watchers:
                        # Claimed again while watched here (a config was added): the
                        # watcher reads it now, or a new one starts if it is ending.
                        self._reclaimed.add(run_id)
                        self._wakes[run_id].set()
                    else:
                        self._start_watching(run_id)
            except KeelError as exc:  # the store is unreachable: try again next time
                log.warning("push sweep failed: %s", exc)
            except Exception:  # a bug must not end the sweeps; CancelledError passes
                log.exception("push sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), self._sweep_interval_s)
            self._poked.clear()

    def _start_watching(self, run_id: str) -> None:
        self._wakes[run_id] = asyncio.Event()
        self._watchers[run_id] = asyncio.create_task(self._watch(run_id), name=f"push:{run_id}")

    async def _watch(self, run_id: str) -> None:
        wake = self._wakes[run_id]
        subscription: Subscription | None = None
        try:
            subscription = await self._log.subscribe(run_id, _Wake(wake))
            renew_ms = max(1, self._hold_ms // 3)
            look_at_ms = 0  # when to read the run again, unless something wakes us first
            while not self._closed:
                if wake.is_set() or _now_ms() >= look_at_ms:
                    wake.clear()
                    self._reclaimed.discard(run_id)
                    wait_ms = await self._deliver(run_id)
                    if wait_ms is None:
                        return
                    look_at_ms = _now_ms() + min(wait_ms, LOOK_AGAIN_MS)
                with contextlib.suppress(TimeoutError):
                    timeout_ms = min(max(0, look_at_ms - _now_ms()), renew_ms)
                    await asyncio.wait_for(wake.wait(), timeout_ms / 1000)
                if not await self._store.renew(run_id, self._owner, self._hold_ms):
                    return  # another server holds it now, or a config was added
        except KeelError as exc:
            # The store failed: stop holding it; the run becomes due again by itself.
            log.warning("push notifications of %s: %s", run_id, exc)
        except Exception:  # likewise, logged; CancelledError passes
            log.exception("push notifications of %s failed", run_id)
        finally:
            self._wakes.pop(run_id, None)
            self._watchers.pop(run_id, None)
            if subscription is not None:
                await asyncio.shield(subscription.close())
            if run_id in self._reclaimed:
                self._reclaimed.discard(run_id)
                if not self._closed:
                    self._start_watching(run_id)

    async def _deliver(self, run_id: str) -> int | None:
        """Deliver what is due for the run; how long to wait before looking again (ms), or
        None when this server is done with it."""
        try:
            record = await self._log.get_run(run_id)
        except RunNotFound:
            await self._store.expire(run_id, 0)  # its run is gone: so are its configs
            return None
        # Deliveries first: a config replaced between the two reads then looks delivered
        # (its replacement made the run due, so it is looked at again), never the other way
        # round (the old config's url told, and the mark recorded for the new one).
        deliveries = await self._store.deliveries(run_id)
        configs = await self._store.configs(run_id)
        mark = mark_of(record)
        now_ms = _now_ms()
        due = [c for c in configs if deliveries.get(c.config_id, Delivery()).mark != mark]
        ready = [c for c in due if deliveries.get(c.config_id, Delivery()).not_before_ms <= now_ms]
        if ready:
            task = await self._snapshot(record)
            problems = await asyncio.gather(*(self._sender.send(c, task) for c in ready))
            for config, problem in zip(ready, problems, strict=True):
                await self._record(run_id, config, deliveries.get(config.config_id), mark, problem)
            deliveries = await self._store.deliveries(run_id)
        waiting = [
            d.not_before_ms
            for c in configs
            if (d := deliveries.get(c.config_id, Delivery())).mark != mark
        ]
        if waiting:
            return max(0, min(waiting) - _now_ms())
        if not record.state.terminal:
            return LOOK_AGAIN_MS  # until the task changes
        # Ended, and every config has its final state: let go, and let the configs expire
        # with the run. A config added meanwhile either was added before the expiry, and
        # is seen by the reading below (which makes the run due again), or after it, and
        # made the run due itself (expire takes the run out of the index: reading first
        # would lose a config added between the reading and the expiry).
        await self._store.release(run_id, self._owner)
        await self._store.expire(run_id, self._remaining_ms(record))
        deliveries = await self._store.deliveries(run_id)
        if any(
            deliveries.get(c.config_id, Delivery()).mark != mark
            for c in await self._store.configs(run_id)
        ):
            await self._store.mark_due(run_id)
        return None

    async def _record(
        self,
        run_id: str,
        config: PushConfig,
        before: Delivery | None,
        mark: str,
        problem: str,
    ) -> None:
        if not problem:
            await self._store.record(run_id, config.config_id, Delivery(mark=mark))
            return
        attempts = (before.attempts if before is not None else 0) + 1
        backoff_ms = min(self._retry_max_ms, self._retry_initial_ms * 2 ** min(attempts - 1, 30))
        log.info(
            "push notification of %s to %s failed (attempt %d, next in %d ms): %s",
            run_id,
            config.url,
            attempts,
            backoff_ms,
            problem,
        )
        mark_delivered = before.mark if before is not None else ""
        await self._store.record(
            run_id,
            config.config_id,
            Delivery(
                mark=mark_delivered,
                attempts=attempts,
                not_before_ms=_now_ms() + backoff_ms,
                error=problem,
            ),
        )

    def _remaining_ms(self, record: RunRecord) -> int:
        retention_ms = record.terminal_ttl_ms or self._retention_ms
        return max(1, record.update_time_ms + retention_ms - _now_ms())
