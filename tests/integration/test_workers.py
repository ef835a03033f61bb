"""`serve --workers N`: N server processes on one port (server/workers.py), as real processes.

Each test starts a real parent (`python -m server serve --port 0 --workers 2`)
on the session's Redis and checks invariants it reads from /proc: the
parent's live children, and which worker holds each connection to the port
(its socket inodes against /proc/net/tcp). It waits for them with generous
deadlines and never asserts a timing: the machine may be small and loaded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx2
import pytest
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.app import LISTENING, ConfigurationError
from server.settings import Settings
from server.workers import WorkersError, check_workers, reserve_port, worker_values
from tests.integration.conftest import SCRIPTED, assert_contiguous, collect, payloads, script, text
from tests.processes import ROOT, KeelProcess, start_keel_process

pytestmark = pytest.mark.timeout(300)

READY_TIMEOUT_S = 120.0  # two workers each import the server on a loaded 2-core machine
DEADLINE_S = 90.0
CALL_TIMEOUT_S = 30.0
# A fresh connection per channel: channels to one target otherwise share one.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]

T = TypeVar("T")


async def until(check: Callable[[], T | None], what: str, timeout_s: float = DEADLINE_S) -> T:
    """Poll `check` until it returns something other than None."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


# /proc ------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command's name: state, ppid, ... (None: gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def alive(pid: int, started: str | None = None) -> bool:
    """Is `pid` a live (not zombie) process, the one that started at `started` if given?"""
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return started is None or fields[19] == started


def start_time(pid: int) -> str:
    fields = _stat(pid)
    assert fields is not None, f"process {pid} is gone"
    return fields[19]


