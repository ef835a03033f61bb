"""From raw results to figures (Keel value, ceiling, ratio), CPU per event, and the targets.

Every ratio is Keel's value divided by its ceiling's, in the figure's own
unit. For a figure where higher is better (events/s) a ratio of 0.4 means
Keel reaches 40 % of the ceiling; where lower is better (ms) a ratio of 3
means Keel takes three times the ceiling's time. `efficiency` folds both
into one scale (1.0 = as good as the ceiling, higher is better) for charts.
A figure of "redis" is also one of each Redis variant (a redis-server with
an AOF, a cluster: procs.REDIS_VARIANTS), held against that store's own raw
Redis ceiling. PostgreSQL ("postgres": workloads a, b and d) is held against
the gRPC ceilings as the others are, and against the raw PostgreSQL ceiling
(bare INSERTs and reads by the primary key) where Redis is against the raw
Redis one; "postgres-sync" likewise, against its own store's raw ceiling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from bench.procs import POSTGRES_VARIANTS, REDIS_VARIANTS

Params = dict[str, Any]
Better = Literal["higher", "lower"]


@dataclass(frozen=True, slots=True)
class FigureSpec:
    workload: str
    name: str
    unit: str
    better: Better
    value: Callable[[Params], float | None]  # Keel's value, from the workload's result
    ceiling_name: str = ""  # what the ceiling is, for people
    ceiling: Callable[[Params, Params], float | None] | None = None  # (ceilings, result) -> value
    backends: tuple[str, ...] = ("memory", "redis")


WITH_TEMPORAL = ("memory", "redis", "temporal")
WITH_POSTGRES = (*WITH_TEMPORAL, "postgres")
LOCAL_POSTGRES = ("memory", "redis", "postgres")


def applies(backends: tuple[str, ...], backend: str) -> bool:
    """Whether what is judged on `backends` is judged on `backend`: a Redis variant counts
    as "redis", a PostgreSQL variant as "postgres"."""
    return (
        backend in backends
        or (backend in REDIS_VARIANTS and "redis" in backends)
        or (backend in POSTGRES_VARIANTS and "postgres" in backends)
    )


def _ceilings_on(ceilings: Params, workloads: dict[str, dict[str, Params]], backend: str) -> Params:
    """The ceilings a figure on `backend` is held against: on a Redis variant, its own
    store's raw Redis ceiling (redis@BACKEND) as "redis"; --workers N against one server
    process on the same backend (`_b_concurrent_w1`)."""
    own = dict(ceilings)
    store = ceilings.get(f"redis@{backend}")
    if store is not None:
        own["redis"] = store
    pg_store = ceilings.get(f"postgres@{backend}")
    if pg_store is not None:
        own["postgres"] = pg_store
    w1 = workloads.get("b_concurrent_w1", {}).get(backend)
    if w1 is not None and w1.get("ok"):
        own["_b_concurrent_w1"] = w1
    return own


def _get(result: Params, *path: str) -> float | None:
    value: Any = result
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) else None


def _field(*path: str) -> Callable[[Params], float | None]:
    return lambda result: _get(result, *path)


def _ceiling(*path: str) -> Callable[[Params, Params], float | None]:
    return lambda ceilings, result: _get(ceilings, *path)


def _own(*path: str) -> Callable[[Params, Params], float | None]:
    """A ceiling the workload measured itself (the run before, the agent in-process)."""
    return lambda ceilings, result: _get(result, *path)


def _mib(result: Params) -> float | None:
    kib = _get(result, "server_peak_rss_kib")
    return None if kib is None else kib / 1024


def _mb(result: Params) -> float | None:
    kib = _get(result, "server_peak_rss_kib")
    return None if kib is None else kib * 1024 / 1e6


def _mb_max(result: Params) -> float | None:
    """The largest single server process's peak RSS (with --workers: one worker's)."""
    kib = _get(result, "server_peak_rss_max_kib")
    return None if kib is None else kib * 1024 / 1e6


def _live_figures(workload: str, how: str) -> tuple[FigureSpec, ...]:
    """h's main figures for one of its ways on Redis (`how`: which way, for the name)."""
    redis = ("redis",)
    alone = (
        ("delivery delay p50", "ms", _field("delivery_p50_ms")),
        ("delivery delay p99", "ms", _field("delivery_p99_ms")),
        ("server CPU per run", "ms", _field("server_cpu_ms_per_run")),
        ("server peak RSS, all its processes", "MiB", _mib),
    )
    return (
        FigureSpec(
            workload,
            f"time until every run ended, {how}",
            "s",
            "lower",
            _field("runs_wall_s"),
            "the script's own duration (deltas - 1 pauses)",
            _own("scripted_s"),
            redis,
        ),
        *(
            FigureSpec(workload, f"{name}, {how}", unit, "lower", value, backends=redis)
            for name, unit, value in alone
        ),
    )


