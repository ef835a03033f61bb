"""A real Redis Cluster for tests: redis-server processes on free ports, joined by redis-cli.

Three masters and no replicas by default; each node keeps nothing on disk but
its cluster config file. `url` is what Keel takes: redis+cluster://HOST:PORT
of the first node.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
READY_TIMEOUT_S = 30.0


def async_client(url: str) -> aioredis.Redis | RedisCluster:
    """A plain asyncio client of a Keel Redis URL: one Redis, or a cluster (redis+cluster://)."""
    if url.startswith("redis+cluster://"):
        return RedisCluster.from_url(url.replace("redis+cluster://", "redis://", 1))
    return aioredis.from_url(url)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RedisClusterProcesses:
    """The nodes of a test cluster; stop() ends them all."""

    ports: list[int]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def node(self, port: int) -> redis.Redis:
        """A plain client of one node (the caller closes it)."""
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _ping(port: int, process: subprocess.Popen[bytes], deadline: float) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            try:
                if client.ping():
                    return True
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.02)
        return False
    finally:
        client.close()


def _cluster_ok(cluster: RedisClusterProcesses, deadline: float) -> bool:
    """Every node says cluster_state:ok and knows every node."""
    while time.monotonic() < deadline:
        ready = 0
        for port in cluster.ports:
            client = cluster.node(port)
            try:
                info = client.execute_command("CLUSTER", "INFO").decode()
                known = int(info.split("cluster_known_nodes:")[1].split()[0])
                if "cluster_state:ok" in info and known == len(cluster.ports):
                    ready += 1
            except (redis.RedisError, IndexError, ValueError):
                pass
            finally:
                client.close()
        if ready == len(cluster.ports):
            return True
        time.sleep(0.05)
    return False


def start_redis_cluster(workdir: Path, masters: int = 3) -> RedisClusterProcesses:
    """Start `masters` cluster-enabled redis-servers and make them one cluster."""
    for _attempt in range(3):  # a free port may be taken before redis binds it
        cluster = RedisClusterProcesses([_free_port() for _ in range(masters)])
        deadline = time.monotonic() + READY_TIMEOUT_S
        for port in cluster.ports:
            node_dir = workdir / f"node-{port}"
            node_dir.mkdir(parents=True, exist_ok=True)
            # fmt: off
            cluster.processes.append(subprocess.Popen(
                [
                    REDIS_SERVER,
                    "--port", str(port), "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", "2000",
                    "--save", "", "--appendonly", "no", "--daemonize", "no",
                    "--dir", str(node_dir),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ))
            # fmt: on
        if not all(
            _ping(port, process, deadline)
            for port, process in zip(cluster.ports, cluster.processes, strict=True)
        ):
            cluster.stop()
            continue
        created = subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in cluster.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=READY_TIMEOUT_S,
        )
        if created.returncode == 0 and _cluster_ok(cluster, deadline):
            return cluster
        cluster.stop()
        raise RuntimeError(f"could not make a Redis Cluster: {created.stdout!r} {created.stderr!r}")
    raise RuntimeError("could not start the Redis Cluster's nodes")
