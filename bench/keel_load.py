"""The Keel workloads' client side (a-f, h, i): each runs in a client process of its own.

Every function takes its params (JSON) and returns a JSON-able dict. The
clients use the generated stubs directly, not keel_client's resuming
wrapper, so the numbers are the server's. Each checks what it received
(dense indices from the requested offset to a terminal event) and reports
`ok`, so a fast but wrong server never passes for a fast one.

Clocks: durations use time.perf_counter_ns(); latencies compare an event's
`time` (stamped by the server's EventWriter.emit, wall clock) with
time.time_ns() when the client's gRPC iterator hands over the response
carrying it; both processes read the same machine clock.

CPU: the runner passes the Keel server's process ids (`server_pids`: the
server, on temporal also its worker; their descendants count too, so a
server's `--workers` are included), Redis's (`redis_pids`: every node of a
cluster) and PostgreSQL's (`postgres_pids`: the postmaster, whose children are
its backends). A client reads their CPU time from /proc right before and right
after each measured part (not the warm-up), and its own by
time.process_time(), and divides by the events (or runs) the measured part
delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from bench.cpu import Meter
from bench.stats import latency_summary_ms, median, percentile, spread

Params = dict[str, Any]
AGENT = "scripted"
WARM_UP_DELTAS = 100
TERMINAL = frozenset({"finish", "error", "abort"})


def text_script(*steps: tuple[int, int]) -> str:
    """The scripted agent's input: text steps of (deltas, delay_ms)."""
    return json.dumps({"steps": [{"text": n, "delay_ms": d} for n, d in steps]})


@dataclass
class Received:
    """What one stream delivered, checked as it arrives."""

    offset: int
    start_ns: int = field(default_factory=time.perf_counter_ns)
    snapshot_ns: int = 0
    first_event_ns: int = 0
    last_event_ns: int = 0
    messages: int = 0  # messages carrying events
    events: int = 0
    run_id: str = ""  # from the snapshot
    next_index: int = -1  # the index expected next; -1 before the first event
    in_order: bool = True
    terminal: bool = False
    error: str = ""  # the gRPC status the stream ended with, if not OK

    def take(self, response: Any) -> None:
        now = time.perf_counter_ns()
        kind = response.WhichOneof("kind")
        if kind == "snapshot":
            self.snapshot_ns = self.snapshot_ns or now
            self.run_id = response.snapshot.run.run_id
            return
        if kind != "events":
            return
        batch = response.events.events
        self.messages += 1
        self.events += len(batch)
        self.first_event_ns = self.first_event_ns or now
        self.last_event_ns = now
        expected = self.offset if self.next_index < 0 else self.next_index
        if batch[0].index != expected:
            self.in_order = False
        self.next_index = batch[-1].index + 1
        if batch[-1].WhichOneof("payload") in TERMINAL:
            self.terminal = True

    def fail(self, exc: grpc.aio.AioRpcError) -> None:
        elapsed_s = (time.perf_counter_ns() - self.start_ns) / 1e9
        self.error = (
            f"{exc.code().name} after {elapsed_s:.1f}s, {self.events} events: {exc.details()}"
        )

    @property
    def ok(self) -> bool:
        """Every event from the offset to a terminal one, once and in order."""
        return (
            not self.error
            and self.in_order
            and self.terminal
            and self.events == self.next_index - self.offset
        )

    def summary(self) -> Params:
        total_s = (self.last_event_ns - self.start_ns) / 1e9
        return {
            "ok": self.ok,
            "events": self.events,
            "messages": self.messages,
            "events_per_message": self.events / max(1, self.messages),
            "time_to_snapshot_ms": (self.snapshot_ns - self.start_ns) / 1e6,
            "time_to_first_event_ms": (self.first_event_ns - self.start_ns) / 1e6,
            "time_to_last_event_ms": total_s * 1000,
            "events_per_s": self.events / total_s if total_s > 0 else 0.0,
            "error": self.error,
        }


async def _stream(stub: Any, script: str) -> Received:
    """Start a run with Stream and read it to its terminal event."""
    received = Received(offset=0)
    try:
        async for response in stub.Stream(pb.StreamRequest(agent_id=AGENT, input=script)):
            received.take(response)
    except grpc.aio.AioRpcError as exc:
        received.fail(exc)
    return received


