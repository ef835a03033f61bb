"""Keel demo: stream a run, drop the connection mid-stream, resume it, prove nothing was lost.

    python examples/python/demo.py [TARGET]

TARGET (or $KEEL_TARGET) is the server's host:port, 127.0.0.1:50051 by
default; the server must run the `scripted` test agent
(`python -m server serve --agents server.agents.testing:registry`).
Exits 1 unless the events read before and after the drop are exactly
0, 1, ..., n-1, ending with the run's `finish`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys

import grpc
from keel.v1 import agent_service_pb2 as pb
from keel_client import KeelClient, Reconnect

SCRIPT = {
    "steps": [
        {"text": 40, "delay_ms": 20},
        {"tool": "record", "args": {"key": "demo"}},
        {"text": 40, "delay_ms": 20},
    ]
}
TEXT_DELTAS = 80  # the script's text steps together
DROP_AFTER_EVENTS = 30
TIMEOUT_S = 60.0
MAX_RECONNECTS = 5  # a demo should fail fast when no server answers


class Printer:
    """Prints text deltas as they stream and every other event as an [index kind] line."""

    def __init__(self) -> None:
        self.mid_line = False  # the last thing printed was text without a newline

    def text(self, text: str) -> None:
        print(text, end="", flush=True)
        self.mid_line = True

    def line(self, line: str) -> None:
        print(f"\n{line}" if self.mid_line else line, flush=True)
        self.mid_line = False

    def event(self, event: pb.AgentEvent) -> None:
        kind = event.WhichOneof("payload")
        if kind == "text_delta":
            self.text(event.text_delta.delta)
        elif kind == "tool_call":
            self.line(f"[{event.index} tool_call {event.tool_call.tool_name}]")
        elif kind == "tool_result":
            self.line(f"[{event.index} tool_result {event.tool_result.result_json}]")
        elif kind in ("start", "step_start", "step_finish", "finish", "error", "abort"):
            self.line(f"[{event.index} {kind}]")


PRINT = Printer()


def report_reconnect(reconnect: Reconnect) -> None:
    PRINT.line(f"-- stream lost ({reconnect.details}); resuming at offset {reconnect.offset}")


def mismatch(name: str, got: list[int], want: list[int]) -> str:
    """Where `got` first departs from `want`, in a line."""
    at = next((i for i, (g, w) in enumerate(zip(got, want, strict=False)) if g != w), None)
    if at is None:
        return f"{name}: {len(got)} values, expected {len(want)}"
    return f"{name}: position {at} holds {got[at]}, expected {want[at]} (a gap or a duplicate)"


def problems(events: list[pb.AgentEvent], run: pb.Run, resumed_at: int) -> list[str]:
    """Everything wrong with what the demo saw; empty when the invariant holds."""
    found = []
    indices = [event.index for event in events]
    if indices != list(range(len(events))):
        found.append(mismatch("indices", indices, list(range(len(events)))))
    if not events or events[-1].WhichOneof("payload") != "finish":
        found.append("the last event is not `finish`")
    if run.state != pb.RUN_STATE_SUCCEEDED or run.next_offset != len(events):
        state = pb.RunState.Name(run.state)
        found.append(f"the run is {state} with {run.next_offset} events, we saw {len(events)}")
    # The scripted agent numbers its text deltas "t0 ", "t1 ", ... across the whole run.
    deltas = [e.text_delta.delta for e in events if e.WhichOneof("payload") == "text_delta"]
    numbers = [int(d[1:]) for d in deltas if re.fullmatch(r"t\d+ ", d)]
    if numbers != list(range(TEXT_DELTAS)):
        found.append(mismatch("text deltas", numbers, list(range(TEXT_DELTAS))))
    tool_results = [e for e in events if e.WhichOneof("payload") == "tool_result"]
    if len(tool_results) != 1:
        found.append(f"expected one tool_result, saw {len(tool_results)}")
    if resumed_at != DROP_AFTER_EVENTS:
        found.append(f"resumed at offset {resumed_at}, expected {DROP_AFTER_EVENTS}")
    return found


async def demo(target: str) -> int:
    events: list[pb.AgentEvent] = []

    # 1. Start a run and read it until we deliberately drop the connection.
    async with KeelClient(target, max_reconnects=MAX_RECONNECTS) as first:
        handle = first.stream("scripted", json.dumps(SCRIPT), on_reconnect=report_reconnect)
        async with contextlib.aclosing(handle.events()) as stream:
            async for event in stream:
                events.append(event)
                PRINT.event(event)
                if len(events) == DROP_AFTER_EVENTS:
                    break
    # Leaving both `async with` blocks cancelled the call and closed the channel.
    run_id, resumed_at = handle.run_id, handle.next_offset
    if run_id is None:
        print("error: the stream ended before its snapshot named the run", file=sys.stderr)
        return 1
    PRINT.line(f"-- dropped the connection after {len(events)} events of run {run_id}")

    # 2. A new connection picks the run up where we left it.
    async with KeelClient(target, max_reconnects=MAX_RECONNECTS) as second:
        PRINT.line(f"-- resumed at offset {resumed_at}")
        rejoined = second.run(run_id, on_reconnect=report_reconnect)
        async for event in rejoined.events(from_offset=resumed_at):
            events.append(event)
            PRINT.event(event)
        run = await second.get_run(run_id)

    # 3. Prove nothing was lost or repeated across the drop.
    PRINT.line(f"-- {len(events)} events, indices 0..{len(events) - 1}")
    found = problems(events, run, resumed_at)
    for problem in found:
        print(f"FAILED: {problem}", file=sys.stderr)
    if not found:
        print("-- OK: every event exactly once, in order, across the dropped connection")
    return 1 if found else 0


async def main(target: str) -> int:
    try:
        async with asyncio.timeout(TIMEOUT_S):
            return await demo(target)
    except grpc.aio.AioRpcError as error:
        print(f"\nerror: {target}: {error.code().name}: {error.details()}", file=sys.stderr)
    except TimeoutError:
        print(f"\nerror: the demo took more than {TIMEOUT_S:.0f} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("KEEL_TARGET", "127.0.0.1:50051")
    sys.exit(asyncio.run(main(target)))
