"""Keel chat: three turns of a conversation on one thread, each run seeing the turns before it.

    python examples/python/chat.py [TARGET]

TARGET (or $KEEL_TARGET) is the server's host:port, 127.0.0.1:50051 by
default; the server must run the `scripted` test agent
(`python -m server serve --agents server.agents.testing:registry`).
Each turn asks the scripted agent to say how many earlier user prompts its
run started with ("history=N "), prints the reply as it streams, and at the
end the thread's messages. Exits 1 unless turn N's reply says history=N-1:
the third turn saw the first two.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import grpc
from keel.v1 import agent_service_pb2 as pb
from keel_client import KeelClient

TURN = json.dumps({"steps": [{"echo_history": True}, {"text": 3, "delay_ms": 20}]})
TURNS = 3
TIMEOUT_S = 60.0
MAX_RECONNECTS = 5  # an example should fail fast when no server answers


def describe(part: pb.MessagePart) -> str:
    """One part of a thread's message, in a few words."""
    kind = part.WhichOneof("part")
    if kind == "user_prompt":
        return f"user_prompt {part.user_prompt.text}"
    if kind == "text":
        return f"text {part.text.text!r}"
    if kind == "tool_call":
        return f"tool_call {part.tool_call.tool_name}({part.tool_call.args_json})"
    if kind == "tool_result":
        return f"tool_result {part.tool_result.tool_name} -> {part.tool_result.result_json}"
    return kind or "?"


async def chat(target: str) -> int:
    async with KeelClient(target, max_reconnects=MAX_RECONNECTS) as client:
        thread = await client.create_thread(resource_id="chat-example")
        print(f"-- thread {thread.thread_id}")

        # 1. Three turns: each run starts with the thread's messages so far.
        replies: list[str] = []
        turn_of: dict[str, int] = {}  # run id -> turn number
        for turn in range(1, TURNS + 1):
            print(f"turn {turn}> ", end="", flush=True)
            handle = client.send(thread.thread_id, "scripted", TURN)
            reply = ""
            async for event in handle.events():
                if event.WhichOneof("payload") == "text_delta":
                    print(event.text_delta.delta, end="", flush=True)
                    reply += event.text_delta.delta
            print()
            replies.append(reply)
            turn_of[handle.run_id or ""] = turn

        # 2. The thread's history: each run's request and response, oldest first.
        print("-- the thread's messages")
        async for message in client.thread_messages(thread.thread_id):
            kind = pb.MessageKind.Name(message.kind).removeprefix("MESSAGE_KIND_")
            parts = "; ".join(describe(part) for part in message.parts)
            turn = turn_of.get(message.run_id, 0)
            print(f"[{message.index}] turn {turn} {kind}: {parts}")

    # 3. Prove each turn saw the ones before it.
    failed = False
    for turn, reply in enumerate(replies, start=1):
        want = f"history={turn - 1} "
        if not reply.startswith(want):
            print(f"FAILED: turn {turn} replied {reply!r}, expected {want!r}", file=sys.stderr)
            failed = True
    if not failed:
        print(f"-- OK: turn {TURNS} saw the {TURNS - 1} turns before it (history={TURNS - 1})")
    return 1 if failed else 0


async def main(target: str) -> int:
    try:
        async with asyncio.timeout(TIMEOUT_S):
            return await chat(target)
    except grpc.aio.AioRpcError as error:
        print(f"\nerror: {target}: {error.code().name}: {error.details()}", file=sys.stderr)
    except TimeoutError:
        print(f"\nerror: the chat took more than {TIMEOUT_S:.0f} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("KEEL_TARGET", "127.0.0.1:50051")
    sys.exit(asyncio.run(main(target)))