SERVER_CPU = "server CPU per event"
TIMES = "\N{MULTIPLICATION SIGN}"  # the unit of a ratio, shown as 1.20 times


FIGURES = (
    FigureSpec(
        "a_stream",
        "events/s at the client",
        "events/s",
        "higher",
        _field("events_per_s"),
        "raw gRPC, 1 stream, 1 event per message: messages/s",
        _ceiling("grpc_one_stream", "messages_per_s"),
        WITH_POSTGRES,
    ),
    FigureSpec(
        "a_stream",
        "time to first event",
        "ms",
        "lower",
        _field("time_to_first_event_ms"),
        "raw gRPC, 1 stream: time to first message",
        _ceiling("grpc_one_stream", "time_to_first_ms"),
        WITH_POSTGRES,
    ),
    FigureSpec(
        "a_stream",
        "events/s at the client (vs Redis)",
        "events/s",
        "higher",
        _field("events_per_s"),
        "raw Lua append, 1 event per call, 1 call at a time: events/s",
        _ceiling("redis", "lua_append_one", "events_per_s"),
        ("redis",),
    ),
    FigureSpec(
        "a_stream",
        "events/s at the client (vs PostgreSQL)",
        "events/s",
        "higher",
        _field("events_per_s"),
        "raw INSERT, 1 event per statement, 1 at a time: events/s",
        _ceiling("postgres", "insert_one", "events_per_s"),
        ("postgres",),
    ),
    FigureSpec(
        "a_stream",
        SERVER_CPU,
        "µs",
        "lower",
        _field("server_cpu_us_per_event"),
        backends=WITH_POSTGRES,
    ),
    FigureSpec(
        "b_concurrent",
        "aggregate events/s",
        "events/s",
        "higher",
        _field("events_per_s"),
        "raw gRPC, as many streams, 1 event per message: messages/s",
        _ceiling("grpc_many_streams", "messages_per_s"),
        WITH_POSTGRES,
    ),
    FigureSpec(
        "b_concurrent",
        SERVER_CPU,
        "µs",
        "lower",
        _field("server_cpu_us_per_event"),
        backends=WITH_POSTGRES,
    ),
    FigureSpec("b_concurrent", "server peak RSS", "MiB", "lower", _mib, backends=LOCAL_POSTGRES),
    FigureSpec(
        "b_concurrent_w1",
        "aggregate events/s, a connection per run, one server process",
        "events/s",
        "higher",
        _field("events_per_s"),
        backends=("redis",),
    ),
    FigureSpec(
        "b_concurrent_w1",
        f"{SERVER_CPU}, a connection per run, one server process",
        "µs",
        "lower",
        _field("server_cpu_us_per_event"),
        backends=("redis",),
    ),
    FigureSpec(
        "b_concurrent_w2",
        "aggregate events/s, a connection per run, --workers 2",
        "events/s",
        "higher",
        _field("events_per_s"),
        "the same with one server process",
        lambda ceilings, result: _get(ceilings, "_b_concurrent_w1", "events_per_s"),
        backends=("redis",),
    ),
    FigureSpec(
        "b_concurrent_w2",
        f"{SERVER_CPU}, a connection per run, --workers 2",
        "µs",
        "lower",
        _field("server_cpu_us_per_event"),
        "the same with one server process",
        lambda ceilings, result: _get(ceilings, "_b_concurrent_w1", "server_cpu_us_per_event"),
        backends=("redis",),
    ),
    FigureSpec(
        "c_fanout",
        "append-to-receive latency p50",
        "ms",
        "lower",
        _field("p50_ms"),
        "raw gRPC fan-out, same streams and rate: p50",
        _ceiling("grpc_fanout", "p50_ms"),
    ),
    FigureSpec(
        "c_fanout",
        "append-to-receive latency p99",
        "ms",
        "lower",
        _field("p99_ms"),
        "raw gRPC fan-out: p99",
        _ceiling("grpc_fanout", "p99_ms"),
    ),
    FigureSpec(
        "c_fanout",
        "append-to-receive latency max",
        "ms",
        "lower",
        _field("max_ms"),
        "raw gRPC fan-out: max",
        _ceiling("grpc_fanout", "max_ms"),
    ),
    FigureSpec(
        "c_fanout",
        "producer events/s with the observers",
        "events/s",
        "higher",
        _field("producer_events_per_s"),
        "the rate the script asks for (one event per interval)",
        _own("intended_events_per_s"),
    ),
    FigureSpec(
        "d_replay",
        "time to the last event",
        "ms",
        "lower",
        _field("time_to_last_event_ms"),
        "raw gRPC, the same events in messages of 1000: time to last",
        _ceiling("grpc_batched", "total_ms"),
        LOCAL_POSTGRES,
    ),
    FigureSpec(
        "d_replay",
        "time to the last event (vs Redis)",
        "ms",
        "lower",
        _field("time_to_last_event_ms"),
        "raw ZRANGEBYSCORE of the same events, in pages of 1000",
        _ceiling("redis", "zrangebyscore_pages_1000", "ms"),
        ("redis",),
    ),
    FigureSpec(
        "d_replay",
        "time to the last event (vs PostgreSQL)",
        "ms",
        "lower",
        _field("time_to_last_event_ms"),
        "raw SELECT of the same events by primary key, in pages of 1000 (a bytea[] each)",
        _ceiling("postgres", "select_array_pages_1000", "ms"),
        ("postgres",),
    ),
    FigureSpec(
        "e_rejoin",
        "producer events/s during the rejoin",
        "events/s",
        "higher",
        _field("producer_events_per_s_during"),
        "the same run's producer before the rejoin",
        _own("producer_events_per_s_before"),
    ),
    FigureSpec(
        "e_rejoin",
        "producer events/s after, all observers live",
        "events/s",
        "higher",
        _field("producer_events_per_s_after"),
        "the same run's producer before the rejoin",
        _own("producer_events_per_s_before"),
    ),
    FigureSpec(
        "e_rejoin",
        "producer's longest pause during the rejoin",
        "ms",
        "lower",
        _field("producer_max_gap_ms_during"),
        "its longest pause before the rejoin",
        _own("producer_max_gap_ms_before"),
    ),
    FigureSpec(
        "e_rejoin",
        "observers that completed",
        "observers",
        "higher",
        _field("completed"),
        "observers started",
        _own("observers"),
    ),
    FigureSpec(
        "e_rejoin", "time until every observer caught up", "s", "lower", _field("all_caught_up_s")
    ),
    FigureSpec(
        "f_overhead",
        "time to the last event",
        "s",
        "lower",
        _field("keel_s"),
        "the same agent in-process (run_stream_events)",
        _own("in_process_s"),
        WITH_TEMPORAL,
    ),
    FigureSpec(
        "f_overhead",
        SERVER_CPU,
        "µs",
        "lower",
        _field("server_cpu_us_per_event"),
        "the in-process agent's whole CPU per event it produced",
        _own("in_process_cpu_us_per_event"),
        WITH_TEMPORAL,
    ),
    FigureSpec(
        "g_tasks",
        "most tasks running at once",
        "tasks",
        "higher",
        _field("peak_concurrency"),
        "the global limit",
        _own("limit"),
    ),
    FigureSpec(
        "g_tasks",
        "mean tasks running while any ran",
        "tasks",
        "higher",
        _field("mean_concurrency"),
        "the global limit",
        _own("limit"),
    ),
    FigureSpec(
        "g_tasks",
        "task start after a slot frees, p50",
        "ms",
        "lower",
        _field("start_after_free_p50_ms"),
    ),
    FigureSpec(
        "g_tasks",
        "task start after a slot frees, p99",
        "ms",
        "lower",
        _field("start_after_free_p99_ms"),
    ),
    FigureSpec(
        "g_tasks",
        "time from the first start to the last end",
        "s",
        "lower",
        _field("actual_s"),
        "the ideal: tasks x duration / limit",
        _own("ideal_s"),
    ),
    FigureSpec(
        "h_live_runs",
        "time until every run ended",
        "s",
        "lower",
        _field("runs_wall_s"),
        "the script's own duration (deltas - 1 pauses)",
        _own("scripted_s"),
    ),
    FigureSpec(
        "h_live_runs",
        "time until the server admitted every run (its snapshot)",
        "s",
        "lower",
        _field("admitted_max_s"),
    ),
    FigureSpec("h_live_runs", "delivery delay p50", "ms", "lower", _field("delivery_p50_ms")),
    FigureSpec("h_live_runs", "delivery delay p99", "ms", "lower", _field("delivery_p99_ms")),
    FigureSpec("h_live_runs", "server CPU per run", "ms", "lower", _field("server_cpu_ms_per_run")),
    FigureSpec("h_live_runs", "server peak RSS", "MiB", "lower", _mib),
    FigureSpec(
        "h_live_runs",
        "the busiest client process's CPU, share of one core",
        "share",
        "lower",
        _field("client_cpu_share_max"),
    ),
    *_live_figures("h_live_runs_w1", "over several connections, one server process"),
    *_live_figures("h_live_runs_w2", "over several connections, --workers 2"),
    FigureSpec(
        "i_short_runs", "server CPU per run", "ms", "lower", _field("server_cpu_ms_per_run")
    ),
    FigureSpec("i_short_runs", "runs/s", "runs/s", "higher", _field("runs_per_s")),
)


