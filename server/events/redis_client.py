"""The connection to Redis: one Redis server, or a Redis Cluster.

The URL picks it: `redis://HOST:PORT/DB` (or `rediss://`) is one Redis;
`redis+cluster://HOST:PORT` (or `rediss+cluster://`) is a Redis Cluster,
found from that one node (the others are discovered from its slot map).

What differs on a cluster, and only here:
- The client is redis-py's RedisCluster: each command goes to the node that
  owns its key's slot (following MOVED and ASK), a pipeline is split per node.
  Every Lua script touches the keys of one hash tag (keys.py), so it runs on
  one node.
- Notifications use sharded pub/sub: the scripts SPUBLISH (not PUBLISH,
  which a cluster broadcasts to every node) and this process holds one
  SSUBSCRIBE connection per node (shards.py). One Redis keeps classic
  pub/sub, so Redis 6.2 still serves it.
- Neither retries a command after a connection error (a retried increment
  could count twice); the cluster client still follows redirections.
- The cluster's connections are `max_connections` per node, and a command
  that finds them all busy fails at once (StoreUnavailable) where one Redis
  waits up to the socket timeout for one.
"""

from __future__ import annotations

from typing import TypeAlias

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from server.events.fanout import Fanout
from server.events.shards import ShardedFanout
from server.events.urls import is_cluster_url, node_url

RedisClient: TypeAlias = Redis | RedisCluster
AnyFanout: TypeAlias = Fanout | ShardedFanout


def register(client: RedisClient, text: str) -> AsyncScript:
    """A Lua script of Keel's on this client. On a cluster its PUBLISHes become SPUBLISHes:
    each script publishes only on channels of its own keys' hash tag, so the channel is
    in the slot the script runs on."""
    if isinstance(client, RedisCluster):
        text = text.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
    return client.register_script(text)


def open_client(
    url: str,
    *,
    max_connections: int,
    socket_timeout_s: float,
    health_check_interval_s: float,
    pubsub_client_name: str,
) -> tuple[RedisClient, AnyFanout]:
    """A client for `url` and the pub/sub fan-out beside it; neither has connected yet."""
    timeouts = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_timeout_s,
        "retry": Retry(NoBackoff(), 0),
    }
    if is_cluster_url(url):
        cluster = RedisCluster.from_url(
            node_url(url),
            max_connections=max_connections,
            **timeouts,
        )

        def make_node_connection(node: ClusterNode) -> AbstractConnection:
            kwargs = {**node.connection_kwargs, "client_name": pubsub_client_name}
            return node.connection_class(**kwargs)

        sharded = ShardedFanout(
            cluster,
            make_node_connection,
            subscribe_timeout_s=socket_timeout_s,
            health_check_interval_s=health_check_interval_s,
        )
        return cluster, sharded

    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=socket_timeout_s, **timeouts
    )

    def make_pubsub_connection() -> AbstractConnection:
        kwargs = {**pool.connection_kwargs, "client_name": pubsub_client_name}
        return pool.connection_class(**kwargs)

    fanout = Fanout(
        make_pubsub_connection,
        subscribe_timeout_s=socket_timeout_s,
        health_check_interval_s=health_check_interval_s,
    )
    return Redis.from_pool(pool), fanout