def children(parent: int) -> set[int]:
    """The live child processes of `parent`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[1] == str(parent) and alive(int(entry.name)):
                found.add(int(entry.name))
    return found


def _established_inodes(port: int) -> set[str]:
    """Socket inodes of established TCP connections whose local port is `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    inodes.add(fields[9])
    return inodes


def connections(port: int, pids: set[int]) -> collections.Counter[int]:
    """How many established connections to `port` each of `pids` holds."""
    inodes = _established_inodes(port)
    held: collections.Counter[int] = collections.Counter()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        held[pid] += 1
    return held


# processes --------------------------------------------------------------------------


class Parents:
    """Starts `serve --workers` parents; at the end stops them and every worker left."""

    def __init__(self, redis_url: str, key_prefix: str) -> None:
        self._redis_url = redis_url
        self._key_prefix = key_prefix
        self._started: list[KeelProcess] = []

    async def start(self, workers: int = 2, *args: str) -> KeelProcess:
        keel = await start_keel_process(
            redis_url=self._redis_url,
            key_prefix=self._key_prefix,
            agents=SCRIPTED,
            env={"KEEL_SHUTDOWN_GRACE_S": "2"},
            args=["--workers", str(workers), "--log-format", "text", *args],
            ready_timeout_s=READY_TIMEOUT_S,
        )
        self._started.append(keel)
        return keel

    async def stop_all(self) -> None:
        for keel in self._started:
            workers = children(keel.process.pid)
            keel.terminate()
            try:
                await keel.wait(DEADLINE_S)
            except TimeoutError:
                keel.kill()
                await keel.wait()
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def parents(redis_url: str, key_prefix: str) -> AsyncIterator[Parents]:
    started = Parents(redis_url, key_prefix)
    try:
        yield started
    finally:
        await started.stop_all()


async def two_workers(keel: KeelProcess) -> set[int]:
    def found() -> set[int] | None:
        workers = children(keel.process.pid)
        return workers if len(workers) == 2 else None

    return await until(found, "two worker processes")


# calls ------------------------------------------------------------------------------


async def stream_a_run(stub: pb_grpc.AgentServiceStub) -> None:
    call = stub.Stream(
        pb.StreamRequest(agent_id="scripted", input=script(text(3))),
        timeout=CALL_TIMEOUT_S,
        wait_for_ready=True,
    )
    out = await collect(call)
    assert payloads(out.events)[-1] == "finish"


async def channel_per_worker(
    port: int, workers: set[int], stack: contextlib.AsyncExitStack
) -> dict[int, grpc.aio.Channel]:
    """Open connections until each worker holds one on which a run streamed to its end:
    the kernel spreads connections over the workers, and each of them serves.

    Returns one such channel per worker (the others stay open until `stack` closes)."""
    by_worker: dict[int, grpc.aio.Channel] = {}
    deadline = time.monotonic() + DEADLINE_S
    while set(by_worker) != workers:
        assert time.monotonic() < deadline, f"connections reached only {set(by_worker)}"
        before = connections(port, workers)
        channel = await stack.enter_async_context(
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION)
        )
        try:
            await stream_a_run(pb_grpc.AgentServiceStub(channel))
        except grpc.aio.AioRpcError as exc:  # e.g. the worker it reached was just killed
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            continue
        gained = connections(port, workers) - before
        if len(gained) == 1:  # the worker that accepted this channel's connection
            by_worker.setdefault(next(iter(gained)), channel)
    return by_worker


async def retry_unavailable(call: Callable[[], Awaitable[T]]) -> T:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


# tests ------------------------------------------------------------------------------


async def test_two_workers_share_the_port_and_each_serves(parents: Parents) -> None:
    await share_the_port(parents)


async def test_two_workers_share_the_port_on_postgresql(postgres_url: str, key_prefix: str) -> None:
    started = Parents(postgres_url, key_prefix)
    try:
        await share_the_port(started)
    finally:
        await started.stop_all()


async def share_the_port(parents: Parents) -> None:
    keel = await parents.start(workers=2)
    workers = await two_workers(keel)
    async with contextlib.AsyncExitStack() as stack:
        first, second = (await channel_per_worker(keel.port, workers, stack)).values()
        # Runs live in the store: a run one worker started, the other streams, all of it.
        started = await pb_grpc.AgentServiceStub(first).StartRun(
            pb.StartRunRequest(agent_id="scripted", input=script(text(20, delay_ms=5))),
            timeout=CALL_TIMEOUT_S,
        )
        observed = await collect(
            pb_grpc.AgentServiceStub(second).Observe(
                pb.ObserveRequest(run_id=started.run.run_id, offset=0), timeout=CALL_TIMEOUT_S
            )
        )
        assert_contiguous(observed.events)
        assert payloads(observed.events)[-1] == "finish"


async def test_the_port_is_refused_to_a_second_parent_and_a_single_server(
    parents: Parents, redis_url: str
) -> None:
    keel = await parents.start(workers=2)
    base = [sys.executable, "-m", "server", "serve", "--port", str(keel.port)]
    base += ["--redis-url", redis_url, "--agents", SCRIPTED, "--key-prefix", "refused"]
    env = {**os.environ, "KEEL_SHUTDOWN_GRACE_S": "0"}
    second = await asyncio.to_thread(
        subprocess.run,
        [*base, "--workers", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=DEADLINE_S,
    )
    assert second.returncode != 0
    assert b"another `serve --workers` parent holds port" in second.stderr
    # One server without SO_REUSEPORT cannot bind it either (the workers listen on it).
    single = await asyncio.to_thread(
        subprocess.run, base, cwd=ROOT, env=env, capture_output=True, timeout=DEADLINE_S
    )
    assert single.returncode != 0
    assert b"Failed to bind" in single.stderr
    # And the first parent still serves with its two workers.
    assert len(children(keel.process.pid)) == 2
    async with grpc.aio.insecure_channel(keel.target) as channel:
        await stream_a_run(pb_grpc.AgentServiceStub(channel))


async def test_the_workers_share_the_http_port_too(parents: Parents, redis_url: str) -> None:
    keel = await parents.start(2, "--http-port", "0")
    workers = await two_workers(keel)
    assert keel.http_port is not None
    url = f"http://127.0.0.1:{keel.http_port}/keel.v1.AgentService/ListAgents"
    async with contextlib.AsyncExitStack() as stack:
        # New connections until each worker holds one that answered.
        answered: set[int] = set()
        deadline = time.monotonic() + DEADLINE_S
        while answered != workers:
            assert time.monotonic() < deadline, f"connections reached only {answered}"
            before = connections(keel.http_port, workers)
            http = await stack.enter_async_context(httpx2.AsyncClient(timeout=CALL_TIMEOUT_S))
            response = await http.post(url, json={})
            assert response.status_code == 200
            assert response.json()["agents"][0]["agentId"] == "scripted"
            gained = connections(keel.http_port, workers) - before
            answered |= set(gained)
    # A second parent cannot take the HTTP port either.
    command = [sys.executable, "-m", "server", "serve", "--workers", "2", "--port", "0"]
    command += ["--http-port", str(keel.http_port), "--redis-url", redis_url, "--agents", SCRIPTED]
    second = await asyncio.to_thread(
        subprocess.run,
        command,
        cwd=ROOT,
        env={**os.environ, "KEEL_SHUTDOWN_GRACE_S": "0"},
        capture_output=True,
        timeout=DEADLINE_S,
    )
    assert second.returncode != 0
    assert f"holds port {keel.http_port}".encode() in second.stderr


async def test_a_killed_worker_is_replaced_and_the_service_keeps_answering(
    parents: Parents,
) -> None:
    keel = await parents.start(workers=2)
    workers = await two_workers(keel)
    victim, survivor = sorted(workers)
    os.kill(victim, signal.SIGKILL)

    async def on_a_new_connection() -> None:
        async with grpc.aio.insecure_channel(keel.target, options=OWN_CONNECTION) as channel:
            await stream_a_run(pb_grpc.AgentServiceStub(channel))

    await retry_unavailable(on_a_new_connection)  # the survivor answers meanwhile

    def replaced() -> set[int] | None:
        now = children(keel.process.pid)
        return now if len(now) == 2 and victim not in now and survivor in now else None

    replacement = (await until(replaced, "a replacement worker")) - {survivor}
    assert keel.process.returncode is None
    # The replacement shares the port and serves, as does the survivor.
    async with contextlib.AsyncExitStack() as stack:
        await channel_per_worker(keel.port, {survivor, *replacement}, stack)


async def test_sigterm_to_the_parent_drains_every_worker_and_exits_0(parents: Parents) -> None:
    keel = await parents.start(workers=2)
    workers = {pid: start_time(pid) for pid in await two_workers(keel)}
    keel.terminate()
    assert await keel.wait(DEADLINE_S + 30) == 0
    assert not [pid for pid, started in workers.items() if alive(pid, started)]
    # Nothing listens on the port any more: a bind without SO_REUSEPORT succeeds.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", keel.port))


async def test_workers_follow_a_parent_killed_with_sigkill(parents: Parents) -> None:
    keel = await parents.start(workers=2)
    workers = {pid: start_time(pid) for pid in await two_workers(keel)}
    keel.kill()
    await keel.wait()

    def gone() -> bool | None:
        return True if not any(alive(p, s) for p, s in workers.items()) else None

    await until(gone, "the orphaned workers to exit")


def test_workers_that_cannot_start_stop_the_parent(redis_url: str) -> None:
    argv = [sys.executable, "-m", "server", "serve", "--port", "0", "--workers", "2"]
    argv += ["--redis-url", redis_url, "--agents", "tests.no_such_module:registry"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=READY_TIMEOUT_S)
    assert done.returncode != 0
    assert b"exited before listening" in done.stderr  # not replaced again and again
    assert LISTENING.encode() not in done.stdout


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_workers_without_redis_are_refused(how: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    argv = [sys.executable, "-m", "server", "serve", "--port", "0"]
    if how == "flag":
        argv += ["--workers", "2"]
    else:
        env["KEEL_WORKERS"] = "2"
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, timeout=DEADLINE_S)
    assert done.returncode != 0
    assert b"--workers 2 needs a shared store" in done.stderr
    assert not done.stdout  # it never listened


def test_each_worker_gets_its_settings() -> None:
    settings = Settings(redis_url="redis://x", workers=3, metrics_port=9100, port=0)
    values = [worker_values(settings, port=5000, slot=i, serial=i + 1) for i in range(3)]
    assert [v["metrics_port"] for v in values] == [9100, 9101, 9102]
    assert {v["port"] for v in values} == {5000} and {v["workers"] for v in values} == {1}
    assert all("instance_id" not in v for v in values)  # each worker's default: its pid
    worker = Settings(**values[0])
    assert worker.redis_url == "redis://x"
    assert f"-{os.getpid()}-" in worker.instance_id  # the process that reads them
    named = Settings(redis_url="redis://x", workers=2, instance_id="api")
    ids = {worker_values(named, port=1, slot=0, serial=n)["instance_id"] for n in (1, 2, 3)}
    assert len(ids) == 3  # a replacement is not its predecessor
    any_port = Settings(redis_url="redis://x", workers=2, metrics_port=0)
    assert worker_values(any_port, port=1, slot=1, serial=2)["metrics_port"] == 0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"workers": 2}, "needs a shared store"),
        ({"workers": 2, "redis_url": "redis://x", "metrics_port": 65535}, "not a port"),
        ({"workers": 3, "redis_url": "redis://x", "port": 9101, "metrics_port": 9100}, "include"),
    ],
)
def test_settings_workers_cannot_run_with(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        check_workers(Settings(**values))


def test_the_reserved_port_admits_the_workers_only() -> None:
    reservation = reserve_port("127.0.0.1", 0)
    address = f"127.0.0.1:{reservation.port}"
    servers: list[grpc.Server] = []
    try:
        # No worker listens yet: still, a server without SO_REUSEPORT cannot bind it.
        single = grpc.server(ThreadPoolExecutor(1), options=[("grpc.so_reuseport", 0)])
        servers.append(single)
        with pytest.raises(RuntimeError, match="Failed to bind"):
            single.add_insecure_port(address)
        worker = grpc.server(ThreadPoolExecutor(1), options=[("grpc.so_reuseport", 1)])
        servers.append(worker)
        assert worker.add_insecure_port(address) == reservation.port
        with pytest.raises(WorkersError, match="another `serve --workers` parent holds port"):
            reserve_port("127.0.0.1", reservation.port)
    finally:
        for server in servers:
            server.stop(None)
        reservation.close()


def test_a_port_something_listens_on_is_refused() -> None:
    with socket.socket() as listener:  # even one that shares with SO_REUSEPORT
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with pytest.raises(WorkersError, match="in use by another process"):
            reserve_port("127.0.0.1", listener.getsockname()[1])
