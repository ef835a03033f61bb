"""`python -m bench.soak [--minutes M] [--out PATH]`: Keel under steady load for M minutes.

scripts/soak is the way in; docs/testing.md says what it checks and how to
read the report. Not part of CI.

It starts a redis-server and one Keel server of its own (bench.procs), the
server with a short terminal retention (KEEL_TERMINAL_TTL_S) so that the
expiry of ended runs shows within the soak, and its metrics endpoint on. For
M minutes (default 10):

- **runs**: RUNS runs at all times, each one a scripted run with text, the
  journaled `record` tool, an approval (`approve_me`) the soak approves (or,
  for some runs, denies) with Resume after a short wait, and for some runs a
  failing tool or two approvals at once. Each is streamed by its starter
  (Stream), which checks every index once and in order, the results of its
  `record` calls (1: the effect happened once) and that it ends in `finish`.
  As one run ends the next starts.
- **observers**: OBSERVERS clients that each follow a live run with Observe
  from offset 0 or a random offset the run has reached, drop the stream
  after a random number of events, and rejoin from the next offset, until
  the run's terminal event; every event they get must be the next index
  (no gap, no duplicate) and byte for byte the event the starter got.
- **samples**, every SAMPLE_S seconds: the server's RSS, its open file
  descriptors (/proc/PID/fd), its asyncio tasks (the keel_asyncio_tasks
  gauge), Redis's key count (DBSIZE, and a SCAN of the soak's prefix), the
  sizes of the run index, the active set and the lease deadlines.
- **expiry**: every run that ended more than the retention plus a margin ago
  must have no key left (EXISTS on each of its keys); every run that ended
  less than the retention minus the margin ago must still have its record.

The report (Markdown, and JSON beside it) gives the RSS slope (least squares
over the samples, MB per minute; also over the second half, after warm-up),
the figures at start, middle and end, and the checks. Exit code 1 when a
check fails (a gap, a duplicate, a mismatch, a run that did not succeed,
keys left past retention); never for a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import time
import urllib.request
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc
from keel_client import KeelClient
from prometheus_client.parser import text_string_to_metric_families

from bench import cpu
from bench.procs import ROOT, Launcher, RedisServer, ServerProcess, free_port, proc_status_kib
from server.events.keys import Keys

AGENT = "scripted"
KEY_PREFIX = "soak"
TERMINAL = frozenset({"finish", "error", "abort"})
RUNS = 50
OBSERVERS = 20
TTL_S = 60.0  # KEEL_TERMINAL_TTL_S of the soak's server
MARGIN_S = 10.0  # expiry checks leave this much either side of the retention
SAMPLE_S = 10.0
WARM_UP_S = 60.0  # slopes "after warm-up" leave out the samples before this
DRAIN_TIMEOUT_S = 60.0  # for the runs in flight when the time is up
APPROVAL_WAIT_S = (0.2, 1.5)  # how long a "human" takes to decide
MAX_EXAMPLES = 10
RESUME_ATTEMPTS = 20


@dataclass
class Run:
    """One run of the soak, as its starter saw it."""

    number: int
    approvals: int
    records: int
    denies: bool
    run_id: str = ""
    started: float = field(default_factory=time.monotonic)
    ended: float = 0.0  # monotonic; 0 while it runs
    ended_wall: float = 0.0  # unix time when its starter got the terminal event
    terminal: str = ""  # the terminal event's payload
    digests: list[int] = field(default_factory=list)  # crc32 of each event, by index
    done: asyncio.Event = field(default_factory=asyncio.Event)
    watchers: int = 0  # observers following it now
    expiry_checked: bool = False


@dataclass
class Counts:
    """What went wrong (all must stay 0) and what happened."""

    runs_started: int = 0
    runs_succeeded: int = 0
    runs_unexpected: int = 0  # ended otherwise than `finish`, or its starter failed
    approvals: int = 0
    denials: int = 0
    resume_races: int = 0  # Resumes answered ABORTED (the run's other decision won), resent
    record_results: int = 0
    record_results_wrong: int = 0  # a `record` result other than 1
    starter_gaps: int = 0
    starter_duplicates: int = 0
    observed_runs: int = 0  # runs an observer followed to their terminal event
    observer_segments: int = 0  # Observe calls (the first of a run, then each rejoin)
    observer_events: int = 0
    observer_gaps: int = 0
    observer_duplicates: int = 0
    observer_mismatches: int = 0  # an event that differs from the starter's at its index
    observer_errors: int = 0  # an Observe that failed or ended before the terminal event
    heartbeats_ahead: int = 0  # a heartbeat naming an offset past the stream's next
    expiry_checked: int = 0  # runs ended > retention + margin ago, checked for keys
    expiry_left: int = 0  # ... that still had a key
    retained_checked: int = 0  # runs ended < retention - margin ago, checked at the end
    retained_missing: int = 0  # ... whose record was already gone
    client_failures: int = 0  # a starter or observer task of the soak that raised
    examples: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(text)


@dataclass(frozen=True)
class Config:
    minutes: float
    runs: int = RUNS
    observers: int = OBSERVERS
    ttl_s: float = TTL_S
    margin_s: float = MARGIN_S
    sample_s: float = SAMPLE_S
    seed: int = 20261201


def script_for(number: int) -> tuple[str, int, int, bool]:
    """Run `number`'s script: (JSON, approvals, record calls, whether its approvals are
    denied). Every run has text, two `record` calls and an approval; every 4th a tool
    that fails (the model is told and goes on), every 10th two approvals at once, every
    7th has its approvals denied."""
    approve = {"tool": "approve_me", "args": {"action": "deploy", "run": number}}
    steps: list[dict[str, Any]] = [
        {"text": 20 + number % 20, "delay_ms": 20},
        {"tool": "record", "args": {"key": "a", "delay_ms": 20}},
    ]
    approvals = 1
    if number % 10 == 0:
        steps.append({"parallel": [approve, {**approve, "args": {"action": "rollback"}}]})
        approvals = 2
    else:
        steps.append(approve)
    if number % 4 == 0:
        steps.append({"tool": "fail", "args": {"message": "expected by the soak"}})
    steps += [
        {"text": 20, "delay_ms": 20},
        {"tool": "record", "args": {"key": "b"}},
        {"text": 10, "delay_ms": 10},
    ]
    return json.dumps({"steps": steps}), approvals, 2, number % 7 == 0


class Indices:
    """The indices one stream delivers, checked against the next one expected."""

    def __init__(self, offset: int) -> None:
        self.next = offset
        self.gaps = 0
        self.duplicates = 0

    def take(self, index: int) -> bool:
        """Whether `index` is the next one; a gap or a duplicate is counted."""
        if index == self.next:
            self.next += 1
            return True
        if index < self.next:
            self.duplicates += 1
            return False
        self.gaps += 1
        self.next = index + 1
        return False


def slope_per_minute(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute; None for < 2 points."""
    if len(points) < 2:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 60


