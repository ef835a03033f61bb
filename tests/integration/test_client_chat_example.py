"""examples/python/chat.py holds a three-turn conversation on a thread of a real server."""

from __future__ import annotations

import asyncio
import re
import socket
import sys

from tests.processes import ROOT, start_keel_process

CHAT = str(ROOT / "examples" / "python" / "chat.py")
TIMEOUT_S = 90


async def run_chat(target: str) -> tuple[int, str]:
    """Run the example against `target`: its exit code and its output (stdout and stderr)."""
    chat = await asyncio.create_subprocess_exec(
        sys.executable,
        CHAT,
        target,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(chat.communicate(), TIMEOUT_S)
    finally:
        if chat.returncode is None:
            chat.kill()
            await chat.wait()
    assert chat.returncode is not None
    return chat.returncode, output.decode()


async def test_python_chat_example_sees_the_earlier_turns(redis_url: str, key_prefix: str) -> None:
    keel = await start_keel_process(redis_url=redis_url, key_prefix=key_prefix)
    try:
        code, output = await run_chat(keel.target)
    finally:
        keel.kill()
        await keel.wait()

    assert code == 0, output
    lines = output.splitlines()
    assert re.fullmatch(r"-- thread \S+", lines[0]), output
    assert lines[1:4] == [f"turn {n + 1}> history={n} t0 t1 t2 done" for n in range(3)], output
    assert lines[4] == "-- the thread's messages"
    messages = lines[5:11]
    for index, line in enumerate(messages):
        turn, kind = index // 2 + 1, ("REQUEST", "RESPONSE")[index % 2]
        assert line.startswith(f"[{index}] turn {turn} {kind}: "), output
    assert "user_prompt" in messages[0] and "echo_history" in messages[0]
    assert messages[5].endswith("text 'history=2 t0 t1 t2 done'"), output
    assert lines[11:] == ["-- OK: turn 3 saw the 2 turns before it (history=2)"], output


async def test_python_chat_example_fails_without_a_server() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        code, output = await run_chat(f"127.0.0.1:{port}")

    assert code == 1, output
    assert "error: " in output and "UNAVAILABLE" in output
