"""Sharded pub/sub on Redis Cluster: a Fanout per node, each channel on its slot's node.

A run's channels carry its hash tag, so the SPUBLISH in its scripts runs on
the node that owns the run's slot, and only that node's subscribers hear it
(classic PUBLISH is broadcast to every node of a cluster, so its cost grows
with the cluster). This process keeps one sharded pub/sub connection per node
it has listeners on: a Fanout each (fanout.py), made when the node's first
channel is subscribed.

Moves: when a node drops a channel by itself (its slot migrated) or a node's
connection fails (it may have been failed over), the slot map is read again
and every channel of that node now owned by another node moves there: its
listeners are registered on that node's Fanout and, once it acknowledged,
the listeners of events get on_gap, so they re-read the log and miss nothing.
A channel whose node merely blinked stays, and its Fanout reconnects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from server.errors import StoreUnavailable
from server.events.fanout import ChannelKind, Fanout, FanoutSubscription
from server.events.log import ControlListener, Listener

logger = logging.getLogger(__name__)
_ROUTE_ATTEMPTS = 3  # a registration that finds its channel moving is routed again
# A node that dropped a channel before the slot map names the slot's new node: the map is
# read again this many times (backing off), then the channel is subscribed there again.
_MAP_ATTEMPTS = 12


class ShardSubscription:
    """One listener's registration; it follows its channel from node to node."""

    __slots__ = ("_closed", "_owner", "channel", "inner", "listener")

    def __init__(
        self,
        owner: ShardedFanout,
        channel: bytes,
        listener: Listener | ControlListener,
        inner: FanoutSubscription,
    ) -> None:
        self._owner = owner
        self._closed = False
        self.channel = channel
        self.listener = listener
        self.inner = inner  # its registration on the node that has the channel now

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._owner._forget(self)
        await self.inner.close()