# Called with each response of an observed stream, after it was checked.
OnResponse = Callable[[Received, Any], None]


async def _observe(
    stub: Any, run_id: str, offset: int, on_response: OnResponse | None = None
) -> Received:
    received = Received(offset=offset)
    try:
        async for response in stub.Observe(pb.ObserveRequest(run_id=run_id, offset=offset)):
            received.take(response)
            if on_response is not None:
                on_response(received, response)
    except grpc.aio.AioRpcError as exc:
        received.fail(exc)
    return received


def _errors(results: list[Received]) -> list[str]:
    """The distinct errors streams ended with (at most 5), for the report."""
    return sorted({r.error for r in results if r.error})[:5]


@contextlib.asynccontextmanager
async def _keel(target: str) -> AsyncIterator[Any]:
    """A stub on a connected channel to a warmed-up server.

    The warm-up run (100 deltas, not measured) pays for what a fresh server
    and client do once: lazy imports, pydantic-ai's first run, the first
    HTTP/2 stream.
    """
    async with grpc.aio.insecure_channel(target) as channel:
        await channel.channel_ready()
        stub = pb_grpc.AgentServiceStub(channel)
        warm_up = await _stream(stub, text_script((WARM_UP_DELTAS, 0)))
        if not warm_up.ok:
            raise RuntimeError(f"the warm-up run failed: {warm_up.error or 'a gap'}")
        yield stub


@contextlib.asynccontextmanager
async def _channels(params: Params, first: Any) -> AsyncIterator[list[Any]]:
    """`first` (the warmed-up stub) and stubs on `channels` - 1 more connections.

    Each channel gets a subchannel pool of its own, so it opens a connection
    of its own (grpc shares one between channels to the same target otherwise).
    """
    stubs = [first]
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(max(1, int(params.get("channels", 1))) - 1):
            channel = await stack.enter_async_context(
                grpc.aio.insecure_channel(
                    params["target"], options=[("grpc.use_local_subchannel_pool", 1)]
                )
            )
            await channel.channel_ready()
            stubs.append(pb_grpc.AgentServiceStub(channel))
        # A run of one delta on each: with --workers, every worker has served a run.
        warm_ups = await asyncio.gather(*(_stream(s, text_script((1, 0))) for s in stubs[1:]))
        if not all(w.ok for w in warm_ups):
            raise RuntimeError(f"a warm-up run failed: {_errors(warm_ups)}")
        yield stubs


# -- CPU ----------------------------------------------------------------------------


@dataclass
class Cpu:
    """The CPU of the server, its store (Redis or PostgreSQL) and this client over the
    measured windows."""

    server: Meter | None
    redis: Meter | None
    client: Meter = field(default_factory=Meter)
    postgres: Meter | None = None

    @classmethod
    def of(cls, params: Params) -> Cpu:
        pids = tuple(int(pid) for pid in params.get("server_pids", ()))
        redis_pids = tuple(int(pid) for pid in params.get("redis_pids", ()))
        postgres_pids = tuple(int(pid) for pid in params.get("postgres_pids", ()))
        return cls(
            server=Meter(pids) if pids else None,
            redis=Meter(redis_pids) if redis_pids else None,
            postgres=Meter(postgres_pids) if postgres_pids else None,
        )

    def _meters(self) -> list[Meter]:
        return [m for m in (self.server, self.redis, self.postgres, self.client) if m is not None]

    @contextlib.contextmanager
    def window(self) -> Iterator[None]:
        for meter in self._meters():
            meter.start()
        try:
            yield
        finally:
            for meter in self._meters():
                meter.stop()

    def per(self, count: int, unit: str = "event", scale: float = 1e6) -> Params:
        """CPU seconds of each process, and per `unit` (µs with the default scale)."""
        suffix = "us" if scale == 1e6 else "ms"
        result: Params = {}
        meters = (
            ("server", self.server),
            ("redis", self.redis),
            ("postgres", self.postgres),
            ("client", self.client),
        )
        for name, meter in meters:
            if meter is None:
                continue
            result[f"{name}_cpu_s"] = meter.total_s
            result[f"{name}_cpu_{suffix}_per_{unit}"] = (
                meter.total_s * scale / count if count else math.nan
            )
        return result


# -- a. one run through Stream ----------------------------------------------------


