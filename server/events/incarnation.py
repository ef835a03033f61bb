"""The store's incarnation: which life of a redis-server wrote a run's events.

Redis draws a random run_id each time a redis-server process starts, so a
restart (from whatever files it finds: a complete AOF, an older snapshot,
nothing) and a failover to a replica each bring a new run_id. Keel takes it
as the store's incarnation, per node on a cluster, and the APPEND script
records in each run's lineage where each incarnation's events start
(lineage.py), so a log that went back is detected rather than silently
written again.

The stamp must never be stale: a server that has not noticed a restart yet
must not stamp the old incarnation on events the new one holds. So the
incarnation is part of the APPEND script's text, and so of its SHA: a new
redis-server process starts with no scripts, and the first APPEND a server
sends after the restart finds its script missing (NOSCRIPT). The server then
reads the node's run_id again before it loads the script for that
incarnation and sends the append again. A server only loads scripts naming
an incarnation it has just read (on a cluster, redis-py loads a script on
every node: one naming another node's incarnation is never asked for
there), so a script naming an old incarnation is never found by a new one.

(A SCRIPT FLUSH also empties the cache: the run_id read again is the same,
and nothing changes.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from server.errors import StoreUnavailable
from server.events import scripts
from server.events.batcher import TurnBatcher, queue_evalsha
from server.events.redis_client import RedisClient, register

_Call = tuple[list[Any], list[Any]]  # keys, args


class Incarnations:
    """The run_id of each node this process writes runs to, and the APPEND script for it."""

    def __init__(self, client: RedisClient) -> None:
        self._client = client
        self._of_node: dict[str, str] = {}  # node name ("" for one Redis) -> its run_id
        self._scripts: dict[str, AsyncScript] = {}  # run_id -> APPEND for it

    def node_of(self, key: str) -> str:
        """The name of the node that holds `key` ("" for one Redis)."""
        if isinstance(self._client, RedisCluster):
            node = self._client.get_node_from_key(key)
            return node.name if node is not None else ""
        return ""

    def script(self, node: str) -> AsyncScript | None:
        """The APPEND script for what this process believes `node`'s incarnation is."""
        incarnation = self._of_node.get(node)
        return None if incarnation is None else self._scripts[incarnation]

    async def refresh(self, node: str) -> AsyncScript:
        """Read `node`'s run_id (INFO server); the APPEND script for it."""
        if isinstance(self._client, RedisCluster):
            target = self._client.get_node(node_name=node)
            info = await self._client.info("server", target_nodes=target)
        else:
            info = await self._client.info("server")
        incarnation = str(info["run_id"])
        self._of_node[node] = incarnation
        if incarnation not in self._scripts:
            self._scripts[incarnation] = register(self._client, scripts.append_script(incarnation))
        return self._scripts[incarnation]


class AppendBatcher(TurnBatcher[_Call]):
    """APPEND for many callers, one pipeline per event-loop turn (like batcher.py's
    ScriptBatcher), each call with the script of its node's incarnation; a call that
    finds its script missing reads the incarnation again first (see the module doc)."""

    def __init__(
        self,
        client: RedisClient,
        incarnations: Incarnations,
        *,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        super().__init__()
        self._client = client
        self._incarnations = incarnations
        if wait_replicas and isinstance(client, RedisCluster):
            raise ValueError("waiting for replicas needs a single Redis, not a cluster")
        self._wait_replicas = wait_replicas
        self._wait_timeout_ms = wait_timeout_ms

    async def __call__(self, *, keys: list[Any], args: list[Any]) -> Any:
        return await self._submit((keys, args))

    async def _script_of(self, node: str) -> AsyncScript:
        return self._incarnations.script(node) or await self._incarnations.refresh(node)

    async def _send_all(self, calls: Sequence[_Call]) -> list[Any]:
        nodes = [self._incarnations.node_of(keys[0]) for keys, _ in calls]
        scripts_ = [await self._script_of(node) for node in nodes]
        replies = await self._pipeline(calls, scripts_)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            # A new incarnation (or a flush): read it, load its script, send those again.
            for node in {nodes[i] for i in missing}:
                script = await self._incarnations.refresh(node)
                await self._client.script_load(script.script)
            again = await self._pipeline(
                [calls[i] for i in missing], [await self._script_of(nodes[i]) for i in missing]
            )
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _pipeline(self, calls: Sequence[_Call], scripts_: Sequence[AsyncScript]) -> list[Any]:
        """The calls' EVALSHAs in one pipeline, followed by WAIT if replicas must acknowledge."""
        async with self._client.pipeline(transaction=False) as pipe:
            for (keys, args), script in zip(calls, scripts_, strict=True):
                queue_evalsha(pipe, script.sha, keys, args)
            if self._wait_replicas:
                # WAIT covers every write sent before it on this connection.
                pipe.execute_command("WAIT", self._wait_replicas, self._wait_timeout_ms)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        if self._wait_replicas:
            self._check_acknowledged(replies.pop())
        return replies

    def _check_acknowledged(self, replicas: Any) -> None:
        """Fail the batch if fewer replicas than asked for acknowledged it in time: the
        writer tries it again (an exact replay of a committed batch changes nothing)."""
        if isinstance(replicas, Exception) or int(replicas) < self._wait_replicas:
            raise StoreUnavailable(
                f"{replicas} of {self._wait_replicas} replicas acknowledged the append "
                f"within {self._wait_timeout_ms} ms"
            )
