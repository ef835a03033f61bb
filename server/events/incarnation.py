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
incarnation and sends the append again. No server ever loads a script for an
incarnation other than the one it just read from that node, so a script
naming an old incarnation is never found by a new one.

(A SCRIPT FLUSH also empties the cache: the run_id read again is the same,
and nothing changes.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from server.events import scripts
from server.events.batcher import TurnBatcher
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

    def __init__(self, client: RedisClient, incarnations: Incarnations) -> None:
        super().__init__()
        self._client = client
        self._incarnations = incarnations

    async def __call__(self, *, keys: list[Any], args: list[Any]) -> Any:
        return await self._submit((keys, args))

    async def _script_of(self, node: str) -> AsyncScript:
        return self._incarnations.script(node) or await self._incarnations.refresh(node)

    async def _send_all(self, calls: Sequence[_Call]) -> list[Any]:
        nodes = [self._incarnations.node_of(keys[0]) for keys, _ in calls]
        shas = [(await self._script_of(node)).sha for node in nodes]
        async with self._client.pipeline(transaction=False) as pipe:
            for (keys, args), sha in zip(calls, shas, strict=True):
                # Not pipe.evalsha, which a cluster's pipeline refuses by name; the
                # command itself goes to its first key's node like any other.
                pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        for i, result in enumerate(replies):
            if isinstance(result, NoScriptError):
                keys, args = calls[i]
                # A new incarnation (or a flush): read it, then load its script and send.
                script = await self._incarnations.refresh(nodes[i])
                replies[i] = await script(keys=keys, args=args)
        return replies
