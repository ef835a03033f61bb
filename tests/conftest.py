"""Fixtures shared by every test: a real Redis, unique key prefixes, and EventLogs of both kinds.

The Redis is Debian's redis-server started once per session on a free port,
without persistence. Tests isolate themselves with a fresh key prefix and
never flush. Set KEEL_TEST_REDIS_URL to use a Redis you started yourself.

Time: a memory log runs on `log_clock`, whose `advance` jumps at once; for
Redis it waits for the time to pass. So a lease or TTL test is instant on
memory and honest on Redis.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest
import redis

from server.events.log import EventLog
from server.events.memory import MemoryEventLog
from server.events.postgres import PostgresEventLog
from server.events.redis import RedisEventLog

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_ping(url: str, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    client = redis.Redis.from_url(url, socket_timeout=1)
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False  # exited, e.g. the port was taken meanwhile
            try:
                if client.ping():
                    return True
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.02)
        return False
    finally:
        client.close()


def _start_redis(
    workdir: Path, port: int = 0, persistence: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server without persistence (unless `persistence` gives its options, e.g.
    "--appendonly", "yes") on `port` (or a free one), answering PING."""
    for _attempt in range(3):  # the free port may be taken before redis binds it
        port = port or _free_port()
        # fmt: off
        process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", str(port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--dir", str(workdir),
                *persistence,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # fmt: on
        url = f"redis://127.0.0.1:{port}/0"
        if _wait_for_ping(url, process):
            return process, url
        _stop_redis(process)
    pytest.fail("could not start redis-server")


