"""How a server process runs its event loop: uvloop, and a garbage collector tuned for it.

The event loop: uvloop (libuv) by default, the standard asyncio loop with
event_loop="asyncio". Every callback, timer and socket operation of the
server goes through it, so its per-operation cost is paid per event and per
run.

The collector: by the time the server starts serving, the process holds a
few hundred thousand long-lived objects (modules, pydantic schemas, protobuf
descriptors) that never become garbage, yet every full collection walks them
all. gc.freeze() moves them out of the collector's sight, and a larger
first-generation threshold makes the collections of a busy server fewer and
cheaper; reference cycles are still collected (a server cannot run with the
collector off: asyncio and pydantic-ai make cycles as they go).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any, Literal

EventLoop = Literal["uvloop", "asyncio"]

# What `serve` prints on stdout once it listens, followed by host:port; scripts and
# tests wait for it (the parent of `serve --workers` prints it once all its workers listen).
LISTENING = "keel listening on "
# Printed before LISTENING when the server also serves its HTTP port (--http-port).
HTTP_LISTENING = "keel http listening on "

# Allocations (minus deallocations) between two first-generation collections:
# the default is 700; each collection of a busy server's young objects then
# finds little to free.
GC_GEN0_THRESHOLD = 10_000


def settle_heap() -> None:
    """Collect what start-up left behind, then exclude the survivors from later collections."""
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def loop_factory(kind: EventLoop) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, None], event_loop: EventLoop) -> None:
    """Run `main` to completion on a new loop of the `event_loop` kind, its heap settled first."""
    settle_heap()
    with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:
        runner.run(main)
