"""A client process: `python -m bench.child NAME PARAMS_JSON` runs one client, prints its result.

The result is one JSON line on stdout (the last line; the runner reads it).
A client run with `"barrier": true` first prints `ready` once it is connected
and warmed up, and waits for a `go` line on stdin (runner.py starts several
such processes and lets them go at once).
Clients live in keel_load.py (Keel's workloads) and ceilings.py (raw gRPC,
Redis and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from bench import ceilings, keel_load, tasks_load

Client = Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]

CLIENTS: dict[str, Client] = {
    "stream_one": keel_load.stream_one,
    "stream_many": keel_load.stream_many,
    "fanout": keel_load.fanout,
    "replay": keel_load.replay,
    "rejoin": keel_load.rejoin,
    "overhead": keel_load.overhead,
    "live_runs": keel_load.live_runs,
    "short_runs": keel_load.short_runs,
    "tasks": tasks_load.tasks,
    "grpc_stream": ceilings.grpc_stream,
    "grpc_fanout": ceilings.grpc_fanout,
    "redis": ceilings.redis,
    "postgres": ceilings.postgres,
}


def main(argv: list[str]) -> None:
    name, params = argv[0], json.loads(argv[1])
    result = asyncio.run(CLIENTS[name](params))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
