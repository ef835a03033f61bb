"""One Redis pub/sub connection per process (per node on Redis Cluster), fanned out to
local listeners.

Pub/sub is a doorbell and the events ZSET is the record: a listener that is
told on_gap re-reads the log. The first listener of a channel subscribes it,
later ones share it, the last one to close unsubscribes it. A channel's kind
(ChannelKind, fixed when it is first subscribed) says what its messages are:
EventBatches for Listeners, or the raw reasons of cancel requests for
ControlListeners.

On the connection (RESP3, redis-py's default, or RESP2) we send SUBSCRIBE,
UNSUBSCRIBE and PING, and read the pushes ["subscribe", channel, n],
["unsubscribe", channel, n] and ["message", channel, data], and PING's reply
(PONG, or ["pong", ""] in RESP2). A sharded Fanout (one node of a Redis
Cluster, shards.py) speaks sharded pub/sub instead: SSUBSCRIBE (one channel
per command: a command's channels must share a slot), SUNSUBSCRIBE, and the
pushes "ssubscribe", "sunsubscribe" and "smessage". The node sends an
"sunsubscribe" nobody asked for when the channel's slot moved to another
node; the channel is then not ready, its listeners are owed on_gap, and
`on_trouble` tells the owner (shards.py), which moves it to the slot's new
node. `on_trouble` is also told after every failed connection attempt: the
node may be gone for good (a failover).
Replies about one channel arrive in the order its commands were sent, so a
FIFO per channel pairs each reply with its command: an acknowledgement of an
earlier, since closed, registration never marks a newer one ready.

A reader task owns the connection:
1. connect, and SUBSCRIBE every channel that has listeners;
2. read replies and dispatch them; PING after a quiet health-check interval
   and give the connection up if the PING gets no reply either;
3. on any failure, mark every subscribed channel not ready, remembering its
   listeners, reconnect with capped exponential backoff and go to 1; when a
   channel's new SUBSCRIBE is acknowledged its remembered listeners get
   on_gap (only then, so a re-read they start cannot miss a later event).
   Control listeners get nothing: the run's record keeps a cancel request,
   so a lost message costs latency, not the request.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from google.protobuf.message import DecodeError
from keel.v1.agent_service_pb2 import EventBatch
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server import background
from server.errors import StoreUnavailable
from server.events.codec import Batch
from server.events.log import ControlListener, Listener

logger = logging.getLogger(__name__)
_CLOSE_WAIT_S = 5.0  # close() stops waiting for the reader after this long


@dataclass(frozen=True, slots=True)
class _Words:
    """The commands and pushes of one kind of pub/sub."""

    subscribe: str
    unsubscribe: str
    message: bytes
    acks: tuple[bytes, bytes]
    one_per_command: bool  # a command's channels must share a slot


_CLASSIC = _Words("SUBSCRIBE", "UNSUBSCRIBE", b"message", (b"subscribe", b"unsubscribe"), False)
_SHARDED = _Words("SSUBSCRIBE", "SUNSUBSCRIBE", b"smessage", (b"ssubscribe", b"sunsubscribe"), True)


class ChannelKind(enum.Enum):
    """What a channel's messages are, and so which listeners it has."""

    EVENTS = "events"  # serialized EventBatches, for Listeners (on_gap after a reconnect)
    CONTROL = "control"  # a cancel request's reason (UTF-8), for ControlListeners


class _Channel:
    """The local registrations for one channel."""

    __slots__ = ("gap", "kind", "name", "ready", "sent_generation", "subscriptions")

    def __init__(self, name: bytes, kind: ChannelKind) -> None:
        self.name = name
        self.kind = kind  # every listener of the channel has the type this kind implies
        self.subscriptions: dict[FanoutSubscription, None] = {}  # a dict keeps order, O(1) removal
        # Done once Redis acknowledged this channel's SUBSCRIBE on the current connection.
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Listeners to tell on_gap when the SUBSCRIBE after a reconnect is acknowledged.
        self.gap: dict[FanoutSubscription, None] = {}
        # The connection generation this channel's SUBSCRIBE was sent on.
        self.sent_generation = -1


class FanoutSubscription:
    """One listener's registration; close() is safe to call more than once."""

    __slots__ = ("_closed", "_fanout", "channel", "listener")

    def __init__(
        self, fanout: Fanout, channel: _Channel, listener: Listener | ControlListener
    ) -> None:
        self._fanout = fanout
        self._closed = False
        self.channel = channel
        self.listener = listener

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._fanout._remove(self)


