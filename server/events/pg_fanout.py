"""One LISTEN connection per process, fanned out to local listeners (PostgreSQL).

A store's notifications all travel on ONE channel, named after its schema:
every append (append_events) and cancel request (sql.REQUEST_CANCEL) of any
run calls pg_notify on it, with the run's id in the payload. One channel
rather than one per run, because:

- subscribing needs no LISTEN: the connection LISTENs once, at start (a
  LISTEN per run would cost a round trip on the shared connection per
  observer, serialized behind the reader); `subscribe` costs one NOTIFY of
  a marker on a pooled connection instead (PgFanout.subscribe);
- PostgreSQL delivers a channel's notifications in commit order, and one
  run's appends commit in index order (its row lock), so a run's batches
  arrive in order on one channel as they would on many.
The cost: every Keel process of a store receives every run's notifications
and drops those it has no listener for (a dict lookup on the run id, parsed
before anything else). Fine for a fleet of a few replicas; docs/postgres.md.

Payloads (text; the run id is length-prefixed, so any run id works):
- "e<len>:<run id><base64 EventBatch>": an append's events, when they fit in
  NOTIFY's 8000 bytes;
- "d<len>:<run id><first>:<count>": a doorbell for a larger batch: the
  fanout reads those events from the log (the rows are committed: NOTIFY is
  delivered after commit), and holds back the run's later notifications until
  they are delivered, so listeners still see batches in index order;
- "c<len>:<run id><reason>": a cancel request, for ControlListeners;
- "s<len>:<token>": a new subscription's marker (see PgFanout.subscribe).

The reader task owns the connection: connect, LISTEN, then read
notifications, checking the connection with a query after a quiet
health-check interval. When the connection fails (the server restarted, the
backend was terminated, the network broke) the fanout is not ready:
`subscribe` waits for it; the reader reconnects with capped exponential
backoff and, once LISTEN is back, tells every listener registered before
on_gap (they may have missed notifications: they re-read the log). On_gap
comes only after LISTEN is back, so a re-read started then misses nothing.
Control listeners get nothing: the run's record keeps the cancel request
(as on Redis, fanout.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import psycopg
from google.protobuf.message import DecodeError
from keel.v1.agent_service_pb2 import AgentEvent, EventBatch

from server import background
from server.errors import StoreUnavailable
from server.events import sql
from server.events.codec import Batch
from server.events.log import ControlListener, Listener
from server.events.pg_migrate import quote_ident

logger = logging.getLogger(__name__)

# NOTIFY refuses a payload of 8000 bytes or more.
MAX_PAYLOAD_BYTES = 7999
_BACKOFF_MIN_S = 0.05
_BACKOFF_MAX_S = 2.0

# Reads a run's events [first, first + count) from the log (for a doorbell).
Fetch = Callable[[str, int, int], Awaitable[list[AgentEvent]]]
# NOTIFYs a payload on the channel, in a transaction of its own (a subscription's marker).
Notify = Callable[[str], Awaitable[None]]


def events_payload(run_id: str, first: int, count: int, encoded: bytes) -> str:
    """The notification of an append of `count` events from `first` (`encoded`: their
    EventBatch): the batch itself if it fits, else a doorbell."""
    head = f"{len(run_id)}:{run_id}"
    inline = "e" + head + base64.b64encode(encoded).decode("ascii")
    if len(inline.encode()) <= MAX_PAYLOAD_BYTES:
        return inline
    return "d" + head + f"{first}:{count}"


@dataclass(eq=False)
class _Run:
    """A run's local listeners, and its notifications held back behind a doorbell."""

    listeners: dict[PgSubscription, None] = field(default_factory=dict)
    controls: dict[PgSubscription, None] = field(default_factory=dict)
    # (listeners at arrival, events or (first, count) to fetch), in arrival order.
    backlog: deque[tuple[tuple[Listener, ...], Batch | tuple[int, int]]] = field(
        default_factory=deque
    )
    draining: bool = False


class PgSubscription:
    """A listener's registration with the fanout."""

    def __init__(
        self,
        fanout: PgFanout,
        run_id: str,
        listener: Listener | ControlListener,
        *,
        active: bool = True,
    ) -> None:
        self._fanout = fanout
        self.run_id = run_id
        self.listener = listener
        # An event listener hears nothing until its subscription's own notification
        # came through (see PgFanout.subscribe).
        self.active = active

    async def close(self) -> None:
        self._fanout.remove(self)