async def stream_one(params: Params) -> Params:
    """One run of `deltas` text deltas through Stream, `reps` times: events/s, first event."""
    script = text_script((int(params["deltas"]), 0))
    cpu = Cpu.of(params)
    reps: list[Params] = []
    async with _keel(params["target"]) as stub:
        for _ in range(int(params["reps"])):
            with cpu.window():
                received = await _stream(stub, script)
            reps.append(received.summary())
    return {
        "ok": all(r["ok"] for r in reps),
        "events": reps[0]["events"],
        **cpu.per(sum(r["events"] for r in reps)),
        "events_per_s": median([r["events_per_s"] for r in reps]),
        "time_to_first_event_ms": median([r["time_to_first_event_ms"] for r in reps]),
        "events_per_message": median([r["events_per_message"] for r in reps]),
        "events_per_s_spread": spread([r["events_per_s"] for r in reps]),
        "reps": reps,
    }


# -- b. concurrent runs -----------------------------------------------------------


async def stream_many(params: Params) -> Params:
    """`runs` concurrent runs of `deltas` deltas through Stream: aggregate events/s.

    The streams share one connection, or spread over `channels` connections
    (round robin): a server with `--workers` gets each connection to one worker.
    """
    script = text_script((int(params["deltas"]), 0))
    cpu = Cpu.of(params)
    count = int(params["runs"])
    async with _keel(params["target"]) as first, _channels(params, first) as stubs:
        with cpu.window():
            start_ns = time.perf_counter_ns()
            runs = await asyncio.gather(
                *(_stream(stubs[i % len(stubs)], script) for i in range(count))
            )
    total_s = (max(r.last_event_ns for r in runs) - start_ns) / 1e9
    events = sum(r.events for r in runs)
    run_s = [(r.last_event_ns - start_ns) / 1e9 for r in runs]
    # How long the server took to admit each Stream (its snapshot): under load
    # grpc.aio accepts new calls slowly, and grpc cancels a call left
    # unaccepted for 30 s (grpc.server_max_unrequested_time_in_server).
    admitted_s = [(r.snapshot_ns - start_ns) / 1e9 for r in runs if r.snapshot_ns]
    return {
        "ok": all(r.ok for r in runs),
        "runs": len(runs),
        "events": events,
        "total_s": total_s,
        "events_per_s": events / total_s,
        **cpu.per(events),
        "run_time_p50_s": percentile(run_s, 50),
        "run_time_max_s": max(run_s),
        "time_to_snapshot_p50_s": percentile(admitted_s, 50),
        "time_to_snapshot_max_s": max(admitted_s, default=math.nan),
        "events_per_message": events / max(1, sum(r.messages for r in runs)),
        "channels": len(stubs),
        "failed": sum(not r.ok for r in runs),
        "errors": _errors(runs),
    }


# -- c. live fan-out latency --------------------------------------------------------


async def fanout(params: Params) -> Params:
    """One run at one event per `interval_ms`, `observers` Observe streams from offset 0.

    Latency = client receive time - the event's `time`. Only events stamped
    200 ms after the last observer got its snapshot count, so every sample is
    from the live path, not the catch-up read.
    """
    observers = int(params["observers"])
    script = text_script((int(params["events"]), int(params["interval_ms"])))
    samples: list[tuple[int, int]] = []  # (event time, latency), ns
    snapshots: list[int] = []

    def sample(received: Received, response: Any) -> None:
        now = time.time_ns()
        if response.WhichOneof("kind") == "snapshot":
            snapshots.append(now)
        for event in response.events.events:
            stamped = event.time.ToNanoseconds()
            samples.append((stamped, now - stamped))

    async with _keel(params["target"]) as stub:
        run = (await stub.StartRun(pb.StartRunRequest(agent_id=AGENT, input=script))).run
        results = await asyncio.gather(
            *(_observe(stub, run.run_id, 0, sample) for _ in range(observers))
        )
    if not snapshots:
        return {"ok": False, "errors": _errors(results)}
    measure_from = max(snapshots) + 200_000_000
    latencies = [latency for stamped, latency in samples if stamped >= measure_from]
    times = sorted({stamped for stamped, _ in samples if stamped >= measure_from})
    span_s = (times[-1] - times[0]) / 1e9 if len(times) > 1 else 0.0
    return {
        "ok": all(r.ok for r in results) and bool(latencies),
        "observers": observers,
        "intended_events_per_s": 1000 / int(params["interval_ms"]),
        "producer_events_per_s": (len(times) - 1) / span_s if span_s else 0.0,
        "events_per_message": median([r.events / max(1, r.messages) for r in results]),
        **latency_summary_ms(latencies),
        "errors": _errors(results),
    }