@dataclass(frozen=True, slots=True)
class TargetSpec:
    name: str
    workload: str
    value: Callable[[Params, Params], float | None]  # (ceilings, result)
    unit: str
    threshold: float
    at_most: bool  # met when value <= threshold (else >=)
    # The chart compares (value + offset) / (threshold + offset), so an overhead of
    # -5 % (Keel faster than in-process) still has a bar: 1 + overhead vs 1.2.
    offset: float = 0.0
    backends: tuple[str, ...] | None = None  # where it is judged; None: everywhere it ran
    # Ways of running the workload (workload first): on each backend the target is judged
    # on the best of them, the one that meets the most targets of the same ways (then the
    # one closest to meeting its worst one), the same for all those targets.
    variants: tuple[str, ...] = ()


def _events_per_s_share(ceilings: Params, result: Params) -> float | None:
    value = _get(result, "events_per_s")
    ceiling = _get(ceilings, "grpc_one_stream", "messages_per_s")
    return None if value is None or not ceiling else value / ceiling


# Workload h on Redis, each way it runs: its targets take the best ("on Redis with the
# best --workers setting").
H_VARIANTS = ("h_live_runs", "h_live_runs_w1", "h_live_runs_w2")

TARGETS = (
    TargetSpec(
        "Observe from 0 of 10,000 events: time to the last event",
        "d_replay",
        lambda ceilings, result: _get(result, "time_to_last_event_ms"),
        "ms",
        60.0,
        at_most=True,
    ),
    TargetSpec(
        "one run's events/s at the client, share of the raw single-stream gRPC messages/s",
        "a_stream",
        _events_per_s_share,
        "share",
        0.5,
        at_most=False,
    ),
    TargetSpec(
        "p99 fan-out latency, 100 observers",
        "c_fanout",
        lambda ceilings, result: _get(result, "p99_ms"),
        "ms",
        10.0,
        at_most=True,
    ),
    TargetSpec(
        "durability overhead (Keel time / in-process time - 1)",
        "f_overhead",
        lambda ceilings, result: _get(result, "overhead"),
        "share",
        0.20,
        at_most=True,
        offset=1.0,
    ),
    TargetSpec(
        "server CPU per event, 100 runs x 1,000 deltas (b)",
        "b_concurrent",
        lambda ceilings, result: _get(result, "server_cpu_us_per_event"),
        "µs",
        60.0,
        at_most=True,
        backends=("redis",),
    ),
    TargetSpec(
        "server CPU per event, one run of 10,000 deltas (a)",
        "a_stream",
        lambda ceilings, result: _get(result, "server_cpu_us_per_event"),
        "µs",
        45.0,
        at_most=True,
        backends=("redis",),
    ),
    TargetSpec(
        "1,000 live runs, the best way: time until every run ended / the script's duration (h)",
        "h_live_runs",
        lambda ceilings, result: _get(result, "wall_over_scripted"),
        TIMES,
        1.2,
        at_most=True,
        backends=("redis",),
        variants=H_VARIANTS,
    ),
    TargetSpec(
        "1,000 live runs, the best way: delivery delay p99 (h)",
        "h_live_runs",
        lambda ceilings, result: _get(result, "delivery_p99_ms"),
        "ms",
        100.0,
        at_most=True,
        backends=("redis",),
        variants=H_VARIANTS,
    ),
    TargetSpec(
        "1,000 live runs, the best way: server peak RSS, all its processes (h)",
        "h_live_runs",
        lambda ceilings, result: _mb(result),
        "MB",
        400.0,
        at_most=True,
        backends=("redis",),
        variants=H_VARIANTS,
    ),
    TargetSpec(
        "short runs (one delta): server CPU per run (i)",
        "i_short_runs",
        lambda ceilings, result: _get(result, "server_cpu_ms_per_run"),
        "ms",
        3.0,
        at_most=True,
        backends=("redis",),
    ),
)