class PgFanout:
    """The LISTEN connection of one store (see the module docstring)."""

    def __init__(
        self,
        conninfo: str,
        channel: str,
        fetch: Fetch,
        notify: Notify,
        *,
        connect_kwargs: dict[str, Any],
        connect_timeout_s: float = 5.0,
        health_check_interval_s: float = 10.0,
    ) -> None:
        self._conninfo = conninfo
        self.channel = channel
        self._fetch = fetch
        self._notify = notify
        # Subscriptions waiting for their marker notification, by its token.
        self._marks: dict[str, PgSubscription] = {}
        self._connect_kwargs = connect_kwargs
        self._connect_timeout_s = connect_timeout_s
        self._health_s = health_check_interval_s
        self._runs: dict[str, _Run] = {}
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._first = asyncio.get_running_loop().create_future()
        self._closed = False
        self._drains: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Connect and LISTEN; raises StoreUnavailable if the first attempt fails."""
        self._task = asyncio.create_task(self._run(), name=f"pg-listen-{self.channel}")
        self._task.add_done_callback(self._reader_done)
        await asyncio.shield(self._first)

    def _reader_done(self, task: asyncio.Task[None]) -> None:
        """The reader ends only when closed, or at a failed first connection; anything
        else is a bug, which must not leave start() (or subscribers) waiting for ever."""
        error = None if task.cancelled() else task.exception()
        if not self._first.done():
            self._first.set_exception(
                StoreUnavailable(f"PostgreSQL LISTEN reader ended: {error or 'cancelled'}")
            )
        elif error is not None and not self._closed:
            logger.error("PostgreSQL LISTEN reader failed", exc_info=error)

    @property
    def connection(self) -> psycopg.AsyncConnection[Any] | None:
        """The LISTEN connection, while one is open (tests terminate its backend)."""
        return self._conn

    async def subscribe(self, run_id: str, listener: Listener) -> PgSubscription:
        """Register `listener`: it hears every event committed after this returns.

        It also hears nothing committed before: notifications already on their way
        when it registers (committed, not yet read here) are not for it. So the
        registration starts inactive and NOTIFYs a marker of its own on the channel
        (one round trip); the marker commits before this returns, and arrives after
        every notification committed before it (commit order), so the listener
        becomes active when the marker arrives, before any later event's
        notification. (A reconnect in between activates it with on_gap.)
        """
        await self._wait_ready()
        subscription = PgSubscription(self, run_id, listener, active=False)
        token = uuid.uuid4().hex
        self._marks[token] = subscription
        self._runs.setdefault(run_id, _Run()).listeners[subscription] = None
        try:
            await self._notify("s" + f"{len(token)}:{token}")
        except BaseException:
            self.remove(subscription)
            self._marks.pop(token, None)
            raise
        return subscription

    async def subscribe_control(self, run_id: str, listener: ControlListener) -> PgSubscription:
        await self._wait_ready()
        subscription = PgSubscription(self, run_id, listener)
        self._runs.setdefault(run_id, _Run()).controls[subscription] = None
        return subscription

    def remove(self, subscription: PgSubscription) -> None:
        run = self._runs.get(subscription.run_id)
        if run is None:
            return
        run.listeners.pop(subscription, None)
        run.controls.pop(subscription, None)
        if not run.listeners and not run.controls and not run.backlog:
            del self._runs[subscription.run_id]

    async def _wait_ready(self) -> None:
        if self._closed:
            raise StoreUnavailable("the PostgreSQL event log is closed")
        if self._ready.is_set():
            return
        try:
            async with asyncio.timeout(self._connect_timeout_s * 2):
                await self._ready.wait()
        except TimeoutError:
            raise StoreUnavailable("PostgreSQL LISTEN connection unavailable") from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ready.clear()
        if self._task is not None:
            await background.stop(self._task, within_s=5.0)
        for task in tuple(self._drains):
            await background.stop(task, within_s=1.0)
        await self._disconnect()
        self._runs.clear()

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(
            self._conninfo,
            autocommit=True,
            connect_timeout=max(1, round(self._connect_timeout_s)),
            **self._connect_kwargs,
        )
        try:
            await conn.execute(sql.LISTEN.format(channel=quote_ident(self.channel)))
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _run(self) -> None:
        backoff = _BACKOFF_MIN_S
        owed_gap = False
        while not self._closed:
            try:
                self._conn = await self._connect()
            except (psycopg.Error, TimeoutError, OSError) as error:
                if not self._first.done():
                    self._first.set_exception(
                        StoreUnavailable(f"PostgreSQL unreachable (LISTEN): {error}")
                    )
                    return
                logger.warning("PostgreSQL LISTEN reconnect failed: %s", error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                continue
            backoff = _BACKOFF_MIN_S
            self._ready.set()
            if not self._first.done():
                self._first.set_result(None)
            if owed_gap:
                self._gap_all()
            try:
                await self._read(self._conn)
            except (psycopg.Error, TimeoutError, OSError) as error:
                if self._closed:
                    return
                logger.warning("PostgreSQL LISTEN connection lost: %s", error)
            self._ready.clear()
            owed_gap = True
            await self._disconnect()

    async def _read(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            received = False
            async for notify in conn.notifies(timeout=self._health_s):
                received = True
                if notify.channel == self.channel:
                    try:
                        self._dispatch(notify.payload)
                    except Exception:
                        # One bad notification must not end the reader (and every stream).
                        logger.exception("bad notification on %s", self.channel)
            if not received:  # quiet: check the connection answers
                async with asyncio.timeout(self._health_s):
                    await conn.execute(sql.PING)

    def _gap_all(self) -> None:
        """Every event listener may have missed notifications: tell each once."""
        self._marks.clear()
        for run in tuple(self._runs.values()):
            run.backlog.clear()
            for subscription in tuple(run.listeners):
                subscription.active = True
                try:
                    cast(Listener, subscription.listener).on_gap()
                except Exception:
                    logger.exception("listener failed in on_gap")

    def _dispatch(self, payload: str) -> None:
        kind = payload[:1]
        colon = payload.find(":", 1)
        if colon < 0:
            logger.warning("malformed notification on %s", self.channel)
            return
        size = int(payload[1:colon])
        run_id = payload[colon + 1 : colon + 1 + size]
        if kind == "s":  # a subscription's marker (the "run id" is its token)
            marked = self._marks.pop(run_id, None)
            if marked is not None:
                marked.active = True
            return
        run = self._runs.get(run_id)
        if run is None:
            return  # nobody here listens to this run
        rest = payload[colon + 1 + size :]
        if kind == "c":
            for subscription in tuple(run.controls):
                try:
                    cast(ControlListener, subscription.listener).on_cancel(rest)
                except Exception:
                    logger.exception("control listener of run %s failed", run_id)
            return
        listeners = tuple(cast(Listener, s.listener) for s in run.listeners if s.active)
        if not listeners:
            return
        item: Batch | tuple[int, int]
        if kind == "e":
            try:
                data = base64.b64decode(rest)
                item = Batch(EventBatch.FromString(data).events, data)
            except (binascii.Error, DecodeError):
                logger.exception("undecodable notification of run %s", run_id)
                return
        elif kind == "d":
            first, _, count = rest.partition(":")
            item = (int(first), int(count))
        else:
            return
        if not run.backlog and isinstance(item, Batch):
            _deliver(run_id, listeners, item)
            return
        run.backlog.append((listeners, item))
        if not run.draining:
            run.draining = True
            task = asyncio.create_task(self._drain(run_id, run))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)

    async def _drain(self, run_id: str, run: _Run) -> None:
        """Deliver a run's held-back notifications in order, reading doorbells' events."""
        try:
            while run.backlog:
                listeners, item = run.backlog[0]
                if isinstance(item, tuple):
                    first, count = item
                    try:
                        events = await self._read_events(run_id, first, count)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        logger.warning("could not read run %s's events for a doorbell", run_id)
                        events = None
                    if run.backlog and run.backlog[0][1] is item:
                        run.backlog.popleft()
                        if events is None:
                            _gap(run_id, listeners)
                        else:
                            _deliver(run_id, listeners, Batch(events))
                else:
                    run.backlog.popleft()
                    _deliver(run_id, listeners, item)
        finally:
            run.draining = False
            if not run.listeners and not run.controls and not run.backlog:
                self._runs.pop(run_id, None)

    async def _read_events(self, run_id: str, first: int, count: int) -> list[AgentEvent]:
        events: list[AgentEvent] = []
        while len(events) < count:
            page = await self._fetch(run_id, first + len(events), count - len(events))
            if not page:
                raise LookupError(f"run {run_id} has no events at {first + len(events)}")
            events.extend(page)
        return events


def _deliver(run_id: str, listeners: tuple[Listener, ...], batch: Batch) -> None:
    for listener in listeners:
        try:
            listener.on_events(batch)
        except Exception:
            # The append has committed; one broken listener must not starve others.
            logger.exception("listener of run %s failed", run_id)


def _gap(run_id: str, listeners: tuple[Listener, ...]) -> None:
    for listener in listeners:
        try:
            listener.on_gap()
        except Exception:
            logger.exception("listener of run %s failed in on_gap", run_id)
