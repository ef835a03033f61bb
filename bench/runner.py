"""Run the benchmark: ceilings and Keel workloads side by side, then figures, ratios, targets.

1. On first need, start the stores of our own (procs.start_store: a
   memory-only redis-server for "redis" and "temporal"; one with an AOF for
   "redis-aof-everysec" and "redis-aof-always"; a 3-master Redis Cluster for
   "cluster"; a PostgreSQL server for "postgres", one whose commits wait for
   their WAL flush for "postgres-sync") and the raw gRPC server.
2. For each workload a-i: measure the ceilings it is compared with (once per
   benchmark run, just before the first workload that needs them; a store's
   raw Redis ceiling, or the raw PostgreSQL one, just before the first
   workload on it), then run its
   client against a Keel server on each backend. A workload that runs on
   "redis" runs on its variants (REDIS_VARIANTS) too, when they are asked
   for. A full run starts a fresh server per workload and backend, so its
   peak RSS (VmHWM) belongs to that workload alone and no run of an earlier
   workload lingers in memory.
   Around the measured part of each, the server's CPU time is read from
   /proc (by the client, or for clients that run as several processes, by
   the runner between "go" and their end; see cpu.py).
3. Turn the raw results into figures (Keel value, ceiling value, ratio) and
   targets (analysis.py), and write them (report.py).

A workload that fails is recorded with its error and the run goes on; one
the measured server cannot run (a `--workers` it lacks) is recorded as
skipped, with the reason.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import subprocess
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import cpu
from bench.cpu import Meter
from bench.procs import (
    POSTGRES,
    POSTGRES_BACKENDS,
    POSTGRES_VARIANTS,
    REDIS_VARIANTS,
    BenchError,
    Launcher,
    ServerProcess,
    Store,
    TemporalServer,
    Unsupported,
    start_store,
)
from bench.sizes import CLIENT_TIMEOUT_S, Sizes
from bench.stats import latency_summary_ms

Params = dict[str, Any]
BACKENDS = ("memory", "redis", "temporal")  # temporal: the Temporal executor, on Redis
LOCAL = ("memory", "redis")
# Besides the default ones: "redis" on other stores, and PostgreSQL (workloads a, b and d;
# "postgres-sync" runs them too), asked for with --backends.
ALL_BACKENDS = (*BACKENDS, *REDIS_VARIANTS, *POSTGRES_BACKENDS)
WITH_POSTGRES = (*BACKENDS, POSTGRES)


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
    # The server is started with `--workers N` (a fresh server, quick or not).
    workers: Callable[[Sizes], int] | None = None
    # The client runs as this many processes at once (their `runs` split between them,
    # released together); the runner merges their results with `merge` and reads the
    # server's CPU itself.
    processes: Callable[[Sizes], int] | None = None
    merge: Callable[[list[Params], Params], Params] | None = None


WORKLOADS = (
    Workload(
        "a_stream",
        "a. one run of N text deltas through Stream",
        "stream_one",
        lambda s: {"deltas": s.stream_deltas, "reps": s.stream_reps},
        ("grpc_one_stream", "redis"),
        backends=WITH_POSTGRES,
    ),
    Workload(
        "b_concurrent",
        "b. concurrent runs through Stream",
        "stream_many",
        lambda s: {"runs": s.many_runs, "deltas": s.many_deltas},
        ("grpc_many_streams",),
        backends=WITH_POSTGRES,
    ),
    # Workers: b again on Redis, each run on a connection of its own (the kernel hands
    # each connection to one worker), in one server process and with --workers N.
    Workload(
        "b_concurrent_w1",
        "b. concurrent runs through Stream, a connection each, one server process",
        "stream_many",
        lambda s: {"runs": s.many_runs, "deltas": s.many_deltas, "channels": s.compare_channels},
        (),
        backends=("redis",),
    ),
    Workload(
        "b_concurrent_w2",
        "b. concurrent runs through Stream, a connection each, the server with --workers N",
        "stream_many",
        lambda s: {"runs": s.many_runs, "deltas": s.many_deltas, "channels": s.compare_channels},
        (),
        backends=("redis",),  # workers share the store: Redis only
        workers=lambda s: s.compare_workers,
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
        backends=(*LOCAL, POSTGRES),
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
    Workload(
        "h_live_runs",
        "h. many live runs at once, each its own Stream",
        "live_runs",
        lambda s: _live_params(s, s.live_channels),
        (),
        processes=lambda s: s.live_clients,
        merge=lambda results, params: merge_live_runs(results, params),
    ),
    # Workers: h again on Redis, its streams spread round robin over several connections
    # (the kernel hands each connection, not each call, to one worker), in one server
    # process and with --workers N.
    Workload(
        "h_live_runs_w1",
        "h. many live runs at once, over several connections, one server process",
        "live_runs",
        lambda s: _live_params(s, s.live_compare_channels),
        (),
        backends=("redis",),
        processes=lambda s: s.live_clients,
        merge=lambda results, params: merge_live_runs(results, params),
    ),
    Workload(
        "h_live_runs_w2",
        "h. many live runs at once, over several connections, the server with --workers N",
        "live_runs",
        lambda s: _live_params(s, s.live_compare_channels),
        (),
        backends=("redis",),  # workers share the store: Redis only
        workers=lambda s: s.compare_workers,
        processes=lambda s: s.live_clients,
        merge=lambda results, params: merge_live_runs(results, params),
    ),
    Workload(
        "i_short_runs",
        "i. many short runs, a few at a time",
        "short_runs",
        lambda s: {"runs": s.short_runs, "deltas": s.short_deltas, "parallel": s.short_parallel},
        (),
    ),
)


def runs_on(workload: Workload, backend: str) -> bool:
    """Whether `workload` runs on `backend`: where it says, on every Redis variant
    wherever it runs on "redis", on every PostgreSQL variant wherever on "postgres"."""
    if backend in REDIS_VARIANTS:
        return "redis" in workload.backends
    if backend in POSTGRES_VARIANTS:
        return POSTGRES in workload.backends
    return backend in workload.backends


def store_of(backend: str) -> str | None:
    """The store a backend's Keel server uses (None: none, the memory log)."""
    if backend == "memory":
        return None
    return "redis" if backend == "temporal" else backend


