"""examples/python/demo.py (what scripts/demo runs) proves its invariant against a real server.

The TypeScript and Go demos have tests of their own
(clients/typescript/test/example.test.ts, test_client_go.py).
"""

from __future__ import annotations

import asyncio
import sys

from tests.processes import ROOT, start_keel_process

DEMO_TIMEOUT_S = 90


async def test_python_demo_resumes_a_dropped_stream_with_every_event_once(
    redis_url: str, key_prefix: str
) -> None:
    keel = await start_keel_process(redis_url=redis_url, key_prefix=key_prefix)
    try:
        demo = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "examples" / "python" / "demo.py"),
            keel.target,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(demo.communicate(), DEMO_TIMEOUT_S)
        finally:
            if demo.returncode is None:
                demo.kill()
                await demo.wait()
        text = output.decode()
        assert demo.returncode == 0, text
        assert "-- resumed at offset 30" in text
        assert "-- OK: every event exactly once" in text
    finally:
        keel.kill()
        await keel.wait()