class ShardedFanout:
    """Fans the sharded channels of a Redis Cluster out to this process's listeners."""

    def __init__(
        self,
        client: RedisCluster,
        make_connection: Callable[[ClusterNode], AbstractConnection],
        *,
        subscribe_timeout_s: float = 10.0,
        health_check_interval_s: float = 10.0,
    ) -> None:
        self._client = client
        self._make_connection = make_connection
        self._subscribe_timeout_s = subscribe_timeout_s
        self._health_check_interval_s = health_check_interval_s
        self._nodes: dict[str, Fanout] = {}  # node name -> its Fanout
        self._subscriptions: dict[bytes, dict[ShardSubscription, None]] = {}
        self._troubled: set[Fanout] = set()  # nodes whose channels must be looked at
        self._mover: asyncio.Task[None] | None = None
        self._closed = False

    async def subscribe(self, channel: str, listener: Listener) -> ShardSubscription:
        """Register `listener` for a channel of EventBatches (Fanout.subscribe)."""
        return await self._register(channel.encode(), ChannelKind.EVENTS, listener)

    async def subscribe_control(self, channel: str, listener: ControlListener) -> ShardSubscription:
        """Register `listener` for a channel of cancel reasons (Fanout.subscribe_control)."""
        return await self._register(channel.encode(), ChannelKind.CONTROL, listener)

    def node_count(self) -> int:
        """How many nodes this process holds a sharded connection to."""
        return len(self._nodes)

    async def close(self) -> None:
        self._closed = True
        mover, self._mover = self._mover, None
        if mover is not None:
            mover.cancel()
            await asyncio.gather(mover, return_exceptions=True)
        nodes = list(self._nodes.values())
        self._nodes.clear()
        self._subscriptions.clear()
        for fanout in nodes:
            await fanout.close()

    async def _register(
        self, name: bytes, kind: ChannelKind, listener: Listener | ControlListener
    ) -> ShardSubscription:
        for attempt in range(_ROUTE_ATTEMPTS):
            fanout = self._fanout_of(name)
            try:
                inner = await self._on_node(fanout, name, kind, listener)
            except StoreUnavailable:
                # Its node may be gone, or the channel moved while we waited.
                if attempt == _ROUTE_ATTEMPTS - 1 or self._closed:
                    raise
                await self._refresh()
                continue
            subscription = ShardSubscription(self, name, listener, inner)
            self._subscriptions.setdefault(name, {})[subscription] = None
            return subscription
        raise AssertionError("unreachable")

    @staticmethod
    async def _on_node(
        fanout: Fanout, name: bytes, kind: ChannelKind, listener: Listener | ControlListener
    ) -> FanoutSubscription:
        if kind is ChannelKind.CONTROL:
            return await fanout.subscribe_control(name.decode(), cast(ControlListener, listener))
        return await fanout.subscribe(name.decode(), cast(Listener, listener))

    def _fanout_of(self, name: bytes) -> Fanout:
        """The Fanout of the node that owns `name`'s slot (made if need be)."""
        if self._closed:
            raise StoreUnavailable("the event log is closed")
        try:
            node = self._client.get_node_from_key(name.decode())
        except RedisError as exc:
            raise StoreUnavailable(f"no node serves channel {name!r}: {exc}") from exc
        assert node is not None
        fanout = self._nodes.get(node.name)
        if fanout is None:
            fanout = self._nodes[node.name] = Fanout(
                lambda: self._make_connection(node),
                subscribe_timeout_s=self._subscribe_timeout_s,
                health_check_interval_s=self._health_check_interval_s,
                sharded=True,
                on_trouble=self._on_trouble,
            )
        return fanout

    def _forget(self, subscription: ShardSubscription) -> None:
        registered = self._subscriptions.get(subscription.channel)
        if registered is not None:
            registered.pop(subscription, None)
            if not registered:
                del self._subscriptions[subscription.channel]

    # --- moves ---------------------------------------------------------------

    def _on_trouble(self, fanout: Fanout) -> None:
        if self._closed:
            return
        self._troubled.add(fanout)
        if self._mover is None or self._mover.done():
            self._mover = asyncio.get_running_loop().create_task(
                self._move_troubled(), name="keel-shard-mover"
            )

    async def _refresh(self) -> None:
        """Read the cluster's slot map again."""
        try:
            await self._client.nodes_manager.initialize()
        except RedisError as exc:
            logger.warning("could not read the cluster's slots (%s)", exc)

    async def _move_troubled(self) -> None:
        attempts, delay_s = 0, 0.05
        while self._troubled and not self._closed:
            troubled, self._troubled = self._troubled, set()
            await self._refresh()
            for fanout in troubled:
                moved = False
                for name in fanout.channels():
                    if self._fanout_of(name) is not fanout:
                        await self._move(fanout, name)
                        moved = True
                # Dropped by the node, yet still its own by the map: the map lags (the
                # other nodes learn of a migration one after another).
                lagging = [name for name in fanout.dropped() if self._fanout_of(name) is fanout]
                if lagging and attempts < _MAP_ATTEMPTS:
                    self._troubled.add(fanout)
                else:
                    for name in lagging:
                        await fanout.resubscribe(name)
                if moved and not fanout.channels():
                    # Its node serves none of our channels now (maybe it is gone for
                    # good): stop reconnecting to it. A later channel of that node
                    # makes a new Fanout.
                    for node, held in list(self._nodes.items()):
                        if held is fanout:
                            del self._nodes[node]
                    await fanout.close()
            if self._troubled:
                attempts += 1
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 1.0)

    async def _move(self, old: Fanout, name: bytes) -> None:
        kind, listeners = old.take(name)
        moving = {id(s.listener): s for s in self._subscriptions.get(name, {})}
        logger.info("channel %r moves to another node (%d listeners)", name, len(listeners))
        for listener in listeners:
            subscription = moving.get(id(listener))
            if subscription is None:
                continue  # closed meanwhile
            subscription.inner = await self._re_register(name, kind, listener)
            if subscription._closed:
                await subscription.inner.close()
            elif kind is ChannelKind.EVENTS:
                try:
                    cast(Listener, listener).on_gap()
                except Exception:
                    logger.exception("pub/sub listener failed in on_gap")

    async def _re_register(
        self, name: bytes, kind: ChannelKind, listener: Listener | ControlListener
    ) -> FanoutSubscription:
        """Register a moving listener on its channel's node, however long that takes: the
        new node may still be taking over its slots."""
        delay_s = 0.1
        while True:
            try:
                return await self._on_node(self._fanout_of(name), name, kind, listener)
            except StoreUnavailable as exc:
                if self._closed:
                    raise
                logger.warning("could not move %r yet (%s)", name, exc)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 2.0)
            await self._refresh()
