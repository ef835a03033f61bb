"""Workload g's client: background tasks under a global limit (runs in its own process).

`runs` runs with until_idle each make `tasks // runs` background tasks of the
scripted agent's `slow` tool (`duration_ms` each), in parallel tool calls of
at most 10, on a server whose KEEL_TASKS_GLOBAL_CONCURRENCY is `limit`. The
runs' TaskUpdate events carry the time of each change as the store saw it
(TaskUpdate.time), from which:

- concurrency: the most attempts running at once, and the mean while any
  ran (busy time);
- start latency after a slot frees: the i-th start beyond the first `limit`
  is paired with the (i - limit)-th end, FIFO (a freed slot goes to the
  oldest waiting task), and the gap between the two is that task's wait for
  its slot once one was free;
- throughput: the ideal time (tasks x duration / limit) over the actual
  time from the first start to the last end.

Checks (`ok`): every run finishes, every task completes exactly once, no
more than `limit` ran at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import grpc
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from bench.stats import percentile

Params = dict[str, Any]
PARALLEL = 10  # tool calls per model response (the scripted agent allows 16)


def _script(run: int, tasks: int, duration_ms: int) -> str:
    calls = [
        {"tool": "slow", "args": {"key": f"r{run}t{n}", "duration_ms": duration_ms}}
        for n in range(tasks)
    ]
    steps = [{"parallel": calls[i : i + PARALLEL]} for i in range(0, tasks, PARALLEL)]
    return json.dumps({"steps": steps})


async def _run(stub: Any, script: str) -> tuple[list[pb.TaskUpdate], str]:
    updates: list[pb.TaskUpdate] = []
    last = ""
    request = pb.StreamRequest(agent_id="scripted", input=script, until_idle=True)
    async for response in stub.Stream(request):
        if response.WhichOneof("kind") != "events":
            continue
        for event in response.events.events:
            last = event.WhichOneof("payload") or ""
            if last == "task":
                updates.append(event.task)
    return updates, last


async def tasks(params: Params) -> Params:
    runs, total = int(params["runs"]), int(params["tasks"])
    duration_ms, limit = int(params["duration_ms"]), int(params["limit"])
    per_run = total // runs
    async with grpc.aio.insecure_channel(params["target"]) as channel:
        await channel.channel_ready()
        stub = pb_grpc.AgentServiceStub(channel)
        start = time.perf_counter()
        outcomes = await asyncio.gather(
            *(_run(stub, _script(run, per_run, duration_ms)) for run in range(runs))
        )
        wall_s = time.perf_counter() - start
    updates = [u for run_updates, _ in outcomes for u in run_updates]
    starts = sorted(u.time.ToNanoseconds() for u in updates if u.status == pb.TASK_STATUS_STARTED)
    ends = sorted(u.time.ToNanoseconds() for u in updates if u.status == pb.TASK_STATUS_COMPLETED)
    completed = {u.task_id for u in updates if u.status == pb.TASK_STATUS_COMPLETED}

    running = peak = 0
    busy_ns = area = 0.0
    previous = None
    for at, change in sorted([(t, +1) for t in starts] + [(t, -1) for t in ends]):
        if previous is not None and running:
            busy_ns += at - previous
            area += running * (at - previous)
        running += change
        peak = max(peak, running)
        previous = at
    waits_ms = [
        max(0, starts[i] - ends[i - limit]) / 1e6 for i in range(limit, min(len(starts), total))
    ]
    actual_s = (ends[-1] - starts[0]) / 1e9 if starts and ends else float("nan")
    ideal_s = total * duration_ms / 1000 / limit
    errors = []
    if any(last != "finish" for _, last in outcomes):
        errors.append("a run did not finish")
    if len(completed) != total or len(ends) != total:
        errors.append(f"{len(completed)} of {total} tasks completed ({len(ends)} completions)")
    if peak > limit:
        errors.append(f"{peak} tasks ran at once; the limit is {limit}")
    return {
        "ok": not errors,
        "errors": errors,
        "runs": runs,
        "tasks": total,
        "task_ms": duration_ms,
        "limit": limit,
        "peak_concurrency": peak,
        "mean_concurrency": area / busy_ns if busy_ns else float("nan"),
        "start_after_free_p50_ms": percentile(waits_ms, 50),
        "start_after_free_p99_ms": percentile(waits_ms, 99),
        "actual_s": actual_s,
        "ideal_s": ideal_s,
        "throughput_share": ideal_s / actual_s if actual_s else float("nan"),
        "wall_s": wall_s,
    }
