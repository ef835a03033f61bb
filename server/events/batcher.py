"""Calls of one Lua script made in the same event-loop turn travel as one pipeline.

Every run has its own writer, so a busy process makes many small appends at
once; each would pay a round trip and redis-py's per-call work. The batcher
collects the calls made until the loop's next turn and sends them in one
non-transactional pipeline. Each caller still gets its own reply (or its own
error), and a connection error fails every call of that pipeline, as it
would have failed them one by one. A lone call is sent as it is.

The pipeline carries plain EVALSHAs: redis-py's script objects would ask
SCRIPT EXISTS first, a round trip per pipeline. A call that finds the script
missing (Redis restarted or flushed its scripts) is sent again on its own,
which loads the script.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

_Call = tuple[list[Any], list[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    """Runs `script` for many callers with one pipeline per event-loop turn."""

    def __init__(self, client: Redis, script: AsyncScript) -> None:
        self._client = client
        self._script = script
        self._pending: list[_Call] = []
        self._inflight: set[asyncio.Task[None]] = set()  # keeps the sending tasks referenced

    async def __call__(self, *, keys: list[Any], args: list[Any]) -> Any:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._send)  # after every call of this turn has queued
        self._pending.append((keys, args, reply))
        return await reply

    def _send(self) -> None:
        calls, self._pending = self._pending, []
        task = asyncio.create_task(self._run(calls))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _run(self, calls: list[_Call]) -> None:
        try:
            if len(calls) == 1:
                keys, args, _ = calls[0]
                replies: list[Any] = [await self._script(keys=keys, args=args)]
            else:
                sha = self._script.sha
                async with self._client.pipeline(transaction=False) as pipe:
                    for keys, args, _ in calls:
                        pipe.evalsha(sha, len(keys), *keys, *args)
                    replies = await pipe.execute(raise_on_error=False)
                for i, result in enumerate(replies):
                    if isinstance(result, NoScriptError):
                        keys, args, _ = calls[i]
                        replies[i] = await self._script(keys=keys, args=args)
        except Exception as exc:
            for _, _, reply in calls:
                if not reply.done():
                    reply.set_exception(exc)
            return
        for (_, _, reply), result in zip(calls, replies, strict=True):
            if reply.done():
                continue  # its caller was cancelled; the command ran all the same
            if isinstance(result, Exception):
                reply.set_exception(result)
            else:
                reply.set_result(result)
