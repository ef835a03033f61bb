"""Calls made in the same event-loop turn travel to Redis together.

Every run has its own writer and its own lease, so a busy process makes
many small appends (and lease renewals, creates, claims) at once; each would
pay a round trip and redis-py's per-call work. A batcher collects the calls
made until the loop's next turn and sends them in one go. Each caller still
gets its own reply (or its own error), and a connection error fails every
call sent with it, as it would have failed them one by one.

TurnBatcher is that mechanism; what one batch becomes on the wire is its
subclasses' part:

- ScriptBatcher: calls of one Lua script, in one non-transactional
  pipeline (a lone call is sent as it is). The pipeline carries plain
  EVALSHAs: redis-py's script objects would ask SCRIPT EXISTS first, a round
  trip per pipeline. A call that finds the script missing (Redis restarted
  or flushed its scripts) is sent again on its own, which loads the script.
- ScoreBatcher: scores for one sorted set, in one ZADD; two scores of one
  member in one turn keep the lower (for deadlines: too early is harmless,
  too late is not).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Generic, TypeVar, cast

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from server.events.redis_client import RedisClient

C = TypeVar("C")


class TurnBatcher(Generic[C]):
    """Sends the calls made in one event-loop turn together (see the module docstring)."""

    def __init__(self) -> None:
        self._pending: list[tuple[C, asyncio.Future[Any]]] = []
        self._inflight: set[asyncio.Task[None]] = set()  # keeps the sending tasks referenced

    async def _submit(self, call: C) -> Any:
        """Queue `call` for this turn's batch; its reply, or its error."""
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._send)  # after every call of this turn has queued
        self._pending.append((call, reply))
        return await reply

    async def _send_all(self, calls: Sequence[C]) -> list[Any]:
        """Send one batch: a reply per call, or an Exception instance for a call that
        failed alone; raise for a failure of the whole batch."""
        raise NotImplementedError

    def _send(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.create_task(self._run(batch))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _run(self, batch: list[tuple[C, asyncio.Future[Any]]]) -> None:
        try:
            replies = await self._send_all([call for call, _ in batch])
        except Exception as exc:
            for _, reply in batch:
                if not reply.done():
                    reply.set_exception(exc)
            return
        for (_, reply), result in zip(batch, replies, strict=True):
            if reply.done():
                continue  # its caller was cancelled; the command ran all the same
            if isinstance(result, Exception):
                reply.set_exception(result)
            else:
                reply.set_result(result)


_ScriptCall = tuple[list[Any], list[Any]]  # keys, args


def queue_evalsha(
    pipe: Pipeline | ClusterPipeline, sha: str, keys: list[Any], args: list[Any]
) -> None:
    """Queue a script call on a pipeline of one Redis or of a cluster. Not pipe.evalsha,
    which a cluster's pipeline refuses by name; the command itself goes to its first
    key's node like any other."""
    pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)


class ScriptBatcher(TurnBatcher[_ScriptCall]):
    """Runs `script` for many callers with one pipeline per event-loop turn."""

    def __init__(self, client: RedisClient, script: AsyncScript) -> None:
        super().__init__()
        self._client = client
        self._script = script

    async def __call__(self, *, keys: list[Any], args: list[Any]) -> Any:
        return await self._submit((keys, args))

    async def _send_all(self, calls: Sequence[_ScriptCall]) -> list[Any]:
        if len(calls) == 1:
            keys, args = calls[0]
            return [await self._script(keys=keys, args=args)]
        sha = self._script.sha
        async with self._client.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                queue_evalsha(pipe, sha, keys, args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        for i, result in enumerate(replies):
            if isinstance(result, NoScriptError):
                keys, args = calls[i]
                replies[i] = await self._script(keys=keys, args=args)
        return replies


class ScoreBatcher(TurnBatcher[tuple[str, int]]):
    """Sets the scores of one sorted set for many callers with one ZADD per event-loop turn."""

    def __init__(self, client: RedisClient, key: str) -> None:
        super().__init__()
        self._client = client
        self._key = key

    async def record(self, member: str, score: int) -> None:
        await self._submit((member, score))

    async def _send_all(self, calls: Sequence[tuple[str, int]]) -> list[Any]:
        scores: dict[str, int] = {}
        for member, score in calls:
            scores[member] = min(score, scores.get(member, score))
        await self._client.zadd(self._key, cast(dict[Any, Any], scores))
        return [None] * len(calls)