# -- d. Observe from 0 of a finished run ----------------------------------------------


async def replay(params: Params) -> Params:
    """Stream a run of `deltas` deltas to its end, then Observe it from 0, `reps` times."""
    script = text_script((int(params["deltas"]), 0))
    async with _keel(params["target"]) as stub:
        streamed = await _stream(stub, script)
        run_id = streamed.run_id
        reps = [(await _observe(stub, run_id, 0)).summary() for _ in range(int(params["reps"]))]
    times = [r["time_to_last_event_ms"] for r in reps]
    return {
        "ok": streamed.ok and all(r["ok"] for r in reps),
        "events": reps[0]["events"],
        "messages": reps[0]["messages"],
        "time_to_last_event_ms": median(times),
        "first_replay_ms": times[0],
        "time_to_snapshot_ms": median([r["time_to_snapshot_ms"] for r in reps]),
        "time_to_last_event_ms_spread": spread(times),
        "reps": reps,
    }


# -- e. observers rejoining a live run at once ------------------------------------------


async def rejoin(params: Params) -> Params:
    """`observers` Observe a live run at random offsets at once; the producer's rate around it.

    The run streams `history` deltas at full speed, then `tail` deltas one
    per `interval_ms`. `before_s` into the tail, every observer joins at a
    random offset in [0, head]; each is caught up once it has received the
    event that was the head when it joined. The producer's rate comes from
    the events' `time` stamps (read back at the end): before = the `before_s`
    ahead of the rejoin, during = from the rejoin until the last observer
    caught up, but at least `before_s` (and at most until the run ended);
    after = the `before_s` after that, when every observer follows live.
    """
    history, tail = int(params["history"]), int(params["tail"])
    observers, before_s = int(params["observers"]), float(params["before_s"])
    script = text_script((history, 0), (tail, int(params["interval_ms"])))
    rng = random.Random(int(params.get("seed", 1)))
    async with _keel(params["target"]) as stub:
        run = (await stub.StartRun(pb.StartRunRequest(agent_id=AGENT, input=script))).run
        await _wait_for_event(stub, run.run_id, history + 2)  # the live tail has begun
        await asyncio.sleep(before_s)
        head = await _head(stub, run.run_id)
        join_ns = time.time_ns()
        offsets = [rng.randint(0, head) for _ in range(observers)]
        caught_up_ns: dict[int, int] = {}  # id(Received) -> when it first held the head

        def watch(received: Received, response: Any) -> None:
            if received.next_index >= head and id(received) not in caught_up_ns:
                caught_up_ns[id(received)] = time.time_ns()

        results = await asyncio.gather(
            *(_observe(stub, run.run_id, offset, watch) for offset in offsets)
        )
        times = await _event_times(stub, run.run_id)
    last_caught_up_ns = max(caught_up_ns.values(), default=join_ns)
    before_ns = int(before_s * 1e9)
    end_ns = min(max(last_caught_up_ns, join_ns + before_ns), times[-1])
    before = _rate(times, join_ns - before_ns, join_ns)
    during = _rate(times, join_ns, end_ns) if end_ns > join_ns else before
    # After: every observer follows live. Against "during" it tells the cost of
    # the catch-up storm apart from the steady cost of fanning out to them all.
    after_end_ns = min(last_caught_up_ns + before_ns, times[-1])
    after = (
        _rate(times, last_caught_up_ns, after_end_ns) if after_end_ns > last_caught_up_ns else {}
    )
    catch_up_s = [(t - join_ns) / 1e9 for t in caught_up_ns.values()]
    return {
        "ok": all(r.ok for r in results) and len(caught_up_ns) == observers,
        "observers": observers,
        "completed": sum(r.ok for r in results),
        "head_at_join": head,
        "events_replayed": sum(max(0, head - o) for o in offsets),
        "producer_events_per_s_before": before["events_per_s"],
        "producer_events_per_s_during": during["events_per_s"],
        "during_window_s": (end_ns - join_ns) / 1e9,
        "producer_rate_ratio": during["events_per_s"] / before["events_per_s"]
        if before["events_per_s"]
        else 0.0,
        "producer_events_per_s_after": after.get("events_per_s", math.nan),
        "producer_max_gap_ms_before": before["max_gap_ms"],
        "producer_max_gap_ms_during": during["max_gap_ms"],
        "producer_max_gap_ms_after": after.get("max_gap_ms", math.nan),
        "all_caught_up_s": max(catch_up_s) if catch_up_s else 0.0,
        "catch_up_p50_s": percentile(catch_up_s, 50),
        "caught_up_before_run_end": last_caught_up_ns <= times[-1],
        "errors": _errors(results),
    }


