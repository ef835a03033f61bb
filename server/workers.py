"""`python -m server serve --workers N`: N server processes on one port, one per core.

One Python process runs its event loop on one core. With Redis, servers are
ordinary replicas (leases hand runs between them, any of them serves Observe
of any run), so N of them can share one port: the pattern of grpc's
multiprocessing example (examples/python/multiprocessing in grpc/grpc).

The parent (`run_workers`) creates no gRPC server, no event loop and no
channel. It:

1. reserves the port: a socket bound (never listening) with SO_REUSEPORT on
   every address of the host; with port 0 this picks the port. Before, it
   refuses a port that is in use (a probe bind without SO_REUSEPORT fails on
   any listener there) and takes a per-port lock (an abstract Unix socket,
   freed by the kernel when the parent dies), so that a second Keel parent
   on the same port fails instead of silently sharing it;
2. starts N workers: `python -m server serve --worker-of PARENT_PID`, fresh
   interpreters (subprocess, no fork of this one) that read the parent's
   settings from the environment and bind the port with
   ("grpc.so_reuseport", 1). Each gets an instance id of its own (the default
   names the pid; an explicit KEEL_INSTANCE_ID gets a suffix), worker i serves
   metrics on metrics_port + i, all share the HTTP port (http_port,
   reserved by the parent like the gRPC port), and each dies with the
   parent (SIGTERM by PR_SET_PDEATHSIG);
3. prints `keel listening on HOST:PORT` once every worker listens, like a
   single server does;
4. replaces a worker that exits unexpectedly (after a backoff that grows while
   replacements die young); but a worker that exits before listening at start
   stops them all (a configuration error would only die again);
5. on SIGTERM or SIGINT, forwards SIGTERM to every worker (each drains as a
   single server does), waits for them all (SIGKILL after shutdown_grace_s
   and a margin) and exits: 0 when every worker exited cleanly.

Only the workers listen, so the kernel spreads new connections over them.
The reserved socket stays bound until the parent exits, so even with no
worker listening (all of them being replaced) no server without SO_REUSEPORT
can take the port (unless it was in TIME_WAIT at start, see `_reserve`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from server.process import HTTP_LISTENING, LISTENING
from server.settings import ConfigurationError, Settings

log = logging.getLogger(__name__)

# The parent's settings as JSON, for its workers (not a KEEL_ variable: internal).
SETTINGS_ENV = "_KEEL_WORKER_SETTINGS"
# Replacing a worker that died: BACKOFF_S after one that lived less than STABLE_S,
# doubling with each such death in a row up to BACKOFF_MAX_S; at once after a worker
# that lived longer.
BACKOFF_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_S = 10.0
# On SIGTERM a worker gets shutdown_grace_s to drain plus this much, then SIGKILL.
STOP_MARGIN_S = 20.0
_POLL_S = 1.0  # the loop also wakes at every signal (SIGCHLD included)
_PR_SET_PDEATHSIG = 1


class WorkersError(Exception):
    """The parent cannot run its workers (the port is taken, the parent is gone, ...)."""


def check_workers(settings: Settings) -> None:
    """ConfigurationError for settings `serve --workers` cannot run with."""
    if settings.workers == 1:
        return
    if not (settings.redis_url or settings.postgres_url):
        raise ConfigurationError(
            f"--workers {settings.workers} needs a shared store (--redis-url or "
            "--postgres-url): the workers are separate processes and share runs through "
            "it; the in-memory event log cannot be shared between processes"
        )
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigurationError("--workers needs SO_REUSEPORT, which this system lacks")
    if settings.metrics_port:
        last = settings.metrics_port + settings.workers - 1
        if last > 65535:
            raise ConfigurationError(
                f"worker i serves metrics on --metrics-port + i: {last} is not a port"
            )
        if settings.metrics_port <= settings.port <= last:
            raise ConfigurationError(
                f"the workers' metrics ports {settings.metrics_port}-{last} include "
                f"the gRPC port {settings.port}"
            )


def worker_values(
    settings: Settings, *, port: int, slot: int, serial: int, http_port: int | None = None
) -> dict[str, Any]:
    """The settings of worker `slot` (0..workers-1), the `serial`-th worker started."""
    values = settings.model_dump(mode="json", exclude={"instance_id"})
    values.update(port=port, workers=1, http_port=http_port)
    if settings.metrics_port:  # 0 stays 0: each worker picks a free port
        values["metrics_port"] = settings.metrics_port + slot
    if "instance_id" in settings.model_fields_set:
        values["instance_id"] = f"{settings.instance_id}-{serial}"
    # else the worker's default: its host, its pid and a random suffix
    return values


def settings_from_parent(parent_pid: int) -> Settings:
    """A worker's settings, from its parent; the worker dies with the parent."""
    raw = os.environ.pop(SETTINGS_ENV, None)
    if raw is None:
        raise WorkersError("--worker-of is for the workers of `serve --workers` only")
    _die_with_parent()
    if os.getppid() != parent_pid:  # it died before the line above
        raise WorkersError(f"the parent (pid {parent_pid}) is gone")
    return Settings(**json.loads(raw))