def scrape(port: int) -> dict[str, float]:
    """The metrics endpoint's samples, by name (labelled samples summed)."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


class Soak:
    def __init__(
        self, config: Config, server: ServerProcess, redis_url: str, metrics_port: int
    ) -> None:
        self.config = config
        self.server = server
        self.redis_url = redis_url
        self.metrics_port = metrics_port
        self.counts = Counts()
        self.rng = random.Random(config.seed)
        self.live: dict[str, Run] = {}
        self.ended: list[Run] = []
        self.samples: list[dict[str, Any]] = []
        self.numbers = 0
        self.begin = time.monotonic()
        self.stopping = asyncio.Event()
        self.redis: aioredis.Redis = aioredis.Redis.from_url(redis_url)
        self.client = KeelClient(server.target)
        self.channel = grpc.aio.insecure_channel(server.target)
        self.stub: Any = pb_grpc.AgentServiceStub(self.channel)
        self.background: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.client.close()
        await self.channel.close()
        await self.redis.aclose()

    # -- runs --------------------------------------------------------------

    async def starter(self) -> None:
        """One of RUNS: starts a run, follows it to its end, starts the next."""
        while not self.stopping.is_set():
            number = self.numbers
            self.numbers += 1
            await self.one_run(number)

    async def one_run(self, number: int) -> None:
        text, approvals, records, denies = script_for(number)
        run = Run(number, approvals, records, denies)
        self.counts.runs_started += 1
        request = pb.StreamRequest(agent_id=AGENT, input=text, request_id=str(uuid.uuid4()))
        indices = Indices(0)
        results = 0
        try:
            call = self.stub.Stream(request)
            async for response in call:
                kind = response.WhichOneof("kind")
                if kind == "snapshot":
                    run.run_id = response.snapshot.run.run_id
                    self.live[run.run_id] = run
                elif kind == "heartbeat":
                    if response.heartbeat.next_offset > indices.next:
                        self.counts.heartbeats_ahead += 1
                elif kind == "events":
                    for event in response.events.events:
                        if not indices.take(event.index):
                            self.counts.note(f"starter of {run.run_id}: index {event.index}")
                            continue
                        run.digests.append(zlib.crc32(event.SerializeToString()))
                        payload = event.WhichOneof("payload")
                        if payload == "tool_call_approval":
                            self._spawn(self.decide(run, event.tool_call_approval.tool_call_id))
                        elif payload == "tool_result" and event.tool_result.tool_name == "record":
                            results += 1
                            self.counts.record_results += 1
                            if event.tool_result.result_json != "1":
                                self.counts.record_results_wrong += 1
                                self.counts.note(
                                    f"{run.run_id}: record returned {event.tool_result.result_json}"
                                )
                        elif payload in TERMINAL:
                            run.terminal = payload
        except grpc.aio.AioRpcError as exc:
            self.counts.note(f"starter of run {number} ({run.run_id}): {exc.code().name}")
            run.terminal = run.terminal or f"rpc {exc.code().name}"
        self.counts.starter_gaps += indices.gaps
        self.counts.starter_duplicates += indices.duplicates
        run.ended = time.monotonic()
        run.ended_wall = time.time()
        if run.terminal == "finish" and results == records:
            self.counts.runs_succeeded += 1
        else:
            self.counts.runs_unexpected += 1
            self.counts.note(f"{run.run_id}: ended {run.terminal!r}, {results} record results")
        run.done.set()
        self.live.pop(run.run_id, None)
        self.ended.append(run)
        self._release(run)

    async def decide(self, run: Run, tool_call_id: str) -> None:
        """A human: looks, waits a little, approves (or denies) the call. A Resume that
        lost a race with the run's other decision (ABORTED, CONCURRENT_MODIFICATION) is
        sent again, as docs/hitl.md says."""
        await asyncio.sleep(self.rng.uniform(*APPROVAL_WAIT_S))
        for _attempt in range(RESUME_ATTEMPTS):
            try:
                if run.denies:
                    await self.client.deny(run.run_id, tool_call_id, "denied by the soak")
                    self.counts.denials += 1
                else:
                    await self.client.approve(run.run_id, tool_call_id)
                    self.counts.approvals += 1
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.ABORTED:
                    self.counts.note(f"{run.run_id}: Resume of {tool_call_id}: {exc.code().name}")
                    return
                self.counts.resume_races += 1
                await asyncio.sleep(self.rng.uniform(0.01, 0.1))
        self.counts.note(f"{run.run_id}: Resume of {tool_call_id} kept losing races")

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def _release(self, run: Run) -> None:
        """Forget a run's digests once nobody compares with them any more."""
        if run.done.is_set() and run.watchers == 0:
            run.digests = []

    # -- observers ---------------------------------------------------------

    async def observer(self, number: int) -> None:
        rng = random.Random(self.config.seed * 1000 + number)
        while not self.stopping.is_set():
            candidates = [run for run in self.live.values() if run.run_id]
            if not candidates:
                await asyncio.sleep(0.1)
                continue
            run = rng.choice(candidates)
            run.watchers += 1
            try:
                await self.follow(run, rng)
            finally:
                run.watchers -= 1
                self._release(run)

    async def follow(self, run: Run, rng: random.Random) -> None:
        """Observe `run` from 0 or an offset it reached, dropping and rejoining, to its end."""
        offset = 0 if rng.random() < 0.5 else rng.randint(0, len(run.digests))
        indices = Indices(offset)
        seen: dict[int, int] = {}
        terminal = False
        while not terminal:
            self.counts.observer_segments += 1
            budget = rng.randint(1, 25)  # events before this segment drops the stream
            call = self.stub.Observe(pb.ObserveRequest(run_id=run.run_id, offset=indices.next))
            ended_ok = False
            try:
                async for response in call:
                    kind = response.WhichOneof("kind")
                    if kind == "heartbeat" and response.heartbeat.next_offset > indices.next:
                        self.counts.heartbeats_ahead += 1
                    if kind != "events":
                        continue
                    for event in response.events.events:
                        self.counts.observer_events += 1
                        if not indices.take(event.index):
                            self.counts.note(
                                f"observer of {run.run_id}: index {event.index}, "
                                f"expected {indices.next - (event.index >= indices.next)}"
                            )
                            continue
                        seen[event.index] = zlib.crc32(event.SerializeToString())
                        budget -= 1
                        if event.WhichOneof("payload") in TERMINAL:
                            terminal = True
                            break
                        if budget == 0:
                            break  # drop mid-batch: the rest of it comes again on rejoin
                    if terminal or budget == 0:
                        break
                else:
                    ended_ok = True
            except grpc.aio.AioRpcError as exc:
                self.counts.observer_errors += 1
                self.counts.note(f"observer of {run.run_id}: {exc.code().name} {exc.details()}")
                return
            finally:
                call.cancel()
            if ended_ok and not terminal:
                self.counts.observer_errors += 1
                self.counts.note(f"observer of {run.run_id}: stream ended before the end")
                return
            if not terminal:
                await asyncio.sleep(rng.uniform(0, 0.3))
        self.counts.observed_runs += 1
        self.counts.observer_gaps += indices.gaps
        self.counts.observer_duplicates += indices.duplicates
        await run.done.wait()
        for index, digest in seen.items():
            if index >= len(run.digests) or run.digests[index] != digest:
                self.counts.observer_mismatches += 1
                self.counts.note(f"observer of {run.run_id}: event {index} differs")

    # -- samples and expiry ------------------------------------------------

    async def sampler(self) -> None:
        while True:
            await self.sample()
            try:
                await asyncio.wait_for(self.stopping.wait(), self.config.sample_s)
                return
            except TimeoutError:
                pass

    async def sample(self) -> None:
        pid = self.server.pid
        try:
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            fds = -1
        try:
            metrics = await asyncio.to_thread(scrape, self.metrics_port)
        except OSError as exc:
            self.counts.note(f"metrics: {exc}")
            metrics = {}
        keys = Keys(KEY_PREFIX)
        pipe = self.redis.pipeline(transaction=False)
        pipe.dbsize()
        pipe.info("memory")
        pipe.zcard(keys.run_index)
        pipe.scard(keys.active_runs)
        pipe.zcard(keys.lease_deadlines)
        dbsize, memory, run_index, active, deadlines = await pipe.execute()
        scanned = 0
        async for _ in self.redis.scan_iter(match=f"{KEY_PREFIX}:*", count=1000):
            scanned += 1
        await self.check_expiry()
        self.samples.append(
            {
                "t_s": round(time.monotonic() - self.begin, 1),
                "rss_mib": proc_status_kib(pid, "VmRSS") / 1024,
                "fds": fds,
                "asyncio_tasks": metrics.get("keel_asyncio_tasks"),
                "server_cpu_s": round(cpu.process_cpu_s(pid), 2),
                "runs_active": metrics.get("keel_runs_active"),
                "streams_open": metrics.get("keel_streams_open"),
                "events_appended": metrics.get("keel_events_appended_total"),
                "redis_dbsize": dbsize,
                "redis_keys_scanned": scanned,
                "redis_used_mib": round(int(memory["used_memory"]) / 2**20, 1),
                "run_index": run_index,
                "active_set": active,
                "lease_deadlines": deadlines,
                "runs_started": self.counts.runs_started,
                "runs_ended": len(self.ended),
                "expiry_checked": self.counts.expiry_checked,
                "expiry_left": self.counts.expiry_left,
            }
        )
        last = self.samples[-1]
        print(
            f"[soak {last['t_s']:6.0f}s] rss {last['rss_mib']:.1f} MiB, fds {fds}, "
            f"tasks {last['asyncio_tasks']}, redis keys {dbsize}, runs {len(self.ended)} "
            f"ended, {len(self.live)} live, expired ok {self.counts.expiry_checked}"
            f"/left {self.counts.expiry_left}",
            flush=True,
        )

    def run_keys(self, run_id: str) -> list[str]:
        keys = Keys(KEY_PREFIX)
        return [
            keys.run(run_id),
            keys.events(run_id),
            keys.lease(run_id),
            keys.tools(run_id),
            keys.counters(run_id),
            keys.once(run_id),
            keys.resumes(run_id),
        ]

    async def check_expiry(self) -> None:
        """Every run that ended more than the retention plus the margin ago: no key left."""
        cutoff = time.time() - self.config.ttl_s - self.config.margin_s
        due = [
            run
            for run in self.ended
            if run.run_id and not run.expiry_checked and run.ended_wall < cutoff
        ]
        pipe = self.redis.pipeline(transaction=False)
        for run in due:
            pipe.exists(*self.run_keys(run.run_id))
        found = await pipe.execute() if due else []
        for run, left in zip(due, found, strict=True):
            run.expiry_checked = True
            self.counts.expiry_checked += 1
            if left:
                self.counts.expiry_left += 1
                self.counts.note(f"{run.run_id}: {left} keys left past retention")

    async def check_retained(self) -> None:
        """Every run that ended less than the retention minus the margin ago: its record
        is still there (retention is not shorter than asked). Checked when the time is up."""
        cutoff = time.time() - self.config.ttl_s + self.config.margin_s
        recent = [run for run in self.ended if run.run_id and run.ended_wall > cutoff]
        pipe = self.redis.pipeline(transaction=False)
        for run in recent:
            pipe.exists(Keys(KEY_PREFIX).run(run.run_id))
        found = await pipe.execute() if recent else []
        for run, present in zip(recent, found, strict=True):
            self.counts.retained_checked += 1
            if not present:
                self.counts.retained_missing += 1
                self.counts.note(f"{run.run_id}: expired before its retention")

    # -- the whole soak ----------------------------------------------------

    async def run(self) -> None:
        sampler = asyncio.create_task(self.sampler())
        starters = [asyncio.create_task(self.starter()) for _ in range(self.config.runs)]
        observers = [asyncio.create_task(self.observer(i)) for i in range(self.config.observers)]
        try:
            await asyncio.sleep(self.config.minutes * 60)
            self.stopping.set()
            await self.check_retained()
            for tasks, what in ((starters, "run"), (observers, "observer")):
                done, pending = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S)
                if pending:
                    self.counts.note(f"{len(pending)} {what}s did not end after the soak")
                    if what == "run":
                        self.counts.runs_unexpected += len(pending)
                    else:
                        self.counts.observer_errors += len(pending)
                for task in done:
                    if task.exception() is not None:
                        self.counts.note(f"a {what}'s client failed: {task.exception()!r}")
                        self.counts.client_failures += 1
            await sampler
        finally:
            for task in [*starters, *observers, sampler]:
                task.cancel()
            await asyncio.gather(*starters, *observers, sampler, return_exceptions=True)


