"""examples/python/demo.py (what scripts/demo runs) proves its invariant against a real server.

The TypeScript and Go demos have tests of their own
(clients/typescript/test/example.test.ts, test_client_go.py).
"""

from __future__ import annotations

import sys

from tests.processes import ROOT, assert_demo_resumes


async def test_python_demo_resumes_a_dropped_stream_with_every_event_once(
    redis_url: str, key_prefix: str
) -> None:
    await assert_demo_resumes(
        sys.executable,
        str(ROOT / "examples" / "python" / "demo.py"),
        redis_url=redis_url,
        key_prefix=key_prefix,
    )
