"""Stopping a background asyncio task, even one that swallows a cancellation.

A task cancelled while it is inside redis-py, or while its own timeout
fires, can lose the cancellation and go on (seen: a watcher that went on
polling, a pub/sub reader that went on reading, and the close() waiting for
each of them for ever). So stop() cancels again every 0.1 s until the task
is done; the task's own loop should also check a closed flag, so it ends at
its next turn whatever happens to the cancellations.
"""

from __future__ import annotations

import asyncio
from typing import Any

_RECANCEL_S = 0.1


async def stop(task: asyncio.Task[Any], *, within_s: float | None = None) -> bool:
    """Cancel `task` and wait until it is done, cancelling it again while it goes on;
    give up after `within_s` (None: never). True once it is done. The task's own
    CancelledError ends here, unless the caller is being cancelled too."""
    task.cancel()
    loop = asyncio.get_running_loop()
    deadline = None if within_s is None else loop.time() + within_s
    while not task.done() and (deadline is None or loop.time() < deadline):
        await asyncio.wait({task}, timeout=_RECANCEL_S)
        task.cancel()
    if not task.done():
        return False
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # our caller is being cancelled too: not ours to swallow
    return True