def _die_with_parent() -> None:
    """SIGTERM this process (a graceful drain) when its parent dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


@dataclass
class Reservation:
    """The port the workers share, held by sockets that never listen, and the lock."""

    port: int
    sockets: list[socket.socket]
    lock: socket.socket | None

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        if self.lock is not None:
            self.lock.close()


SockAddr = tuple[Any, ...]


def _addresses(host: str) -> list[tuple[socket.AddressFamily, SockAddr]]:
    """Every address `host` binds, as gRPC binds them all ("localhost": v4 and v6)."""
    try:
        infos = socket.getaddrinfo(
            host.strip("[]") or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise WorkersError(f"cannot resolve {host}: {exc}") from exc
    found: list[tuple[socket.AddressFamily, SockAddr]] = []
    for family, _type, _proto, _name, address in infos:
        if (family, address) not in found and family in (socket.AF_INET, socket.AF_INET6):
            found.append((family, tuple(address)))
    return found


def _with_port(address: SockAddr, port: int) -> SockAddr:
    return (address[0], port, *address[2:])


_UNUSABLE = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)  # e.g. ::1 without IPv6


def _probe(family: socket.AddressFamily, address: SockAddr, host: str) -> None:
    """WorkersError if something listens on the address (with SO_REUSEPORT or not).

    SO_REUSEADDR, no SO_REUSEPORT: the bind fails on any listener of the port,
    and not on connections of a server that stopped lately (TIME_WAIT).
    """
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno in _UNUSABLE:
                return
            raise WorkersError(
                f"port {address[1]} of {host} is in use by another process ({exc.strerror})"
            ) from exc


def _reserve(family: socket.AddressFamily, address: SockAddr) -> socket.socket | None:
    """A socket bound to the address with SO_REUSEPORT (None if the host lacks the family).

    Without SO_REUSEADDR it keeps every socket without SO_REUSEPORT off the port (a
    server like gRPC's, which sets SO_REUSEADDR, included), even with no worker
    listening. Connections of a server that stopped lately (TIME_WAIT) refuse that
    bind: once the probe found no listener, it binds with SO_REUSEADDR instead.
    """
    for reuse_address in (0, 1):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
                raise WorkersError("could not set SO_REUSEPORT")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse_address)
            sock.bind(address)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno in _UNUSABLE:
                return None
            if exc.errno != errno.EADDRINUSE or reuse_address:
                raise WorkersError(f"cannot bind port {address[1]}: {exc.strerror}") from exc
        except BaseException:
            sock.close()
            raise
    raise AssertionError("unreachable")


def _lock(port: int) -> socket.socket | None:
    """The lock of `port` among Keel parents on this host (network namespace): an abstract
    Unix socket, which the kernel frees when its holder exits however it exits."""
    if not sys.platform.startswith("linux"):
        return None
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(f"\0keel-serve-workers:{port}")
    except OSError as exc:
        lock.close()
        if exc.errno == errno.EADDRINUSE:
            raise WorkersError(
                f"another `serve --workers` parent holds port {port} on this host"
            ) from exc
        return None
    return lock


def reserve_port(host: str, port: int) -> Reservation:
    """Reserve host:port (port 0: a free port) for the workers; see the module docstring."""
    addresses = _addresses(host)
    if not addresses:
        raise WorkersError(f"{host} has no IPv4 or IPv6 address")
    sockets: list[socket.socket] = []
    lock = None
    try:
        if port == 0:  # the kernel picks a port no socket uses, with SO_REUSEPORT or not
            for family, address in addresses:
                first = _reserve(family, _with_port(address, 0))
                if first is not None:
                    sockets.append(first)
                    port = first.getsockname()[1]
                    break
            else:
                raise WorkersError(f"cannot bind any address of {host}")
            addresses.remove((family, address))
            lock = _lock(port)
        else:
            lock = _lock(port)
            for family, address in addresses:
                _probe(family, _with_port(address, port), host)
        for family, address in addresses:
            sock = _reserve(family, _with_port(address, port))
            if sock is not None:
                sockets.append(sock)
        if not sockets:
            raise WorkersError(f"cannot bind any address of {host}")
    except BaseException:
        Reservation(port, sockets, lock).close()
        raise
    return Reservation(port, sockets, lock)


@dataclass
class _Worker:
    slot: int
    process: subprocess.Popen[bytes]
    started_at: float
    ready: bool = False
    partial: bytes = field(default=b"", repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid


def _describe(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


class _Supervisor:
    """The parent's loop: one thread, woken by the workers' stdout and by signals."""

    def __init__(self, settings: Settings, port: int, http_port: int | None) -> None:
        self._settings = settings
        self._port = port
        self._http_port = http_port
        self._workers: dict[int, _Worker] = {}  # by slot
        self._respawn_at: dict[int, float] = {}  # slot -> when
        self._young_deaths: dict[int, int] = {}  # slot -> deaths in a row of young workers
        self._serial = 0
        self._selector = selectors.DefaultSelector()
        self._signal: int | None = None
        self._announced = False

    def run(self) -> int:
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
        }
        previous_wakeup = signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        self._selector.register(wake_read, selectors.EVENT_READ, None)
        try:
            for slot in range(self._settings.workers):
                self._spawn(slot)
            return self._loop(wake_read)
        finally:
            for worker in self._workers.values():  # only after an error in the loop
                worker.process.kill()
                worker.process.wait()
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._selector.close()
            os.close(wake_read)
            os.close(wake_write)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum != signal.SIGCHLD:  # SIGCHLD only wakes the loop (the wakeup fd)
            self._signal = signum

    def _spawn(self, slot: int) -> None:
        self._serial += 1
        values = worker_values(
            self._settings,
            port=self._port,
            slot=slot,
            serial=self._serial,
            http_port=self._http_port,
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--worker-of", str(os.getpid())],
            env={**os.environ, SETTINGS_ENV: json.dumps(values)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            # Not in the parent's process group: a terminal's Ctrl-C reaches the parent
            # only, which drains the workers with SIGTERM.
            process_group=0,
        )
        assert process.stdout is not None
        os.set_blocking(process.stdout.fileno(), False)
        worker = _Worker(slot, process, time.monotonic())
        self._workers[slot] = worker
        self._selector.register(process.stdout, selectors.EVENT_READ, worker)
        log.info("worker %d started (pid %d)", slot, worker.pid)

    def _read(self, worker: _Worker) -> None:
        """The worker's stdout: its ready line; anything else passes through."""
        stdout = worker.process.stdout
        assert stdout is not None
        try:
            data = os.read(stdout.fileno(), 65536)
        except BlockingIOError:
            return
        if not data:
            self._selector.unregister(stdout)
            stdout.close()
            return
        *lines, worker.partial = (worker.partial + data).split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            if text.startswith(LISTENING):
                worker.ready = True
                replaced = " (a replacement)" if self._announced else ""
                log.info("worker %d (pid %d) listening%s", worker.slot, worker.pid, replaced)
            elif text.startswith(HTTP_LISTENING):
                pass  # the parent announces the shared HTTP port once, with the gRPC port
            else:
                sys.stdout.buffer.write(line + b"\n")
                sys.stdout.flush()

    def _forget(self, worker: _Worker) -> None:
        del self._workers[worker.slot]
        stdout = worker.process.stdout
        if stdout is not None and not stdout.closed:
            self._selector.unregister(stdout)
            stdout.close()

    def _replace_later(self, worker: _Worker, returncode: int, now: float) -> None:
        if now - worker.started_at < STABLE_S:
            deaths = self._young_deaths.get(worker.slot, 0) + 1
            self._young_deaths[worker.slot] = deaths
            delay = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (deaths - 1))
        else:
            self._young_deaths[worker.slot] = 0
            delay = 0.0
        log.warning(
            "worker %d (pid %d) exited unexpectedly (%s); replacing it in %.1f s",
            worker.slot,
            worker.pid,
            _describe(returncode),
            delay,
        )
        self._respawn_at[worker.slot] = now + delay

    def _stop(self, now: float) -> float:
        """SIGTERM every worker; the time after which they get SIGKILL."""
        self._respawn_at.clear()
        for worker in self._workers.values():
            worker.process.send_signal(signal.SIGTERM)
        return now + self._settings.shutdown_grace_s + STOP_MARGIN_S

    def _timeout(self, kill_at: float | None) -> float:
        now = time.monotonic()
        wake = [now + _POLL_S, *self._respawn_at.values()]
        if kill_at is not None:
            wake.append(kill_at)
        return max(0.0, min(wake) - now)

    def _loop(self, wake_read: int) -> int:
        code = 0
        kill_at: float | None = None  # set once the workers are stopping
        while True:
            for key, _events in self._selector.select(self._timeout(kill_at)):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_read, 512):
                            pass
                else:
                    self._read(key.data)
            now = time.monotonic()
            if self._signal is not None and kill_at is None:
                log.info(
                    "%s: draining %d workers",
                    signal.Signals(self._signal).name,
                    len(self._workers),
                )
                kill_at = self._stop(now)
            for worker in list(self._workers.values()):
                returncode = worker.process.poll()
                if returncode is None:
                    continue
                self._forget(worker)
                if kill_at is not None:
                    if returncode not in (0, -signal.SIGTERM):
                        log.warning(
                            "worker %d (pid %d) exited: %s",
                            worker.slot,
                            worker.pid,
                            _describe(returncode),
                        )
                        code = 1
                elif not self._announced:
                    log.error(
                        "worker %d (pid %d) exited before listening (%s): stopping",
                        worker.slot,
                        worker.pid,
                        _describe(returncode),
                    )
                    code = 1
                    kill_at = self._stop(now)
                else:
                    self._replace_later(worker, returncode, now)
            if kill_at is None:
                for slot, at in list(self._respawn_at.items()):
                    if at <= now:
                        del self._respawn_at[slot]
                        self._spawn(slot)
                if not self._announced and all(w.ready for w in self._workers.values()):
                    self._announced = True
                    pids = ", ".join(str(w.pid) for w in self._workers.values())
                    log.info(
                        "keel serving on %s:%d with %d workers (pids %s)",
                        self._settings.host,
                        self._port,
                        len(self._workers),
                        pids,
                    )
                    if self._http_port is not None:
                        host = self._settings.host
                        print(f"{HTTP_LISTENING}{host}:{self._http_port}", flush=True)
                    print(f"{LISTENING}{self._settings.host}:{self._port}", flush=True)
            elif not self._workers:
                log.info("every worker exited")
                return code
            elif now >= kill_at:
                log.error(
                    "workers still draining after %.0f s: SIGKILL",
                    self._settings.shutdown_grace_s + STOP_MARGIN_S,
                )
                for worker in self._workers.values():
                    worker.process.kill()
                kill_at = math.inf  # and wait for them
                code = 1


def run_workers(settings: Settings) -> int:
    """The parent of `serve --workers N`: until SIGTERM or SIGINT; the exit code."""
    check_workers(settings)
    reservation = reserve_port(settings.host, settings.port)
    http = None
    try:
        if settings.http_port is not None:  # held like the gRPC port
            http = reserve_port(settings.host, settings.http_port)
        return _Supervisor(settings, reservation.port, http.port if http else None).run()
    finally:
        reservation.close()
        if http is not None:
            http.close()