def _stop_redis(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a real Redis for this test session."""
    external = os.environ.get("KEEL_TEST_REDIS_URL")
    if external:
        yield external
        return
    process, url = _start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield url
    finally:
        _stop_redis(process)


_EXIT_STATUS = pytest.StashKey[int]()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """A process that used a temporalio client may abort at interpreter exit (its Rust
    runtime's threads outlive the interpreter; temporalio/sdk-python#300): once
    pytest is done, leave with its exit status without the interpreter's teardown."""
    if "temporalio.client" in sys.modules and _EXIT_STATUS in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[_EXIT_STATUS])


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL (redis+cluster://) of a real 3-master Redis Cluster for this test session
    (tests/redis_cluster.py). Set KEEL_TEST_REDIS_CLUSTER_URL to use one you started."""
    external = os.environ.get("KEEL_TEST_REDIS_CLUSTER_URL")
    if external:
        yield external
        return
    from tests.redis_cluster import start_redis_cluster

    cluster = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of a real PostgreSQL 15 for this test session (tests/postgres.py). Set
    KEEL_TEST_POSTGRES_URL to use one you started."""
    external = os.environ.get("KEEL_TEST_POSTGRES_URL")
    if external:
        yield external
        return
    from tests.postgres import start_postgres

    server = start_postgres()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def temporal_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a Temporal dev server for this test session (tests/temporal.py)."""
    from tests.temporal import start_temporal

    server = start_temporal(tmp_path_factory.mktemp("temporal"))
    try:
        yield server.address
    finally:
        server.stop()


@dataclass
class DisposableRedis:
    """A Redis of one test's own, which the test may stop (to play an outage)."""

    url: str
    process: subprocess.Popen[bytes]
    workdir: Path
    persistence: Sequence[str] = ()

    def stop(self) -> None:
        _stop_redis(self.process)

    def kill(self) -> None:
        """SIGKILL: the crash (what it wrote to its files stays)."""
        self.process.kill()
        self.process.wait()

    def restart(self) -> None:
        """Start it again on the same port and files (empty without persistence)."""
        port = int(self.url.rsplit(":", 1)[1].split("/")[0])
        self.process, _ = _start_redis(self.workdir, port, self.persistence)


@pytest.fixture
def disposable_redis(tmp_path: Path) -> Iterator[DisposableRedis]:
    process, url = _start_redis(tmp_path)
    redis_server = DisposableRedis(url, process, tmp_path)
    try:
        yield redis_server
    finally:
        _stop_redis(redis_server.process)


@pytest.fixture
def key_prefix() -> str:
    """A key prefix of this test alone, so tests share one Redis without flushing."""
    return f"test-{uuid.uuid4().hex[:12]}"


def redis_url_of(request: pytest.FixtureRequest, backend: str) -> str:
    """The Redis URL of a backend ("" for memory): "cluster" is the session's Redis Cluster,
    any other but memory the session's Redis."""
    if backend == "memory":
        return ""
    return str(
        request.getfixturevalue("redis_cluster_url" if backend == "cluster" else "redis_url")
    )


class OpenEventLog(Protocol):
    """Opens an EventLog of the test's backend; the fixture closes it at the end."""

    async def __call__(
        self,
        *,
        terminal_ttl_s: float = ...,
        retain_events: int = ...,
        lease_ttl_s: float = ...,
        thread_idle_ttl_s: float = ...,
    ) -> EventLog: ...


class LogClock:
    """The time the test's EventLogs see: real monotonic time plus the jumps of `advance`."""

    def __init__(self, *, jumps: bool) -> None:
        self._jumps = jumps
        self._skew_s = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self._skew_s

    async def advance(self, seconds: float) -> None:
        """Let `seconds` pass for the logs: a jump on memory, a wait on Redis (its own clock)."""
        if self._jumps:
            self._skew_s += seconds
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(seconds)


@pytest.fixture(params=["memory", "redis", "cluster", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    """The EventLog implementation under test: memory, Redis on one server or on a
    3-master Redis Cluster, or PostgreSQL (tests/postgres.py)."""
    name: str = request.param
    return name


@pytest.fixture
def log_clock(backend: str) -> LogClock:
    """Jumps on memory; waits for real time on Redis (one server or a cluster) and
    PostgreSQL (the database's clock)."""
    return LogClock(jumps=backend == "memory")


@pytest.fixture
async def open_event_log(
    request: pytest.FixtureRequest, backend: str, key_prefix: str, log_clock: LogClock
) -> AsyncIterator[OpenEventLog]:
    """Opens EventLogs of one backend with chosen retention and lease settings."""
    postgres = str(request.getfixturevalue("postgres_url")) if backend == "postgres" else ""
    url = "" if postgres else redis_url_of(request, backend)
    opened: list[EventLog] = []

    async def open_log(
        *,
        terminal_ttl_s: float = 86_400,
        retain_events: int = 0,
        lease_ttl_s: float = 5.0,
        thread_idle_ttl_s: float = 0,
    ) -> EventLog:
        log: EventLog
        if postgres:
            log = await PostgresEventLog.connect(
                postgres,
                key_prefix=key_prefix,
                terminal_ttl_s=terminal_ttl_s,
                retain_events=retain_events,
                lease_ttl_s=lease_ttl_s,
                thread_idle_ttl_s=thread_idle_ttl_s,
            )
        elif url:
            log = await RedisEventLog.connect(
                url,
                key_prefix=key_prefix,
                terminal_ttl_s=terminal_ttl_s,
                retain_events=retain_events,
                lease_ttl_s=lease_ttl_s,
                thread_idle_ttl_s=thread_idle_ttl_s,
            )
        else:
            log = MemoryEventLog(
                terminal_ttl_s=terminal_ttl_s,
                retain_events=retain_events,
                lease_ttl_s=lease_ttl_s,
                thread_idle_ttl_s=thread_idle_ttl_s,
                clock=log_clock,
            )
        opened.append(log)
        return log

    yield open_log
    for log in opened:
        await log.close()


@pytest.fixture
async def event_log(open_event_log: OpenEventLog) -> EventLog:
    """A fresh EventLog of each backend (memory, redis) with default settings."""
    return await open_event_log()