# Workload b on Redis, each way it ran: the best is held against Mastra's.
B_VARIANTS = ("b_concurrent", "b_concurrent_w1", "b_concurrent_w2")
MASTRA_FACTOR = 1.5


def figures(ceilings: Params, workloads: dict[str, dict[str, Params]]) -> list[Params]:
    rows: list[Params] = []
    for spec in FIGURES:
        per_backend = workloads.get(spec.workload)
        if per_backend is None:
            continue
        row: Params = {
            "workload": spec.workload,
            "figure": spec.name,
            "unit": spec.unit,
            "better": spec.better,
            "ceiling_name": spec.ceiling_name,
            "backends": {},
        }
        for backend, result in per_backend.items():
            if not applies(spec.backends, backend):
                continue
            value = spec.value(result)
            own = _ceilings_on(ceilings, workloads, backend)
            ceiling = spec.ceiling(own, result) if spec.ceiling is not None else None
            ratio = value / ceiling if value is not None and ceiling else None
            efficiency = None
            if ratio:
                efficiency = ratio if spec.better == "higher" else 1 / ratio
            row["backends"][backend] = {
                "value": value,
                "ceiling": ceiling,
                "ratio": ratio,
                "efficiency": efficiency,
                "ok": bool(result.get("ok")),
            }
        rows.append(row)
    return rows