class Fanout:
    """Shares one pub/sub connection between every listener of this process."""

    def __init__(
        self,
        make_connection: Callable[[], AbstractConnection],
        *,
        subscribe_timeout_s: float = 10.0,
        health_check_interval_s: float = 10.0,
        reconnect_min_s: float = 0.05,
        reconnect_max_s: float = 2.0,
        sharded: bool = False,
        on_trouble: Callable[[Fanout], None] | None = None,
    ) -> None:
        self._make_connection = make_connection
        self._words = _SHARDED if sharded else _CLASSIC
        self._on_trouble = on_trouble
        self._subscribe_timeout_s = subscribe_timeout_s
        self._health_check_interval_s = health_check_interval_s
        self._reconnect_min_s = reconnect_min_s
        self._reconnect_max_s = reconnect_max_s
        self._channels: dict[bytes, _Channel] = {}
        # Per channel, what each unanswered (UN)SUBSCRIBE was sent for: the
        # channel registration for SUBSCRIBE, None for UNSUBSCRIBE.
        self._pending: dict[bytes, deque[_Channel | None]] = {}
        self._conn: AbstractConnection | None = None
        self._connected = False  # the current connection is up and its SUBSCRIBEs sent
        self._generation = 0  # bumped on every (re)connection
        self._ping_outstanding = False
        self._write_lock = asyncio.Lock()  # one command at a time on the wire
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    async def subscribe(self, channel: str, listener: Listener) -> FanoutSubscription:
        """Register `listener` for a channel of EventBatches; see _register."""
        return await self._register(channel, ChannelKind.EVENTS, listener)

    async def subscribe_control(
        self, channel: str, listener: ControlListener
    ) -> FanoutSubscription:
        """Register `listener` for a channel of cancel reasons; see _register."""
        return await self._register(channel, ChannelKind.CONTROL, listener)

    async def close(self) -> None:
        """Stop the reader and drop the connection; safe to call more than once."""
        self._closed = True
        reader, self._reader = self._reader, None
        if reader is not None and not await background.stop(reader, within_s=_CLOSE_WAIT_S):
            logger.warning("pub/sub reader did not stop within %.0fs; leaving it", _CLOSE_WAIT_S)
        for entry in self._channels.values():
            if not entry.ready.done():
                entry.ready.set_exception(StoreUnavailable("the event log is closed"))
                entry.ready.exception()  # retrieved: no "never retrieved" warning without waiters
        self._channels.clear()
        self._pending.clear()

    # --- registrations -------------------------------------------------------

    async def _register(
        self, channel: str, kind: ChannelKind, listener: Listener | ControlListener
    ) -> FanoutSubscription:
        """Register `listener`; returns once Redis acknowledged the channel's SUBSCRIBE.

        Raises StoreUnavailable if no acknowledgement comes within the
        subscribe timeout. A subscribe cancelled while it waits may leave
        Redis subscribed to an unused channel until the next reconnect; its
        messages are dropped.
        """
        if self._closed:
            raise StoreUnavailable("the event log is closed")
        name = channel.encode()
        entry = self._channels.get(name)
        if entry is None:
            entry = self._channels[name] = _Channel(name, kind)
        elif entry.kind is not kind:
            raise ValueError(f"channel {channel} carries {entry.kind.value}, not {kind.value}")
        subscription = FanoutSubscription(self, entry, listener)
        entry.subscriptions[subscription] = None
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(
                self._run(), name="keel-pubsub-reader"
            )
        try:
            await self._send_subscribe(entry)
            # The future of this connection's SUBSCRIBE; a reconnect may replace
            # entry.ready once it is done, never while it is pending.
            ready = entry.ready
            if not ready.done():
                # shield: the future is shared by every listener of the channel.
                await asyncio.wait_for(asyncio.shield(ready), self._subscribe_timeout_s)
            ready.result()  # raises StoreUnavailable if the log was closed meanwhile
        except TimeoutError:
            await subscription.close()
            raise StoreUnavailable(f"no acknowledgement of SUBSCRIBE {channel}") from None
        except BaseException:
            self._detach(subscription)
            raise
        return subscription

    def _detach(self, subscription: FanoutSubscription) -> _Channel | None:
        """Forget a registration; returns its channel if that was the channel's last listener."""
        entry = subscription.channel
        entry.subscriptions.pop(subscription, None)
        entry.gap.pop(subscription, None)
        if entry.subscriptions or self._channels.get(entry.name) is not entry:
            return None
        del self._channels[entry.name]
        return entry

    async def _remove(self, subscription: FanoutSubscription) -> None:
        entry = self._detach(subscription)
        if entry is None:
            return
        async with self._write_lock:
            if not self._connected or entry.sent_generation != self._generation:
                return  # Redis is not subscribed on this connection
            self._pending.setdefault(entry.name, deque()).append(None)
            await self._send(self._words.unsubscribe, entry.name)

    async def _send_subscribe(self, entry: _Channel) -> None:
        async with self._write_lock:
            if (
                not self._connected
                or entry.sent_generation == self._generation
                or self._channels.get(entry.name) is not entry
            ):
                return  # the reader subscribes it on (re)connection, or it is sent already
            entry.sent_generation = self._generation
            self._pending.setdefault(entry.name, deque()).append(entry)
            await self._send(self._words.subscribe, entry.name)

    async def _send(self, *args: str | bytes) -> None:
        """Send a command while holding the write lock; failures are the reader's to handle."""
        conn = self._conn
        assert conn is not None
        if not conn.is_connected:
            # A failed send disconnected it: the reader will notice and start
            # over (and send_command would reconnect it behind the reader's back).
            return
        try:
            await conn.send_command(*args, check_health=False)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            # The failed send closed the connection, so the reader's read fails
            # and it reconnects and re-subscribes every channel.
            logger.debug("pub/sub send failed (%s: %s)", type(exc).__name__, exc)

    # --- the reader ----------------------------------------------------------

    async def _run(self) -> None:
        delay_s = self._reconnect_min_s
        # The flag, not only the cancellation, ends the reader: a cancellation that lands
        # as a read times out can be taken for the timeout (Python 3.11's asyncio.timeout),
        # and the reader would read on, with close() waiting for it forever.
        while not self._closed:
            conn = self._make_connection()
            self._conn = conn
            try:
                await conn.connect()  # type: ignore[no-untyped-call]
                await self._subscribe_all()
                delay_s = self._reconnect_min_s
                await self._read_forever(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Any failure means the connection can no longer be trusted.
                logger.warning(
                    "pub/sub connection lost (%s: %s); reconnecting in %.2fs",
                    type(exc).__name__,
                    exc,
                    delay_s,
                )
                if self._on_trouble is not None:
                    self._on_trouble(self)
            finally:
                # Under the lock, so no sender is mid-command on the connection
                # being torn down, and none sends on it afterwards.
                async with self._write_lock:
                    self._on_disconnect()
                    await conn.disconnect(nowait=True)
            if not self._closed:
                await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, self._reconnect_max_s)

    async def _subscribe_all(self) -> None:
        async with self._write_lock:
            self._generation += 1
            self._connected = True
            self._ping_outstanding = False
            names = list(self._channels)
            for entry in self._channels.values():
                entry.sent_generation = self._generation
                self._pending.setdefault(entry.name, deque()).append(entry)
            if names:
                assert self._conn is not None
                # Not self._send: a failure here must reach _run.
                if self._words.one_per_command:
                    for name in names:
                        await self._conn.send_command(
                            self._words.subscribe, name, check_health=False
                        )
                else:
                    await self._conn.send_command(self._words.subscribe, *names, check_health=False)

    async def _read_forever(self, conn: AbstractConnection) -> None:
        while not self._closed:
            # push_request: return pub/sub pushes instead of handing them to the parser's handler.
            reply = await conn.read_response(
                timeout=self._health_check_interval_s, disconnect_on_error=False, push_request=True
            )
            if reply is None:  # quiet for a whole interval: is anyone there?
                if self._ping_outstanding:
                    raise RedisTimeoutError("pub/sub connection did not answer PING")
                self._ping_outstanding = True
                async with self._write_lock:
                    if not conn.is_connected:  # a failed send closed it
                        raise RedisConnectionError("pub/sub connection closed")
                    await conn.send_command("PING", check_health=False)
                continue
            self._ping_outstanding = False
            self._dispatch(reply)

    def _on_disconnect(self) -> None:
        self._connected = False
        self._pending.clear()  # those replies will never come
        for entry in self._channels.values():
            if entry.ready.done():
                # Listeners that were live may have missed messages; new ones wait.
                entry.ready = asyncio.get_running_loop().create_future()
                if entry.kind is ChannelKind.EVENTS:
                    entry.gap.update(entry.subscriptions)

    def _dispatch(self, reply: object) -> None:
        if not isinstance(reply, list) or len(reply) < 2:
            return  # PING's reply
        kind = reply[0]
        if kind == self._words.message:
            self._on_message(reply[1], reply[2])
        elif kind in self._words.acks:
            self._on_ack(reply[1], kind)

    def _on_ack(self, name: bytes, kind: bytes) -> None:
        queue = self._pending.get(name)
        if not queue:
            if kind == b"sunsubscribe":
                self._on_slot_moved(name)
                return
            logger.warning("unexpected pub/sub acknowledgement for %r", name)
            return
        entry = queue.popleft()
        if not queue:
            del self._pending[name]
        if entry is None:
            return  # an UNSUBSCRIBE
        if not entry.ready.done():
            entry.ready.set_result(None)
        if entry.gap:
            gapped = [s for s in entry.gap if s in entry.subscriptions]
            entry.gap.clear()
            for subscription in gapped:
                try:
                    cast(Listener, subscription.listener).on_gap()
                except Exception:
                    logger.exception("pub/sub listener failed in on_gap")

    def _on_slot_moved(self, name: bytes) -> None:
        """The node dropped a sharded channel by itself: its slot moved elsewhere."""
        entry = self._channels.get(name)
        if entry is None:
            return
        logger.info("the slot of %r moved off this node", name)
        entry.sent_generation = -1  # not subscribed here any more
        if entry.ready.done():
            entry.ready = asyncio.get_running_loop().create_future()
            if entry.kind is ChannelKind.EVENTS:
                entry.gap.update(entry.subscriptions)
        if self._on_trouble is not None:
            self._on_trouble(self)

    def channels(self) -> list[bytes]:
        """The channels that have listeners here."""
        return list(self._channels)

    def dropped(self) -> list[bytes]:
        """The channels the node dropped by itself (their slot moved) that are not
        subscribed again on this connection."""
        if not self._connected:
            return []  # a reconnection subscribes every channel anyway
        return [name for name, entry in self._channels.items() if entry.sent_generation == -1]

    async def resubscribe(self, name: bytes) -> None:
        """Subscribe a dropped channel again here (its slot came back, or never left)."""
        entry = self._channels.get(name)
        if entry is not None:
            await self._send_subscribe(entry)

    def take(self, name: bytes) -> tuple[ChannelKind, list[Listener | ControlListener]]:
        """Forget a channel without unsubscribing it (its slot moved, or its node is gone):
        its kind and its established listeners, which the caller registers elsewhere (the
        listeners of events are owed on_gap: they may have missed messages). Their
        subscriptions here become inert; registrations still waiting for an
        acknowledgement fail with StoreUnavailable, and their callers retry."""
        entry = self._channels.pop(name, None)
        if entry is None:
            return ChannelKind.EVENTS, []
        self._pending.pop(name, None)
        established = [s for s in entry.subscriptions if entry.ready.done() or s in entry.gap]
        for subscription in established:
            subscription._closed = True
        if not entry.ready.done():
            entry.ready.set_exception(StoreUnavailable(f"channel {name!r} moved"))
            entry.ready.exception()  # retrieved: no "never retrieved" warning without waiters
        return entry.kind, [s.listener for s in established]

    def _on_message(self, name: bytes, data: bytes) -> None:
        entry = self._channels.get(name)
        if entry is None:
            return  # unsubscribed meanwhile
        if entry.kind is ChannelKind.CONTROL:
            self._on_control(entry, data)
            return
        try:
            events = Batch(EventBatch.FromString(data).events, data)
        except DecodeError:
            logger.exception("undecodable message on %r", name)
            return
        # A copy: a listener may close its subscription while being notified.
        for subscription in tuple(entry.subscriptions):
            try:
                cast(Listener, subscription.listener).on_events(events)
            except Exception:
                # One broken listener must not stop the reader or starve the others.
                logger.exception("pub/sub listener failed in on_events")

    @staticmethod
    def _on_control(entry: _Channel, data: bytes) -> None:
        reason = data.decode(errors="replace")
        for subscription in tuple(entry.subscriptions):
            try:
                cast(ControlListener, subscription.listener).on_cancel(reason)
            except Exception:
                logger.exception("pub/sub listener failed in on_cancel")
