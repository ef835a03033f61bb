"""Keel servers as real subprocesses, for restart and crash tests."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from server.process import HTTP_LISTENING, LISTENING

ROOT = Path(__file__).resolve().parent.parent
_DEMO_TIMEOUT_S = 90


@dataclass
class KeelProcess:
    """One `python -m server serve` process; `port` is known once it is listening."""

    process: asyncio.subprocess.Process
    port: int
    http_port: int | None = None  # with --http-port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def terminate(self) -> None:
        """SIGTERM: the graceful shutdown."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the crash."""
        if self.process.returncode is None:
            self.process.kill()

    async def wait(self, timeout_s: float = 30.0) -> int:
        return await asyncio.wait_for(self.process.wait(), timeout_s)


def is_postgres(url: str) -> bool:
    """Whether a store URL names PostgreSQL (start_keel_process passes it as --postgres-url)."""
    return url.startswith(("postgresql://", "postgres://"))


async def start_keel_process(
    *,
    redis_url: str,
    key_prefix: str,
    port: int = 0,
    env: dict[str, str] | None = None,
    agents: str = "server.agents.testing:registry",
    args: Sequence[str] = (),
    ready_timeout_s: float = 30.0,
) -> KeelProcess:
    """Start a server (with the flags `args` added) and wait until it listens; its log goes
    to this process's stderr. A server that does not get there is killed. `redis_url` may
    name PostgreSQL instead (is_postgres)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "serve",
        "--port",
        str(port),
        *(("--postgres-url", redis_url) if is_postgres(redis_url) else ("--redis-url", redis_url)),
        "--key-prefix",
        key_prefix,
        "--agents",
        agents,
        *args,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    http_port = None
    try:
        async with asyncio.timeout(ready_timeout_s):
            while True:
                line = (await process.stdout.readline()).decode()
                if not line:
                    code = await process.wait()
                    raise RuntimeError(f"keel exited before listening (code {code})")
                if line.startswith(HTTP_LISTENING):
                    http_port = int(line.rsplit(":", 1)[1])
                if line.startswith(LISTENING):
                    return KeelProcess(process, int(line.rsplit(":", 1)[1]), http_port)
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise


async def assert_demo_resumes(*command: str, redis_url: str, key_prefix: str) -> None:
    """Run an example client against a fresh server: it must drop, resume at 30 and see it all.

    Every language's demo prints the same two lines (examples/README.md).
    """
    keel = await start_keel_process(redis_url=redis_url, key_prefix=key_prefix)
    try:
        demo = await asyncio.create_subprocess_exec(
            *command,
            keel.target,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(demo.communicate(), _DEMO_TIMEOUT_S)
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