def _judge(spec: TargetSpec, ceilings: Params, result: Params) -> Params:
    """One target on one result: its value, whether it is met, and its cost (value /
    threshold, or the inverse: <= 1 is met, whichever the direction)."""
    value = spec.value(ceilings, result)
    ok = bool(result.get("ok"))
    met = (
        ok
        and value is not None
        and (value <= spec.threshold if spec.at_most else value >= spec.threshold)
    )
    cost = None
    shifted, bound = (value or 0.0) + spec.offset, spec.threshold + spec.offset
    if value is not None and shifted > 0:
        cost = shifted / bound if spec.at_most else bound / shifted
    return {"value": value, "met": met, "ok": ok, "cost": cost}


def best_variant(
    ceilings: Params,
    workloads: dict[str, dict[str, Params]],
    variants: tuple[str, ...],
    backend: str,
) -> str | None:
    """Of the ways a workload ran on `backend` (`variants`), the one its targets are
    judged on: among those that passed their checks, the one meeting the most of the
    targets of these variants, then the one whose worst target is closest to being met;
    if none passed, the first that ran. None if none ran."""
    specs = [spec for spec in TARGETS if spec.variants == variants]
    ran = [key for key in variants if backend in workloads.get(key, {})]

    def score(key: str) -> tuple[int, float]:
        cells = [_judge(spec, ceilings, workloads[key][backend]) for spec in specs]
        costs = [c["cost"] if c["cost"] is not None else math.inf for c in cells]
        return sum(not c["met"] for c in cells), max(costs, default=math.inf)

    passed = [key for key in ran if workloads[key][backend].get("ok")]
    if passed:
        return min(passed, key=score)  # the first of equals: the simplest way
    return ran[0] if ran else None


def targets(
    ceilings: Params, workloads: dict[str, dict[str, Params]], mastra: Params | None = None
) -> list[Params]:
    rows: list[Params] = []
    for spec in TARGETS:
        per_backend = workloads.get(spec.workload)
        if per_backend is None:
            continue
        row: Params = {
            "target": spec.name,
            "workload": spec.workload,
            "unit": spec.unit,
            "threshold": spec.threshold,
            "at_most": spec.at_most,
            "backends": {},
        }
        for backend in per_backend:
            if spec.backends is not None and not applies(spec.backends, backend):
                continue
            own = _ceilings_on(ceilings, workloads, backend)
            which = spec.workload
            if spec.variants:
                which = best_variant(own, workloads, spec.variants, backend) or which
            cell = _judge(spec, own, workloads[which][backend])
            if spec.variants:
                cell["keel"] = which  # the way it was judged on
            row["backends"][backend] = cell
        rows.append(row)
    peer = mastra_target(workloads, mastra) if mastra else None
    if peer is not None:
        rows.append(peer)
    return rows


def best_b(workloads: dict[str, dict[str, Params]]) -> tuple[str, Params] | None:
    """Workload b on Redis the way it went best (one process or --workers N): its key and
    result; None if none passed its checks."""
    done = [
        (key, result)
        for key in B_VARIANTS
        if (result := workloads.get(key, {}).get("redis")) and result.get("ok")
    ]
    return max(done, key=lambda kv: float(kv[1].get("events_per_s", 0.0)), default=None)


def mastra_target(workloads: dict[str, dict[str, Params]], mastra: Params) -> Params | None:
    """Keel's best workload b on Redis against Mastra's concurrent runs (Redis if it ran
    there): aggregate events/s, Keel / Mastra, at least MASTRA_FACTOR."""
    peer = mastra_pick(mastra, "concurrent")
    if peer is None:
        return None
    cache, theirs = peer
    best = best_b(workloads)
    value = None
    which = ""
    if best is not None and theirs.get("events_per_s"):
        which, result = best
        value = float(result["events_per_s"]) / float(theirs["events_per_s"])
    met = value is not None and value >= MASTRA_FACTOR
    return {
        "target": (
            f"{theirs.get('runs')} concurrent runs on Redis, the best of one process and "
            f"--workers: aggregate events/s / Mastra's ({cache} cache)"
        ),
        "workload": "b_concurrent",
        "unit": TIMES,
        "threshold": MASTRA_FACTOR,
        "at_most": False,
        "backends": {
            "redis": {
                "value": value,
                "met": met,
                "ok": best is not None,
                "cost": MASTRA_FACTOR / value if value else None,
                "keel": which,
            }
        },
    }


