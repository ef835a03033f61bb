"""A real Redis Cluster for tests: the benchmark's launcher (bench/procs.py, RedisCluster).

Three masters and no replicas by default, on free ports, joined by redis-cli;
each node keeps nothing on disk but its cluster config file, under the
workdir given. `url` is what Keel takes: redis+cluster://HOST:PORT of the
first node.
"""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from bench.procs import CLUSTER_MASTERS
from bench.procs import RedisCluster as RedisClusterProcesses

__all__ = ["RedisClusterProcesses", "async_client", "start_redis_cluster"]


def async_client(url: str) -> aioredis.Redis | RedisCluster:
    """A plain asyncio client of a Keel Redis URL: one Redis, or a cluster (redis+cluster://)."""
    if url.startswith("redis+cluster://"):
        return RedisCluster.from_url(url.replace("redis+cluster://", "redis://", 1))
    return aioredis.from_url(url)


def start_redis_cluster(workdir: Path, masters: int = CLUSTER_MASTERS) -> RedisClusterProcesses:
    """Start `masters` cluster-enabled redis-servers and make them one cluster; its
    stop() ends them all (the files stay in `workdir`)."""
    return RedisClusterProcesses.start(workdir, masters)