def store_ceiling(store: str) -> str:
    """The key of a store's raw ceiling: "redis" for the plain Redis one, "postgres" for
    the plain PostgreSQL one, else redis@STORE or postgres@STORE."""
    if store in ("redis", POSTGRES):
        return store
    return f"postgres@{store}" if store in POSTGRES_VARIANTS else f"redis@{store}"


def _live_params(sizes: Sizes, channels: int) -> Params:
    return {
        "runs": sizes.live_runs,
        "deltas": sizes.live_deltas,
        "delay_ms": sizes.live_delay_ms,
        "channels": channels,
    }


def _message(line: str) -> str:
    """The message of a JSON log line (the line itself if it is not one)."""
    try:
        record = json.loads(line)
    except ValueError:
        return line[:300]
    if not isinstance(record, dict):
        return line[:300]
    return f"{record.get('level', '?')} {record.get('logger', '?')}: {record.get('message', '')}"[
        :300
    ]


def merge_live_runs(results: list[Params], params: Params) -> Params:
    """h's client processes as one: all runs, all delays, wall from the first go to the
    last end (wall-clock ns, one machine) against the script's own duration, the
    clients' CPU."""
    delays = [d for r in results for d in r.pop("delays_ms")]
    start_ns = min(r["start_wall_ns"] for r in results)
    end_ns = max(r["end_wall_ns"] for r in results)
    wall_s = (end_ns - start_ns) / 1e9
    client_cpu_s = sum(r["client_cpu_s"] for r in results)
    summary = latency_summary_ms([round(d * 1e6) for d in delays])
    # A run sleeps delay_ms between two deltas: (deltas - 1) sleeps.
    scripted_s = (int(params["deltas"]) - 1) * int(params["delay_ms"]) / 1000
    return {
        "ok": all(r["ok"] for r in results),
        "runs": sum(r["runs"] for r in results),
        "events": sum(r["events"] for r in results),
        "runs_wall_s": wall_s,
        "scripted_s": scripted_s,
        "wall_over_scripted": wall_s / scripted_s if scripted_s else None,
        "delivery_p50_ms": summary["p50_ms"],
        "delivery_p90_ms": summary["p90_ms"],
        "delivery_p99_ms": summary["p99_ms"],
        "delivery_max_ms": summary["max_ms"],
        "delivery_samples": summary["samples"],
        # From the first go until the server had admitted every Stream (sent its
        # snapshot): how long starting all the runs took.
        "admitted_max_s": max(
            r.get("admitted_max_s", math.nan) + (r["start_wall_ns"] - start_ns) / 1e9
            for r in results
        ),
        "client_processes": len(results),
        "connections": sum(int(r.get("channels", 1)) for r in results),
        "client_cpu_s": client_cpu_s,
        # The busiest client's CPU over its own wall time: near 1.0, it could not keep up.
        "client_cpu_share_max": max(
            r["client_cpu_s"] / r["client_wall_s"] if r["client_wall_s"] else 0.0 for r in results
        ),
        "failed": sum(r["failed"] for r in results),
        "errors": sorted({e for r in results for e in r["errors"]})[:5],
        "clients": results,
    }


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
    stores: dict[str, Store] = field(default_factory=dict)  # by backend name (store_of)
    described: dict[str, Params] = field(default_factory=dict)  # the stores, at the end
    temporal: TemporalServer | None = None
    raw_grpc: ServerProcess | None = None
    # backend (and " --workers N") -> the server quick runs share
    shared: dict[str, ServerProcess] = field(default_factory=dict)
    log: Callable[[str], None] = print

    # -- processes --------------------------------------------------------------

    redis_version: str = ""
    postgres_version: str = ""

    def store(self, name: str = "redis") -> Store:
        """The store `name` (see store_of), started on first need."""
        if name not in self.stores:
            self.stores[name] = start_store(name)
            if name in POSTGRES_BACKENDS:
                self.postgres_version = self.stores[name].version()
            else:
                self.redis_version = self.redis_version or self.stores[name].version()
        return self.stores[name]

    def redis_url(self, name: str = "redis") -> str:
        return self.store(name).url

    def describe_stores(self) -> dict[str, Params]:
        """Each store's settings and what it did (an AOF's rewrites, ...), for the report."""
        described: dict[str, Params] = {}
        for name, store in self.stores.items():
            try:
                described[name] = store.describe()
            except Exception as exc:  # a store that died: say so, the run goes on
                described[name] = {"error": str(exc)}
        return described

    def raw_target(self) -> str:
        if self.raw_grpc is None:
            self.raw_grpc = self.launcher.start_raw_grpc()
        return self.raw_grpc.target

    def temporal_address(self) -> str:
        if self.temporal is None:
            self.temporal = TemporalServer.start()
        return self.temporal.address

    @contextlib.contextmanager
    def keel(
        self, backend: str, env: dict[str, str] | None = None, workers: int = 0
    ) -> Iterator[ServerProcess]:
        """A Keel server on `backend`: fresh (full runs, or settings of its own) or shared
        by every workload with the same `--workers` (quick). On temporal: always fresh, with
        a worker of its own on a task queue of its own."""
        if backend == "temporal":
            with self._temporal_keel(env) as server:
                yield server
            return
        name = store_of(backend)
        url = "" if name is None else self.redis_url(name)
        if not self.sizes.fresh_server_per_workload and not env:
            # Quick: starting a server with workers takes seconds; b and h share one.
            key = f"{backend} --workers {workers}" if workers else backend
            if key not in self.shared:
                self.shared[key] = self.launcher.start_keel(url, workers=workers)
            yield self.shared[key]
            return
        if name is not None and self.sizes.fresh_server_per_workload:
            self.store(name).flush()
        server = self.launcher.start_keel(url, env=env, workers=workers)
        try:
            yield server
        finally:
            server.stop()

    @contextlib.contextmanager
    def _temporal_keel(self, env: dict[str, str] | None) -> Iterator[ServerProcess]:
        url, address = self.redis_url(), self.temporal_address()
        if self.sizes.fresh_server_per_workload:
            self.store().flush()
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
            server.companions.append(worker.pid)  # the runs' CPU is spent there
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
        for store in self.stores.values():
            store.stop()
        self.stores.clear()
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
            result = ceiling(key)(self)
        except BenchError as exc:
            result = {"ok": False, "errors": [str(exc)]}
        result["wall_s"] = time.monotonic() - start
        self.ceilings[key] = result

    def measure_workload(self, workload: Workload, backend: str) -> Params:
        self.log(f"workload {workload.key} on {backend}")
        start = time.monotonic()
        try:
            env = workload.server_env(self.sizes) if workload.server_env else None
            workers = workload.workers(self.sizes) if workload.workers else 0
            with self.keel(backend, env, workers) as server:
                baseline_kib = server.rss_kib()
                params = {
                    "target": server.target,
                    **workload.params(self.sizes),
                    "server_pids": server.cpu_pids,
                }
                name = store_of(backend)
                if name is not None:
                    pids = "postgres_pids" if name in POSTGRES_BACKENDS else "redis_pids"
                    params[pids] = self.store(name).pids
                log_offset = server.log_offset()
                cpu_before = cpu.per_process_cpu_s([server.pid])
                companions_before = cpu.tree_cpu_s(server.companions)
                with self._profiling(server, f"{workload.key}-{backend}"):
                    if workload.processes is not None:
                        result = self._together(workload, params)
                    else:
                        result = self.client(workload.client, params)
                # The whole client, warm-up included (the clients' own windows are tighter),
                # and how it spread over the server's processes (its workers).
                cpu_after = cpu.per_process_cpu_s([server.pid])
                used = {pid: after - cpu_before.get(pid, 0.0) for pid, after in cpu_after.items()}
                result["server_cpu_s_whole_client"] = (
                    sum(used.values()) + cpu.tree_cpu_s(server.companions) - companions_before
                )
                result["server_cpu_s_by_process"] = sorted(used.values(), reverse=True)
                # What the server logged meanwhile (a lease lost under load, ...).
                warnings = server.warnings_since(log_offset)
                result["server_warnings"] = len(warnings)
                result["server_warning_examples"] = [_message(w) for w in warnings[:3]]
                result["server_processes"] = server.processes()
                # With workers: the sum of every process's own peak (the parent first), and
                # the largest of them.
                by_process = server.peak_rss_kib_by_process()
                result["server_peak_rss_kib"] = sum(by_process)
                result["server_peak_rss_kib_by_process"] = by_process
                result["server_peak_rss_max_kib"] = max(by_process, default=0)
                result["server_rss_before_kib"] = baseline_kib
                if workers:
                    result["server_workers"] = workers
        except Unsupported as exc:
            self.log(str(exc))
            result = {"ok": False, "skipped": str(exc), "errors": [str(exc)]}
        except BenchError as exc:
            traceback.print_exc()
            result = {"ok": False, "errors": [str(exc)]}
        result["wall_s"] = time.monotonic() - start
        return result

    def _together(self, workload: Workload, params: Params) -> Params:
        """The workload's client as several processes released at once; the server's and
        Redis's CPU from "go" until the last one ended."""
        assert workload.processes is not None and workload.merge is not None
        count = max(1, min(workload.processes(self.sizes), int(params["runs"])))
        runs = int(params["runs"])
        shares = [runs // count + (i < runs % count) for i in range(count)]
        server = Meter(tuple(params["server_pids"]))
        redis_pids = tuple(int(pid) for pid in params.get("redis_pids", ()))
        redis = Meter(redis_pids) if redis_pids else None
        meters = [m for m in (server, redis) if m is not None]

        def go() -> None:
            for meter in meters:
                meter.start()

        results = self.launcher.run_clients_together(
            workload.client,
            [{**params, "runs": share} for share in shares],
            CLIENT_TIMEOUT_S,
            go,
        )
        for meter in meters:
            meter.stop()
        merged = workload.merge(results, params)
        merged["server_cpu_s"] = server.total_s
        merged["server_cpu_ms_per_run"] = server.total_s * 1e3 / runs
        merged["server_cpu_us_per_event"] = server.total_s * 1e6 / max(1, merged["events"])
        if redis is not None:
            merged["redis_cpu_s"] = redis.total_s
            merged["redis_cpu_ms_per_run"] = redis.total_s * 1e3 / runs
        merged["client_cpu_ms_per_run"] = merged["client_cpu_s"] * 1e3 / runs
        return merged

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
                results: dict[str, Params] = {}
                for backend in self.backends:
                    if not runs_on(workload, backend):
                        continue
                    name = store_of(backend)
                    if name is not None:  # its raw store ceiling, once per store
                        self.measure_ceiling(store_ceiling(name))
                    results[backend] = self.measure_workload(workload, backend)
                self.workloads[workload.key] = results
        finally:
            self.described = self.describe_stores()
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


def _postgres(run: Run, store: str = POSTGRES) -> Params:
    """The raw PostgreSQL ceiling: as many events as the Redis one, the same variants."""
    return run.client(
        "postgres",
        {
            "url": run.redis_url(store),
            "events": run.sizes.redis_events,
            "append_reps": run.sizes.ceiling_reps,
        },
    )


def _redis(run: Run, store: str = "redis") -> Params:
    return run.client(
        "redis",
        {
            "url": run.redis_url(store),
            "events": run.sizes.redis_events,
            "append_reps": run.sizes.ceiling_reps,
        },
    )


CEILINGS: dict[str, Callable[[Run], Params]] = {
    "grpc_one_stream": _grpc_one_stream,
    "grpc_many_streams": _grpc_many_streams,
    "grpc_batched": _grpc_batched,
    "grpc_fanout": _grpc_fanout,
    "redis": _redis,
    POSTGRES: _postgres,
}


def ceiling(key: str) -> Callable[[Run], Params]:
    """How to measure the ceiling `key`: one of CEILINGS (the raw PostgreSQL one is
    "postgres"), or redis@STORE / postgres@STORE (the raw ceiling on that store)."""
    if key.startswith("postgres@"):
        pg_store = key.removeprefix("postgres@")
        return lambda run: _postgres(run, pg_store)
    if key.startswith("redis@"):
        store = key.removeprefix("redis@")
        return lambda run: _redis(run, store)
    return CEILINGS[key]