def mastra_pick(mastra: Params, scenario: str) -> tuple[str, Params] | None:
    """Mastra's result of a scenario, on its Redis cache if it ran there, else memory."""
    per_cache = mastra.get(scenario) or {}
    for cache in ("redis", "memory"):
        if per_cache.get(cache):
            return cache, per_cache[cache]
    return None


# Keel against Mastra, where the two measure the same thing: (what, Keel's workload,
# Keel's field, Mastra's scenario, Mastra's field, better).
MASTRA_COMPARISONS = (
    ("one run: events/s", "a_stream", "events_per_s", "single", "events_per_s", "higher"),
    (
        "one run: CPU per event (µs): Keel's server / Mastra's process",
        "a_stream",
        "server_cpu_us_per_event",
        "single",
        "cpu_us_per_event",
        "lower",
    ),
    (
        "one run: CPU per event (µs): Keel's server + client / Mastra's process",
        "a_stream",
        "_server_and_client_cpu_us_per_event",
        "single",
        "cpu_us_per_event",
        "lower",
    ),
    (
        "concurrent runs: aggregate events/s",
        "b_concurrent",
        "events_per_s",
        "concurrent",
        "events_per_s",
        "higher",
    ),
    (
        "concurrent runs: CPU per event (µs): Keel's server / Mastra's process",
        "b_concurrent",
        "server_cpu_us_per_event",
        "concurrent",
        "cpu_us_per_event",
        "lower",
    ),
    (
        "concurrent runs: CPU per event (µs): Keel's server + client / Mastra's process",
        "b_concurrent",
        "_server_and_client_cpu_us_per_event",
        "concurrent",
        "cpu_us_per_event",
        "lower",
    ),
)


def _keel_value(result: Params, field: str) -> float | None:
    if field == "_server_and_client_cpu_us_per_event":
        server = _get(result, "server_cpu_us_per_event")
        client = _get(result, "client_cpu_us_per_event")
        return None if server is None or client is None else server + client
    return _get(result, field)


def mastra_rows(workloads: dict[str, dict[str, Params]], mastra: Params) -> list[Params]:
    """Keel (memory, Redis, and b's best on Redis) next to Mastra (memory and Redis caches)."""
    rows = []
    for name, workload, field, scenario, peer_field, better in MASTRA_COMPARISONS:
        per_backend = workloads.get(workload, {})
        keel = {
            backend: _keel_value(result, field)
            for backend, result in per_backend.items()
            if backend in ("memory", "redis") and result.get("ok")
        }
        best_is = ""
        if workload == "b_concurrent":
            best = best_b(workloads)
            if best is not None:
                keel["redis_best"] = _keel_value(best[1], field)
                best_is = best[0]
        peer = {
            cache: _get(values, peer_field)
            for cache, values in (mastra.get(scenario) or {}).items()
        }
        ratio = None
        keel_redis = keel.get("redis_best", keel.get("redis"))
        if isinstance(keel_redis, float) and peer.get("redis"):
            ratio = keel_redis / float(peer["redis"] or 1)
        rows.append(
            {
                "name": name,
                "workload": workload,
                "better": better,
                "keel": keel,
                "keel_best_is": best_is,
                "mastra": peer,
                "ratio_redis": ratio,
            }
        )
    return rows


# CPU per event (µs) or per run (ms) of each process, per backend: (workload, what,
# unit, [(process, field), ...]).
CPU_ROWS = (
    ("a_stream", "one run of N deltas", "µs/event", "event"),
    ("b_concurrent", "concurrent runs, one connection", "µs/event", "event"),
    ("b_concurrent_w1", "concurrent runs, a connection each, one process", "µs/event", "event"),
    ("b_concurrent_w2", "concurrent runs, a connection each, --workers", "µs/event", "event"),
    ("f_overhead", "Keel's Stream of the overhead runs", "µs/event", "event"),
    ("h_live_runs", "many live runs at once", "ms/run", "run"),
    ("h_live_runs_w1", "many live runs, several connections, one process", "ms/run", "run"),
    ("h_live_runs_w2", "many live runs, several connections, --workers", "ms/run", "run"),
    ("i_short_runs", "short runs", "ms/run", "run"),
)
CPU_PROCESSES = ("server", "redis", "postgres", "client")


def cpu(workloads: dict[str, dict[str, Params]]) -> list[Params]:
    """The CPU table: per workload and process (Keel server, Redis, client), per backend."""
    rows: list[Params] = []
    for workload, name, unit, per in CPU_ROWS:
        per_backend = workloads.get(workload)
        if per_backend is None:
            continue
        suffix = "us_per_event" if per == "event" else "ms_per_run"
        for process in CPU_PROCESSES:
            values = {
                backend: _get(result, f"{process}_cpu_{suffix}")
                for backend, result in per_backend.items()
            }
            if all(v is None for v in values.values()):
                continue
            rows.append(
                {
                    "workload": workload,
                    "name": name,
                    "process": process,
                    "unit": unit,
                    "backends": values,
                }
            )
        if workload == "f_overhead":
            values = {
                backend: _get(result, "in_process_cpu_us_per_event")
                for backend, result in per_backend.items()
            }
            rows.append(
                {
                    "workload": workload,
                    "name": "the same agent in-process (run_stream_events), its whole process",
                    "process": "in-process",
                    "unit": unit,
                    "backends": values,
                }
            )
    return rows


