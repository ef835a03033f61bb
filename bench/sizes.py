"""How big each workload and ceiling is: the full benchmark, and the quick one CI runs.

Every load is bounded in count: a workload ends when its runs end, and
the runner gives each client process a deadline on top (CLIENT_TIMEOUT_S).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sizes:
    """The counts of one benchmark mode. Times are in ms or s as their names say."""

    # a. one run of N text deltas through Stream, repeated
    stream_deltas: int
    stream_reps: int
    # b. concurrent runs through Stream
    many_runs: int
    many_deltas: int
    # c. one run at ~100 events/s, watched by many observers
    fanout_observers: int
    fanout_events: int
    fanout_interval_ms: int
    # d. Observe from 0 of a finished run, repeated
    replay_deltas: int
    replay_reps: int
    # e. observers rejoining a live run at random offsets at once
    rejoin_observers: int
    rejoin_history: int  # deltas streamed at full speed first (the history to catch up on)
    rejoin_tail: int  # then deltas at rejoin_interval_ms each (the live part)
    rejoin_interval_ms: int
    rejoin_before_s: float  # the producer's rate is measured this long before the rejoin
    # f. durability overhead: the same agent in-process and through Keel, alternated
    overhead_deltas: int
    overhead_reps: int
    # g. background tasks of tasks_ms each, under a global limit, made by tasks_runs runs
    tasks_count: int
    tasks_ms: int
    tasks_limit: int
    tasks_runs: int
    # h. many live runs at once: each its own Stream, live_deltas deltas live_delay_ms apart,
    # from live_clients client processes of live_channels connections each
    live_runs: int
    live_deltas: int
    live_delay_ms: int
    live_clients: int
    live_channels: int
    # i. many short runs of short_deltas deltas, short_parallel at a time
    short_runs: int
    short_deltas: int
    short_parallel: int
    # b with the server started with `--workers N` (on Redis), and without, both with the
    # runs spread over compare_channels connections (a connection goes to one worker)
    compare_workers: int
    compare_channels: int
    # h the same way: one server process and `--workers compare_workers`, on Redis, the
    # runs spread round robin over live_compare_channels connections
    live_compare_channels: int
    # ceilings
    grpc_messages: int  # on one stream
    grpc_streams: int  # concurrent streams of grpc_stream_messages each
    grpc_stream_messages: int
    ceiling_reps: int
    redis_events: int  # events appended per Lua append variant
    # one Keel server per (workload, backend); otherwise one per backend for all
    fresh_server_per_workload: bool


FULL = Sizes(
    stream_deltas=10_000,
    stream_reps=3,
    many_runs=100,
    many_deltas=1_000,
    fanout_observers=100,
    fanout_events=600,
    fanout_interval_ms=10,
    replay_deltas=10_000,
    replay_reps=7,
    rejoin_observers=200,
    rejoin_history=10_000,
    rejoin_tail=800,
    rejoin_interval_ms=10,
    rejoin_before_s=2.0,
    overhead_deltas=10_000,
    overhead_reps=3,
    tasks_count=200,
    tasks_ms=100,
    tasks_limit=20,
    tasks_runs=10,
    live_runs=1_000,
    live_deltas=10,
    live_delay_ms=500,
    live_clients=1,
    live_channels=1,
    short_runs=500,
    short_deltas=1,
    short_parallel=50,
    compare_workers=2,
    compare_channels=100,
    live_compare_channels=16,
    grpc_messages=10_000,
    grpc_streams=100,
    grpc_stream_messages=1_000,
    ceiling_reps=3,
    redis_events=10_000,
    fresh_server_per_workload=True,
)

QUICK = Sizes(
    stream_deltas=500,
    stream_reps=1,
    many_runs=5,
    many_deltas=100,
    fanout_observers=5,
    fanout_events=60,
    fanout_interval_ms=10,
    replay_deltas=500,
    replay_reps=2,
    rejoin_observers=5,
    rejoin_history=300,
    rejoin_tail=60,
    rejoin_interval_ms=10,
    rejoin_before_s=0.2,
    overhead_deltas=300,
    overhead_reps=1,
    tasks_count=20,
    tasks_ms=50,
    tasks_limit=4,
    tasks_runs=2,
    live_runs=20,
    live_deltas=3,
    live_delay_ms=50,
    live_clients=1,
    live_channels=1,
    short_runs=20,
    short_deltas=1,
    short_parallel=5,
    compare_workers=2,
    compare_channels=5,
    live_compare_channels=4,
    grpc_messages=500,
    grpc_streams=5,
    grpc_stream_messages=100,
    ceiling_reps=1,
    redis_events=500,
    fresh_server_per_workload=False,
)

# A client process that has not reported by then is killed and its workload fails.
CLIENT_TIMEOUT_S = 180.0
