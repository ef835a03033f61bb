"""From raw results to figures (Keel value, ceiling, ratio) and the issue's four targets.

Every ratio is Keel's value divided by its ceiling's, in the figure's own
unit. For a figure where higher is better (events/s) a ratio of 0.4 means
Keel reaches 40 % of the ceiling; where lower is better (ms) a ratio of 3
means Keel takes three times the ceiling's time. `efficiency` folds both
into one scale (1.0 = as good as the ceiling, higher is better) for charts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

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


FIGURES = (
    FigureSpec(
        "a_stream",
        "events/s at the client",
        "events/s",
        "higher",
        _field("events_per_s"),
        "raw gRPC, 1 stream, 1 event per message: messages/s",
        _ceiling("grpc_one_stream", "messages_per_s"),
        WITH_TEMPORAL,
    ),
    FigureSpec(
        "a_stream",
        "time to first event",
        "ms",
        "lower",
        _field("time_to_first_event_ms"),
        "raw gRPC, 1 stream: time to first message",
        _ceiling("grpc_one_stream", "time_to_first_ms"),
        WITH_TEMPORAL,
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
        "b_concurrent",
        "aggregate events/s",
        "events/s",
        "higher",
        _field("events_per_s"),
        "raw gRPC, as many streams, 1 event per message: messages/s",
        _ceiling("grpc_many_streams", "messages_per_s"),
        WITH_TEMPORAL,
    ),
    FigureSpec("b_concurrent", "server peak RSS", "MiB", "lower", _mib),
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


def _events_per_s_share(ceilings: Params, result: Params) -> float | None:
    value = _get(result, "events_per_s")
    ceiling = _get(ceilings, "grpc_one_stream", "messages_per_s")
    return None if value is None or not ceiling else value / ceiling


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
)


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
            if backend not in spec.backends:
                continue
            value = spec.value(result)
            ceiling = spec.ceiling(ceilings, result) if spec.ceiling is not None else None
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


def targets(ceilings: Params, workloads: dict[str, dict[str, Params]]) -> list[Params]:
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
        for backend, result in per_backend.items():
            value = spec.value(ceilings, result)
            ok = bool(result.get("ok"))
            met = (
                ok
                and value is not None
                and (value <= spec.threshold if spec.at_most else value >= spec.threshold)
            )
            # How far from the target: <= 1 is met, whichever the direction.
            cost = None
            shifted, bound = (value or 0.0) + spec.offset, spec.threshold + spec.offset
            if value is not None and shifted > 0:
                cost = shifted / bound if spec.at_most else bound / shifted
            row["backends"][backend] = {"value": value, "met": met, "ok": ok, "cost": cost}
        rows.append(row)
    return rows


# The Temporal executor against the local one on the same store (Redis), same run:
# (workload, what, path of the value, which is better).
EXECUTOR_COMPARISONS = (
    ("a_stream", "one run: events/s at the client", ("events_per_s",), "higher"),
    ("a_stream", "one run: time to first event (ms)", ("time_to_first_event_ms",), "lower"),
    ("b_concurrent", "concurrent runs: aggregate events/s", ("events_per_s",), "higher"),
    ("f_overhead", "time to the last event (s)", ("keel_s",), "lower"),
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