# The figures of each workers comparison: (what, field or a function of the result,
# which is better).
WorkerRow = tuple[str, str | Callable[[Params], float | None], Better]
B_WORKER_ROWS: tuple[WorkerRow, ...] = (
    ("aggregate events/s", "events_per_s", "higher"),
    ("server CPU per event (µs)", "server_cpu_us_per_event", "lower"),
    ("Redis CPU per event (µs)", "redis_cpu_us_per_event", "lower"),
)
H_WORKER_ROWS: tuple[WorkerRow, ...] = (
    ("time until every run ended / the script's duration", "wall_over_scripted", "lower"),
    ("delivery delay p50 (ms)", "delivery_p50_ms", "lower"),
    ("delivery delay p99 (ms)", "delivery_p99_ms", "lower"),
    ("time until the server admitted every run (s)", "admitted_max_s", "lower"),
    ("server CPU per run (ms)", "server_cpu_ms_per_run", "lower"),
    ("Redis CPU per run (ms)", "redis_cpu_ms_per_run", "lower"),
    ("server peak RSS, all its processes (MB)", _mb, "lower"),
    ("server peak RSS, its largest process (MB)", _mb_max, "lower"),
)


def workers(workloads: dict[str, dict[str, Params]]) -> Params | None:
    """Workload b on Redis in one server process and with --workers N, same client."""
    return _workers(workloads, "b_concurrent_w1", "b_concurrent_w2", B_WORKER_ROWS)


def live_workers(workloads: dict[str, dict[str, Params]]) -> Params | None:
    """Workload h on Redis in one server process and with --workers N, same client."""
    return _workers(workloads, "h_live_runs_w1", "h_live_runs_w2", H_WORKER_ROWS)


def _workers(
    workloads: dict[str, dict[str, Params]],
    one_key: str,
    many_key: str,
    figures: tuple[WorkerRow, ...],
) -> Params | None:
    one = workloads.get(one_key, {}).get("redis")
    many = workloads.get(many_key, {}).get("redis")
    if one is None and many is None:
        return None
    rows = []
    for name, field, better in figures:
        value = field if callable(field) else _field(field)
        a = value(one) if one and one.get("ok") else None
        b = value(many) if many and many.get("ok") else None
        rows.append(
            {
                "name": name,
                "better": better,
                "one": a,
                "many": b,
                "ratio": b / a if a and b is not None else None,
            }
        )
    shape = many if many and many.get("ok") else one or {}
    failed = [
        f"{key}: {error}"
        for key, result in ((one_key, one), (many_key, many))
        if result and not result.get("ok") and not result.get("skipped")
        for error in result.get("errors") or ["failed its checks"]
    ]
    return {
        "one": one_key,
        "many": many_key,
        "workers": (many or {}).get("server_workers"),
        "runs": shape.get("runs"),
        # b: "channels" (its one client's); h: "connections" (over its client processes)
        "connections": shape.get("connections", shape.get("channels")),
        "skipped": (many or {}).get("skipped"),
        "errors": failed,
        # How the work spread over the server's processes (largest first; the parent
        # runs no server).
        "cpu_by_process_s": (many or {}).get("server_cpu_s_by_process"),
        # Each process's peak RSS, the parent first.
        "peak_rss_by_process_kib": (many or {}).get("server_peak_rss_kib_by_process"),
        "rows": rows,
    }


# The Temporal executor against the local one on the same store (Redis), same run:
# (workload, what, path of the value, which is better).
EXECUTOR_COMPARISONS = (
    ("a_stream", "one run: events/s at the client", ("events_per_s",), "higher"),
    ("a_stream", "one run: time to first event (ms)", ("time_to_first_event_ms",), "lower"),
    ("b_concurrent", "concurrent runs: aggregate events/s", ("events_per_s",), "higher"),
    ("f_overhead", "time to the last event (s)", ("keel_s",), "lower"),
    ("a_stream", "one run: server CPU per event (µs)", ("server_cpu_us_per_event",), "lower"),
    (
        "b_concurrent",
        "concurrent runs: server CPU per event (µs)",
        ("server_cpu_us_per_event",),
        "lower",
    ),
    ("f_overhead", "server CPU per event (µs)", ("server_cpu_us_per_event",), "lower"),
)