async def _wait_for_event(stub: Any, run_id: str, index: int) -> None:
    """Until the run has an event `index` (Observe from there waits for it)."""
    call = stub.Observe(pb.ObserveRequest(run_id=run_id, offset=index))
    async for response in call:
        if response.WhichOneof("kind") == "events":
            break
    call.cancel()


async def _head(stub: Any, run_id: str) -> int:
    run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run
    return int(run.next_offset)


async def _event_times(stub: Any, run_id: str) -> list[int]:
    times: list[int] = []

    def collect(received: Received, response: Any) -> None:
        times.extend(e.time.ToNanoseconds() for e in response.events.events)

    await _observe(stub, run_id, 0, collect)
    return times or [0]


def _rate(times: list[int], start_ns: int, end_ns: int) -> dict[str, float]:
    """Events stamped in [start, end) per second, and the longest pause between two of them."""
    inside = [t for t in times if start_ns <= t < end_ns]
    gaps = [b - a for a, b in itertools.pairwise(inside)]
    return {
        "events_per_s": len(inside) / ((end_ns - start_ns) / 1e9),
        "max_gap_ms": max(gaps) / 1e6 if gaps else 0.0,
    }


# -- f. durability overhead ----------------------------------------------------------


class _NoCounters:
    """The scripted agent's counter store; a text-only script never calls it."""

    async def incr_counter(self, run_id: str, key: str, **options: Any) -> int:
        raise AssertionError("a text-only script calls no tool")


async def overhead(params: Params) -> Params:
    """The same scripted agent: pydantic-ai's run_stream_events in this process vs Keel's Stream.

    Both times run from the start to the consumer holding the last event.
    The two are alternated `reps` times and compared by their medians.
    """
    # Imported here: only this client needs pydantic-ai (a 2 s import).
    from server.agents.testing import build_scripted_agent
    from server.agents.types import RunInfo

    script = text_script((int(params["deltas"]), 0))
    agent = build_scripted_agent()
    info = RunInfo(run_id="bench", counters=_NoCounters())

    async def in_process(script: str) -> int:
        count = 0
        async with agent.run_stream_events(script, deps=info) as events:
            async for _event in events:
                count += 1
        return count

    in_process_s: list[float] = []
    in_process_events: list[int] = []
    in_process_cpu = Meter()  # this process: the agent and its consumer, its whole cost
    cpu = Cpu.of(params)
    keel: list[Params] = []
    await in_process(text_script((WARM_UP_DELTAS, 0)))  # as _keel warms the server up
    async with _keel(params["target"]) as stub:
        for _ in range(int(params["reps"])):
            in_process_cpu.start()
            start = time.perf_counter_ns()
            in_process_events.append(await in_process(script))
            in_process_s.append((time.perf_counter_ns() - start) / 1e9)
            in_process_cpu.stop()
            with cpu.window():
                keel.append((await _stream(stub, script)).summary())
    keel_s = [r["time_to_last_event_ms"] / 1000 for r in keel]
    produced = sum(in_process_events)
    return {
        "ok": all(r["ok"] for r in keel),
        "in_process_s": median(in_process_s),
        "in_process_events": in_process_events[-1],
        "in_process_cpu_s": in_process_cpu.total_s,
        "in_process_cpu_us_per_event": in_process_cpu.total_s * 1e6 / produced
        if produced
        else math.nan,
        "keel_s": median(keel_s),
        "keel_events": keel[0]["events"],
        **cpu.per(sum(r["events"] for r in keel)),
        "overhead": median(keel_s) / median(in_process_s) - 1,
        "in_process_s_spread": spread(in_process_s),
        "keel_s_spread": spread(keel_s),
    }


# -- h. many live runs ------------------------------------------------------------------


