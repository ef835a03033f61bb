"""Run the benchmark: ceilings and Keel workloads side by side, then figures, ratios, targets.

1. Start a redis-server of our own (memory-only) and, on first need, the raw
   gRPC server.
2. For each workload a-g: measure the ceilings it is compared with (once per
   benchmark run, just before the first workload that needs them), then run
   its client against a Keel server on each backend. A full run starts a
   fresh server per workload and backend, so its peak RSS (VmHWM) belongs to
   that workload alone and no run of an earlier workload lingers in memory.
3. Turn the raw results into figures (Keel value, ceiling value, ratio) and
   targets (analysis.py), and write them (report.py).

A workload that fails is recorded with its error and the run goes on.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import BenchError, Launcher, RedisServer, ServerProcess, TemporalServer
from bench.sizes import CLIENT_TIMEOUT_S, Sizes

Params = dict[str, Any]
BACKENDS = ("memory", "redis", "temporal")  # temporal: the Temporal executor, on Redis
LOCAL = ("memory", "redis")


@dataclass(frozen=True, slots=True)
class Workload:
    key: str  # "a_stream", ...: the JSON key
    title: str
    client: str  # the client function (child.py)
    params: Callable[[Sizes], Params]
    ceilings: tuple[str, ...]  # keys of CEILINGS it is compared with
    # KEEL_* settings of its own: the workload gets a server of its own, quick or not.
    server_env: Callable[[Sizes], dict[str, str]] | None = None
    backends: tuple[str, ...] = LOCAL  # where it runs


WORKLOADS = (
    Workload(
        "a_stream",
        "a. one run of N text deltas through Stream",
        "stream_one",
        lambda s: {"deltas": s.stream_deltas, "reps": s.stream_reps},
        ("grpc_one_stream", "redis"),
        backends=BACKENDS,
    ),
    Workload(
        "b_concurrent",
        "b. concurrent runs through Stream",
        "stream_many",
        lambda s: {"runs": s.many_runs, "deltas": s.many_deltas},
        ("grpc_many_streams",),
        backends=BACKENDS,
    ),
    Workload(
        "c_fanout",
        "c. one run at ~100 events/s with many observers",
        "fanout",
        lambda s: {
            "observers": s.fanout_observers,
            "events": s.fanout_events,
            "interval_ms": s.fanout_interval_ms,
        },
        ("grpc_fanout",),
    ),
    Workload(
        "d_replay",
        "d. Observe from 0 of a finished run",
        "replay",
        lambda s: {"deltas": s.replay_deltas, "reps": s.replay_reps},
        ("grpc_batched", "redis"),
    ),
    Workload(
        "e_rejoin",
        "e. observers rejoining a live run at random offsets at once",
        "rejoin",
        lambda s: {
            "observers": s.rejoin_observers,
            "history": s.rejoin_history,
            "tail": s.rejoin_tail,
            "interval_ms": s.rejoin_interval_ms,
            "before_s": s.rejoin_before_s,
        },
        (),
    ),
    Workload(
        "f_overhead",
        "f. durability overhead: in-process run_stream_events vs Keel",
        "overhead",
        lambda s: {"deltas": s.overhead_deltas, "reps": s.overhead_reps},
        (),
        backends=BACKENDS,
    ),
    Workload(
        "g_tasks",
        "g. background tasks under a global concurrency limit",
        "tasks",
        lambda s: {
            "tasks": s.tasks_count,
            "duration_ms": s.tasks_ms,
            "limit": s.tasks_limit,
            "runs": s.tasks_runs,
        },
        (),
        lambda s: {"KEEL_TASKS_GLOBAL_CONCURRENCY": str(s.tasks_limit)},
    ),
)


@dataclass
class Run:
    """One benchmark run in progress: its processes and what it measured so far."""

    sizes: Sizes
    launcher: Launcher
    backends: tuple[str, ...]
    py_spy: str | None = None  # path of py-spy: profile each Keel server while it is measured
    profile_dir: Path | None = None
    ceilings: dict[str, Params] = field(default_factory=dict)
    workloads: dict[str, dict[str, Params]] = field(default_factory=dict)
    redis: RedisServer | None = None
    temporal: TemporalServer | None = None
    raw_grpc: ServerProcess | None = None
    shared: dict[str, ServerProcess] = field(default_factory=dict)  # backend -> server
    log: Callable[[str], None] = print

    # -- processes --------------------------------------------------------------

    redis_version: str = ""

    def redis_url(self) -> str:
        if self.redis is None:
            self.redis = RedisServer.start()
            self.redis_version = self.redis.version()
        return self.redis.url

    def raw_target(self) -> str:
        if self.raw_grpc is None:
            self.raw_grpc = self.launcher.start_raw_grpc()
        return self.raw_grpc.target

    def temporal_address(self) -> str:
        if self.temporal is None:
            self.temporal = TemporalServer.start()
        return self.temporal.address

    @contextlib.contextmanager
    def keel(self, backend: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
        """A Keel server on `backend`: fresh (full runs, or settings of its own `env`) or
        shared by every workload (quick). On temporal: always fresh, with a worker of its
        own on a task queue of its own."""
        if backend == "temporal":
            with self._temporal_keel(env) as server:
                yield server
            return
        url = self.redis_url() if backend == "redis" else ""
        if not self.sizes.fresh_server_per_workload and not env:
            if backend not in self.shared:
                self.shared[backend] = self.launcher.start_keel(url)
            yield self.shared[backend]
            return
        if self.redis is not None and self.sizes.fresh_server_per_workload:
            self.redis.flush()
        server = self.launcher.start_keel(url, env=env)
        try:
            yield server
        finally:
            server.stop()

    @contextlib.contextmanager
    def _temporal_keel(self, env: dict[str, str] | None) -> Iterator[ServerProcess]:
        url, address = self.redis_url(), self.temporal_address()
        if self.sizes.fresh_server_per_workload and self.redis is not None:
            self.redis.flush()
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        settings = {
            **(env or {}),
            "KEEL_EXECUTOR": "temporal",
            "KEEL_TEMPORAL_ADDRESS": address,
            "KEEL_TASK_QUEUE": f"bench-{prefix}",
        }
        worker = self.launcher.start_worker(url, prefix, settings)
        try:
            server = self.launcher.start_keel(url, env=settings, key_prefix=prefix)
            try:
                yield server
            finally:
                server.stop()
        finally:
            worker.stop()

    def close(self) -> None:
        for server in [*self.shared.values(), self.raw_grpc]:
            if server is not None:
                server.stop()
        self.shared.clear()
        self.raw_grpc = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if self.temporal is not None:
            self.temporal.stop()
            self.temporal = None

    # -- measuring ----------------------------------------------------------------

    def client(self, name: str, params: Params) -> Params:
        return self.launcher.run_client(name, params, CLIENT_TIMEOUT_S)

    def measure_ceiling(self, key: str) -> None:
        if key in self.ceilings:
            return
        self.log(f"ceiling {key}")
        start = time.monotonic()
        try:
            result = CEILINGS[key](self)
        except BenchError as exc:
            result = {"ok": False, "errors": [str(exc)]}
        result["wall_s"] = time.monotonic() - start
        self.ceilings[key] = result

    def measure_workload(self, workload: Workload, backend: str) -> Params:
        self.log(f"workload {workload.key} on {backend}")
        start = time.monotonic()
        try:
            env = workload.server_env(self.sizes) if workload.server_env else None
            with self.keel(backend, env) as server:
                baseline_kib = server.rss_kib()
                params = {"target": server.target, **workload.params(self.sizes)}
                with self._profiling(server, f"{workload.key}-{backend}"):
                    result = self.client(workload.client, params)
                result["server_peak_rss_kib"] = server.peak_rss_kib()
                result["server_rss_before_kib"] = baseline_kib
        except BenchError as exc:
            traceback.print_exc()
            result = {"ok": False, "errors": [str(exc)]}
        result["wall_s"] = time.monotonic() - start
        return result

    @contextlib.contextmanager
    def _profiling(self, server: ServerProcess, name: str) -> Iterator[None]:
        """py-spy record the server while the block runs (when asked for)."""
        if self.py_spy is None or self.profile_dir is None:
            yield
            return
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        # fmt: off
        recorder = subprocess.Popen(
            [
                self.py_spy, "record", "--pid", str(server.pid), "--rate", "250",
                "--format", "raw", "--output", str(self.profile_dir / f"{name}.txt"),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # fmt: on
        try:
            yield
        finally:
            recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                recorder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait()

    def run(self, only: frozenset[str] = frozenset()) -> None:
        try:
            for workload in WORKLOADS:
                if only and workload.key[0] not in only:
                    continue
                for key in workload.ceilings:
                    self.measure_ceiling(key)
                self.workloads[workload.key] = {
                    backend: self.measure_workload(workload, backend)
                    for backend in self.backends
                    if backend in workload.backends
                }
        finally:
            self.close()


# -- the ceilings -------------------------------------------------------------------


def _grpc_one_stream(run: Run) -> Params:
    params = {"messages": run.sizes.grpc_messages, "streams": 1, "batch": 1}
    return run.client(
        "grpc_stream", {"target": run.raw_target(), "reps": run.sizes.ceiling_reps, **params}
    )


def _grpc_many_streams(run: Run) -> Params:
    params = {"messages": run.sizes.grpc_stream_messages, "streams": run.sizes.grpc_streams}
    return run.client(
        "grpc_stream",
        {"target": run.raw_target(), "batch": 1, "reps": run.sizes.ceiling_reps, **params},
    )


def _grpc_batched(run: Run) -> Params:
    # Keel's catch-up reads pages of 1000 events and sends each page as one message.
    events = run.sizes.replay_deltas
    batch = min(1000, events)
    return run.client(
        "grpc_stream",
        {
            "target": run.raw_target(),
            "messages": max(1, events // batch),
            "batch": batch,
            "streams": 1,
            "reps": max(3, run.sizes.ceiling_reps),
        },
    )


def _grpc_fanout(run: Run) -> Params:
    return run.client(
        "grpc_fanout",
        {
            "target": run.raw_target(),
            "streams": run.sizes.fanout_observers,
            "ticks": run.sizes.fanout_events,
            "interval_ms": run.sizes.fanout_interval_ms,
            "reps": min(2, run.sizes.ceiling_reps),
        },
    )


def _redis(run: Run) -> Params:
    return run.client("redis", {"url": run.redis_url(), "events": run.sizes.redis_events})


CEILINGS: dict[str, Callable[[Run], Params]] = {
    "grpc_one_stream": _grpc_one_stream,
    "grpc_many_streams": _grpc_many_streams,
    "grpc_batched": _grpc_batched,
    "grpc_fanout": _grpc_fanout,
    "redis": _redis,
}