def executors(workloads: dict[str, dict[str, Params]]) -> list[Params]:
    """Temporal vs local (both on Redis): each value, and temporal / local."""
    rows = []
    for workload, name, path, better in EXECUTOR_COMPARISONS:
        per_backend = workloads.get(workload, {})
        local = _get(per_backend.get("redis", {}), *path)
        temporal = _get(per_backend.get("temporal", {}), *path)
        if local is None and temporal is None:
            continue
        ratio = temporal / local if local and temporal is not None else None
        rows.append(
            {
                "workload": workload,
                "name": name,
                "better": better,
                "local": local,
                "temporal": temporal,
                "ratio": ratio,
            }
        )
    return rows


# The raw Redis ceilings the stores table shows for each store: (what, its key).
STORE_CEILINGS = (
    ("raw Lua append, 1 event per call, 1 call at a time", "lua_append_one"),
    ("raw Lua append, 1 event per call, 100 calls pipelined", "lua_append_pipelined_100"),
    ("raw Lua append, 100 events per call, 1 call at a time", "lua_append_batch_100"),
)


def stores(
    ceilings: Params,
    workloads: dict[str, dict[str, Params]],
    figure_rows: list[Params],
    described: Params | None = None,
) -> Params | None:
    """The same workloads on each Redis store (plain, AOF, cluster), same run: each store's
    raw Redis ceilings, then each figure of a workload that ran on a variant (value, ratio
    to its ceiling) and Redis's CPU per event; `vs_redis`: the value / plain Redis's.
    None if no variant ran."""
    present = [b for b in REDIS_VARIANTS if any(b in per for per in workloads.values())]
    if not present:
        return None
    names = ["redis", *present] if any("redis" in per for per in workloads.values()) else present
    rows: list[Params] = []
    for name, key in STORE_CEILINGS:
        cells = {}
        for backend in names:
            own = ceilings.get("redis" if backend == "redis" else f"redis@{backend}") or {}
            value = _get(own, key, "events_per_s")
            cells[backend] = {"value": value, "ratio": None}
        rows.append(
            {
                "workload": "",
                "figure": name,
                "unit": "events/s",
                "better": "higher",
                "ceiling_name": "",
                "backends": cells,
            }
        )
    measured = {key for key, per in workloads.items() if any(b in per for b in present)}
    for key in [k for k in workloads if k in measured]:
        for row in figure_rows:
            if row["workload"] != key:
                continue
            cells = {
                b: {"value": c["value"], "ratio": c["ratio"], "ok": c["ok"]}
                for b, c in row["backends"].items()
                if b in names
            }
            rows.append({**{k: v for k, v in row.items() if k != "backends"}, "backends": cells})
        redis_cpu = {
            b: {"value": _get(result, "redis_cpu_us_per_event"), "ratio": None}
            for b, result in workloads[key].items()
            if b in names
        }
        if any(cell["value"] is not None for cell in redis_cpu.values()):
            rows.append(
                {
                    "workload": key,
                    "figure": "Redis CPU per event (all its nodes)",
                    "unit": "µs",
                    "better": "lower",
                    "ceiling_name": "",
                    "backends": redis_cpu,
                }
            )
    for row in rows:
        plain = (row["backends"].get("redis") or {}).get("value")
        for cell in row["backends"].values():
            value = cell["value"]
            cell["vs_redis"] = value / plain if value is not None and plain else None
    return {"stores": names, "described": described or {}, "rows": rows}


def derive(results: Params) -> Params:
    """The run's figures, targets and tables from its raw results (and its `mastra`)."""
    ceilings, workloads = results["ceilings"], results["workloads"]
    mastra = results.get("mastra")
    figure_rows = figures(ceilings, workloads)
    return {
        "figures": figure_rows,
        "stores_table": stores(ceilings, workloads, figure_rows, results.get("stores")),
        "targets": targets(ceilings, workloads, mastra),
        "executors": executors(workloads),
        "cpu": cpu(workloads),
        "workers": workers(workloads),
        "live_workers": live_workers(workloads),
        "mastra_rows": mastra_rows(workloads, mastra) if mastra else [],
    }


def before(baseline: Params, source: str, mastra: Params | None) -> Params:
    """A previous run (its latest.json) analysed as this one: the "before" of each figure.

    Its raw results go through this code, so figures it did not have yet stay
    empty rather than wrong; Mastra's figures are this run's.
    """
    derived = derive({**baseline, "mastra": mastra})
    machine = baseline.get("machine", {})
    return {
        "source": source,
        "started_at": baseline.get("started_at"),
        "mode": baseline.get("mode"),
        "keel_commit": machine.get("keel_commit"),
        "load_average": machine.get("load_average", {}),
        **{
            key: derived[key]
            for key in ("figures", "targets", "executors", "cpu", "workers", "live_workers")
        },
    }