async def _barrier(params: Params) -> None:
    """With `barrier`: say "ready" and wait for the runner's "go" (on stdin).

    The runner starts every client process of a workload, waits until each
    is connected and warmed up, reads the server's CPU, then lets them all go
    at once.
    """
    if not params.get("barrier"):
        return
    print("ready", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        raise RuntimeError(f"expected go from the runner, got {line!r}")


async def live_runs(params: Params) -> Params:
    """`runs` concurrent live runs, each its own Stream, each `deltas` deltas `delay_ms` apart.

    Delivery delay: the client's receive time (time.time_ns() when the gRPC
    iterator hands over the response) minus the event's `time`, for every
    event of every run. Wall: from "go" to the last run's terminal event, in
    wall-clock ns, so the runner can merge client processes. The streams
    spread over `channels` connections, round robin (a server with
    `--workers` gets each connection, with all its streams, to one worker).
    The client's own CPU time over the same window says whether the client
    kept up.
    """
    runs = int(params["runs"])
    script = text_script((int(params["deltas"]), int(params["delay_ms"])))
    delays_ns: list[int] = []
    ends_ns: list[int] = []
    admitted_ns: list[int] = []  # when each Stream's snapshot came (the run exists)

    async def one(stub: Any) -> Received:
        received = Received(offset=0)
        try:
            async for response in stub.Stream(pb.StreamRequest(agent_id=AGENT, input=script)):
                now = time.time_ns()
                received.take(response)
                if response.WhichOneof("kind") == "snapshot":
                    admitted_ns.append(now)
                for event in response.events.events:
                    delays_ns.append(now - event.time.ToNanoseconds())
        except grpc.aio.AioRpcError as exc:
            received.fail(exc)
        ends_ns.append(time.time_ns())
        return received

    async with _keel(params["target"]) as first, _channels(params, first) as stubs:
        await _barrier(params)
        start_ns, cpu_start = time.time_ns(), time.process_time()
        results = await asyncio.gather(*(one(stubs[i % len(stubs)]) for i in range(runs)))
        client_cpu_s = time.process_time() - cpu_start
    end_ns = max(ends_ns, default=start_ns)
    return {
        "ok": all(r.ok for r in results),
        "runs": runs,
        "events": sum(r.events for r in results),
        "channels": len(stubs),
        "start_wall_ns": start_ns,
        "end_wall_ns": end_ns,
        "client_cpu_s": client_cpu_s,
        "client_wall_s": (end_ns - start_ns) / 1e9,
        # From go until the server admitted each Stream (sent its snapshot).
        "admitted_p50_s": percentile([(t - start_ns) / 1e9 for t in admitted_ns], 50),
        "admitted_max_s": max(((t - start_ns) / 1e9 for t in admitted_ns), default=math.nan),
        # Merged by the runner over client processes; dropped from the stored results.
        "delays_ms": [round(d / 1e6, 3) for d in delays_ns],
        "failed": sum(not r.ok for r in results),
        "errors": _errors(results),
    }


# -- i. many short runs ------------------------------------------------------------------


async def short_runs(params: Params) -> Params:
    """`runs` runs of `deltas` deltas each (one), `parallel` at a time: server CPU per run."""
    runs, parallel = int(params["runs"]), int(params["parallel"])
    script = text_script((int(params.get("deltas", 1)), 0))
    cpu = Cpu.of(params)
    slots = asyncio.Semaphore(parallel)

    async def one(stub: Any) -> Received:
        async with slots:
            return await _stream(stub, script)

    async with _keel(params["target"]) as stub:
        with cpu.window():
            start_ns = time.perf_counter_ns()
            results = await asyncio.gather(*(one(stub) for _ in range(runs)))
            total_s = (time.perf_counter_ns() - start_ns) / 1e9
    events = sum(r.events for r in results)
    run_ms = [(r.last_event_ns - r.start_ns) / 1e6 for r in results if r.last_event_ns]
    return {
        "ok": all(r.ok for r in results),
        "runs": runs,
        "parallel": parallel,
        "events": events,
        "total_s": total_s,
        "runs_per_s": runs / total_s,
        "run_time_p50_ms": percentile(run_ms, 50),
        "run_time_p99_ms": percentile(run_ms, 99),
        **cpu.per(runs, "run", 1e3),
        **cpu.per(events),
        "failed": sum(not r.ok for r in results),
        "errors": _errors(results),
    }