def failures(counts: Counts) -> list[str]:
    checks = {
        "runs that did not succeed": counts.runs_unexpected,
        "record results other than 1": counts.record_results_wrong,
        "gaps seen by starters": counts.starter_gaps,
        "duplicates seen by starters": counts.starter_duplicates,
        "gaps seen by observers": counts.observer_gaps,
        "duplicates seen by observers": counts.observer_duplicates,
        "events that differ between observers and starters": counts.observer_mismatches,
        "observers that failed": counts.observer_errors,
        "heartbeats ahead of their stream": counts.heartbeats_ahead,
        "runs with keys left past retention": counts.expiry_left,
        "runs expired before their retention": counts.retained_missing,
        "soak clients that raised": counts.client_failures,
    }
    return [f"{name}: {value}" for name, value in checks.items() if value]


def summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Slopes (over every sample, over the samples after the warm-up, over the second
    half), and the samples at four points: idle (before the load), start (after the
    warm-up), middle and end."""
    loaded = [s for s in samples if s["t_s"] >= WARM_UP_S] or samples[1:]
    half = samples[len(samples) // 2 :]

    def slopes(key: str) -> dict[str, float | None]:
        def of(chosen: list[dict[str, Any]]) -> float | None:
            return slope_per_minute([(s["t_s"], s[key]) for s in chosen if s[key] is not None])

        return {"all": of(samples), "after_warm_up": of(loaded), "second_half": of(half)}

    points = {}
    if samples:
        points = {
            "idle": samples[0],
            "start": loaded[0] if loaded else samples[0],
            "middle": samples[len(samples) // 2],
            "end": samples[-1],
        }
    return {
        "warm_up_s": WARM_UP_S,
        "slopes_per_min": {
            key: slopes(key)
            for key in ("rss_mib", "fds", "asyncio_tasks", "redis_dbsize", "run_index")
        },
        "rss_peak_mib": max((s["rss_mib"] for s in samples), default=None),
        "points": points,
    }


def markdown(result: dict[str, Any]) -> str:
    config, counts, summ = result["config"], result["counts"], result["summary"]
    points = summ["points"]

    def row(name: str, key: str, fmt: str = "{}") -> str:
        cells = [
            fmt.format(points[p][key]) if points.get(p, {}).get(key) is not None else "-"
            for p in ("idle", "start", "middle", "end")
        ]
        return f"| {name} | " + " | ".join(cells) + " |"

    def slope(value: float | None, unit: str) -> str:
        return "-" if value is None else f"{value:+.3f} {unit}"

    failed = result["failures"]
    lines = [
        "# Soak: Keel under steady load",
        "",
        f"`scripts/soak --minutes {config['minutes']:g}`, {result['started_at']}, "
        f"{result['duration_s'] / 60:.1f} minutes in all "
        f"(Keel {result['machine']['keel_commit']}).",
        "",
        f"**{'PASSED' if not failed else 'FAILED'}**: "
        + ("every check held." if not failed else "; ".join(failed)),
        "",
        "One Keel server (`python -m server serve`, scripted agent) on a Redis of its own, "
        f"KEEL_TERMINAL_TTL_S={config['ttl_s']:g}. {config['runs']} runs at all times, each "
        "streamed by its starter: text deltas, two calls of the journaled `record` tool, "
        "an approval the soak gives with Resume after 0.2 to 1.5 s (every 7th run: denied; "
        "every 10th: two approvals at once), every 4th a tool that fails and is retried; as "
        f"one run ends the next starts. {config['observers']} observers follow live runs "
        "with Observe from offset 0 or a random reached offset, drop the stream after 1 to "
        "25 events and rejoin from the next offset, to the run's end. "
        f"Samples every {config['sample_s']:g} s.",
        "",
        f"Machine: {result['machine']['cpus']} cores, shared with other work while the soak "
        f"ran (load average {result['machine']['load_average']['start']} at the start, "
        f"{result['machine']['load_average']['end']} at the end); everything (the server, "
        "Redis, the soak's clients) ran on it. Absolute rates say little here; the slopes "
        "and the checks are the point.",
        "",
        "## Resources",
        "",
        "Four points: idle (the server started, no load yet), start (the first sample "
        f"after {summ['warm_up_s']:g} s of load), middle and end.",
        "",
        "| | idle | start | middle | end |",
        "|---|---|---|---|---|",
        row("time (s)", "t_s", "{:.0f}"),
        row("server RSS (MiB)", "rss_mib", "{:.1f}"),
        row("server open fds", "fds"),
        row("server asyncio tasks (`keel_asyncio_tasks`)", "asyncio_tasks", "{:.0f}"),
        row("server runs active (`keel_runs_active`)", "runs_active", "{:.0f}"),
        row("server streams open (`keel_streams_open`)", "streams_open", "{:.0f}"),
        row("Redis keys (DBSIZE)", "redis_dbsize"),
        row(
            f"Redis keys under `{KEY_PREFIX}:` (SCAN: expired ones left out)", "redis_keys_scanned"
        ),
        row("Redis used memory (MiB)", "redis_used_mib", "{:.1f}"),
        row(f"run index `{KEY_PREFIX}:runs` (ZCARD)", "run_index"),
        row(f"active set `{KEY_PREFIX}:active` (SCARD)", "active_set"),
        row(f"lease deadlines `{KEY_PREFIX}:lease_deadlines` (ZCARD)", "lease_deadlines"),
        row("runs ended so far", "runs_ended"),
        row("server CPU (s)", "server_cpu_s", "{:.0f}"),
        "",
        "Slopes (least squares, per minute) over every sample, over the samples after the "
        "warm-up, and over the second half:",
        "",
        "| | all | after warm-up | second half |",
        "|---|---|---|---|",
        *(
            f"| {name} | "
            + " | ".join(
                slope(summ["slopes_per_min"][key][part], unit)
                for part in ("all", "after_warm_up", "second_half")
            )
            + " |"
            for name, key, unit in (
                ("server RSS", "rss_mib", "MiB/min"),
                ("server open fds", "fds", "/min"),
                ("server asyncio tasks", "asyncio_tasks", "/min"),
                ("Redis keys (DBSIZE)", "redis_dbsize", "/min"),
                (f"run index `{KEY_PREFIX}:runs`", "run_index", "/min"),
            )
        ),
        "",
        f"Peak server RSS: {summ['rss_peak_mib']:.1f} MiB.",
        "",
        *_index_note(summ),
        "## Checks",
        "",
        "| check | count | must be |",
        "|---|---|---|",
        f"| runs started | {counts['runs_started']} | |",
        f"| runs that ended in `finish` with both `record` results | "
        f"{counts['runs_succeeded']} | |",
        f"| runs that did not (failed, cancelled, an RPC error) | "
        f"{counts['runs_unexpected']} | 0 |",
        f"| approvals / denials sent with Resume | {counts['approvals']} / {counts['denials']} | |",
        f"| `record` results / other than 1 (an effect twice) | {counts['record_results']} / "
        f"{counts['record_results_wrong']} | / 0 |",
        f"| gaps / duplicates seen by starters | {counts['starter_gaps']} / "
        f"{counts['starter_duplicates']} | 0 / 0 |",
        f"| runs followed by observers to their end | {counts['observed_runs']} | |",
        f"| Observe calls by observers (first joins and rejoins) | "
        f"{counts['observer_segments']} | |",
        f"| events received by observers | {counts['observer_events']} | |",
        f"| gaps / duplicates seen by observers | {counts['observer_gaps']} / "
        f"{counts['observer_duplicates']} | 0 / 0 |",
        f"| observed events that differ from the starter's | {counts['observer_mismatches']} | 0 |",
        f"| observers whose stream failed or ended early | {counts['observer_errors']} | 0 |",
        f"| heartbeats naming an offset past their stream's | {counts['heartbeats_ahead']} | 0 |",
        f"| runs ended > {config['ttl_s']:g} + {config['margin_s']:g} s ago, checked for keys "
        f"| {counts['expiry_checked']} | |",
        f"| ... with a key left (EXISTS on run, events, lease, tools, counters, once, "
        f"resumes) | {counts['expiry_left']} | 0 |",
        f"| runs ended < {config['ttl_s']:g} - {config['margin_s']:g} s before the end, "
        f"checked | {counts['retained_checked']} | |",
        f"| ... whose record was gone already | {counts['retained_missing']} | 0 |",
        f"| soak client tasks that raised | {counts['client_failures']} | 0 |",
        "",
    ]
    if counts["examples"]:
        lines += ["Examples:", "", *[f"- {text}" for text in counts["examples"]], ""]
    warnings = result["server_warnings"]
    lines += [
        f"Server log lines at WARNING or above: {warnings['count']}.",
        *(f"- `{line[:300]}`" for line in warnings["examples"]),
        "",
        "## Samples",
        "",
        "| t (s) | RSS (MiB) | fds | tasks | Redis keys | run index | runs ended |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {s['t_s']:.0f} | {s['rss_mib']:.1f} | {s['fds']} | {_int(s['asyncio_tasks'])} | "
            f"{s['redis_dbsize']} | {s['run_index']} | {s['runs_ended']} |"
            for s in result["samples"]
        ),
        "",
    ]
    return "\n".join(lines)


def _index_note(summ: dict[str, Any]) -> list[str]:
    """A word on the run index when it grew while the keys of ended runs expired."""
    grew = summ["slopes_per_min"]["run_index"]["after_warm_up"]
    if grew is None or grew < 10:
        return []
    return [
        f"The run index (`{KEY_PREFIX}:runs`, what ListRuns walks) grew by {grew:.0f} "
        "members a minute while the runs' own keys expired: it keeps one member per run "
        "ever made, and only a ListRuns that walks past the member of an expired run "
        "removes it (the soak lists no runs). See docs/testing.md.",
        "",
    ]


def _int(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip()


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


async def soak(config: Config, log_dir: Path) -> dict[str, Any]:
    started = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    load_start = _load()
    begin = time.monotonic()
    redis_server = RedisServer.start()
    server: ServerProcess | None = None
    try:
        metrics_port = free_port()
        server = Launcher(log_dir=log_dir).start_keel(
            redis_server.url,
            key_prefix=KEY_PREFIX,
            env={
                "KEEL_TERMINAL_TTL_S": str(config.ttl_s),
                "KEEL_METRICS_PORT": str(metrics_port),
            },
        )
        runner = Soak(config, server, redis_server.url, metrics_port)
        try:
            await runner.run()
        finally:
            await runner.close()
        counts = runner.counts
        log_lines = server.warnings_since(0)
        result: dict[str, Any] = {
            "started_at": started.isoformat().replace("+00:00", "Z"),
            "duration_s": time.monotonic() - begin,
            "config": asdict(config),
            "machine": {
                "cpus": os.cpu_count(),
                "load_average": {"start": load_start, "end": _load()},
                "python": platform.python_version(),
                "redis_server": redis_server.version(),
                "keel_commit": _git_commit(),
            },
            "counts": asdict(counts),
            "failures": failures(counts),
            "summary": summary(runner.samples),
            "samples": runner.samples,
            "server_warnings": {"count": len(log_lines), "examples": log_lines[:5]},
        }
        return result
    finally:
        if server is not None:
            server.stop()
        redis_server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "build" / "soak" / "soak.md",
        help="the Markdown report; the JSON goes beside it (default build/soak/soak.md)",
    )
    parser.add_argument("--runs", type=int, default=RUNS, help=f"runs at once ({RUNS})")
    parser.add_argument("--observers", type=int, default=OBSERVERS, help=f"observers ({OBSERVERS})")
    parser.add_argument(
        "--ttl", type=float, default=TTL_S, help=f"KEEL_TERMINAL_TTL_S, seconds ({TTL_S:g})"
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="only rewrite the Markdown report (--out) from a soak's JSON",
    )
    args = parser.parse_args(argv)
    out: Path = args.out
    if args.render is not None:
        out.write_text(markdown(json.loads(args.render.read_text())))
        print(out)
        return 0
    config = Config(minutes=args.minutes, runs=args.runs, observers=args.observers, ttl_s=args.ttl)
    log_dir = ROOT / "build" / "soak" / "logs"
    result = asyncio.run(soak(config, log_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(result))
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(out)
    print(out.with_suffix(".json"))
    print(f"server log: {log_dir}")
    for line in result["failures"]:
        print(f"soak check failed: {line}", file=sys.stderr)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
