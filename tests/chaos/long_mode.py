"""The long mode of the repeated-SIGKILL test: many kills, runs started all along, a report.

`KEEL_CHAOS_KILLS=N` selects it (scripts/chaos sets it; CI never does, and
runs the short test of test_repeated_chaos.py alone). Three Keel servers on
one Redis; LIVE runs at all times, each started with StartRun on one of the
servers (the next one when that one is down) and followed to its end by a
client that resumes on the next server whenever its stream fails. Meanwhile
N times: wait 0.2 to 2 s, SIGKILL a random server, note the runs it owned
(read from Redis once it is dead), and start it again on its port. Then no
new runs; every run must end.

Checked for every run (each one a count in the report, which must be 0):

- the follower saw every index once: no gap, no duplicate, across its
  reconnects; the log (one Observe at the end) is dense and equal, event for
  event, to what the follower saw; the effective text (superseded partial
  output dropped) is the script's;
- the run succeeded; none is left unended (stranded);
- the journaled `record` tool's effect happened once per call (its counter,
  incremented with the call's idempotency key, is 1), and a call whose
  result was in the tool journal when its owner died was never invoked again
  (its invocation counter did not move after the kill). Calls interrupted
  while running are invoked again (at least once, by design): counted, not
  failed.

Takeover time, per run a killed server owned: from the SIGKILL (wall clock,
taken right before the signal) to the `time` of the first event appended by
a new owner, i.e. the event at the run's `next_index` as read from Redis
once the killed process was reaped (the dead owner can append nothing after
that; every server stamps events with the same machine clock). When the new
owner is itself killed before it appends, the time runs on to whichever owner
appends first.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import os
import random
import statistics
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server.events.keys import Keys, RunField
from server.events.log import EventLog, RunState
from tests.chaos.conftest import (
    CHAOS_ENV,
    Cluster,
    effective_events,
    expected_text,
    free_port,
    script,
    text_of,
)
from tests.processes import ROOT, KeelProcess

INSTANCES = 3
LIVE = 24  # runs under way at all times while the kills go on
SEED = 20261201
TERMINAL = frozenset({"finish", "error", "abort"})
END_TIMEOUT_S = 180.0  # for every run to end once the kills are over
KILL_GAP_S = (0.2, 2.0)  # between a server's restart and the next kill
SETTLE_S = 0.2  # after reaping a killed server, before reading what it owned
MAX_EXAMPLES = 12
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 500),
]


def kills_requested() -> int:
    """KEEL_CHAOS_KILLS: the long mode's number of kills; 0 (unset): the short test only."""
    return int(os.environ.get("KEEL_CHAOS_KILLS", "0") or 0)


def report_path() -> Path:
    return Path(os.environ.get("KEEL_CHAOS_REPORT") or ROOT / "build" / "chaos" / "chaos.md")


def steps_for(number: int) -> tuple[dict[str, Any], ...]:
    """A run of about 2 s undisturbed: text, `record` a (taking 100 ms), text, `record` b,
    text."""
    return (
        {"text": 30 + number % 20, "delay_ms": 15},
        {"tool": "record", "args": {"key": "a", "delay_ms": 100}},
        {"text": 30, "delay_ms": 15},
        {"tool": "record", "args": {"key": "b"}},
        {"text": 20, "delay_ms": 15},
    )


@dataclass
class Death:
    """A run that a killed server owned, as Redis had it once the server was reaped."""

    kill: int
    killed_at: float  # unix time, right before SIGKILL
    next_index: int  # the first index a new owner appends
    epoch: int
    journaled: list[str]  # tool call ids in the run's journal
    invocations: dict[str, int]  # its "calls:K" counters


@dataclass
class Tracked:
    number: int
    run_id: str
    deaths: list[Death] = field(default_factory=list)


@dataclass
class Kill:
    number: int
    port: int
    instance: str
    killed_at: float
    orphans: int = 0  # runs it owned and had not ended
    restart_s: float = 0.0  # from the SIGKILL to its successor listening


@dataclass
class Tally:
    runs_started: int = 0
    runs_succeeded: int = 0
    runs_failed: int = 0  # ended otherwise than succeeded
    runs_stranded: int = 0  # not ended END_TIMEOUT_S after the last kill
    runs_taken_over: int = 0  # runs with at least one death
    follower_reconnects: int = 0
    follower_gaps: int = 0
    follower_duplicates: int = 0
    follower_errors: int = 0  # a follower that failed otherwise than UNAVAILABLE
    log_not_dense: int = 0  # runs whose log's indices are not 0..n-1
    follower_differs: int = 0  # runs whose follower saw other events than the log holds
    text_wrong: int = 0  # runs whose effective text is not the script's
    effects_not_once: int = 0  # `record` calls whose effect counter is not 1
    journaled_reinvoked: int = 0  # journaled calls invoked again after their owner died
    reinvocations: int = 0  # invocations of interrupted calls beyond the first (allowed)
    superseded: int = 0  # step_superseded events
    takeovers_measured: int = 0
    takeovers_chained: int = 0  # the new owner was killed too before it appended anything
    takeover_unmeasured: int = 0  # a death whose new owner's first event was not found
    examples: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(text)


@dataclass
class Followed:
    events: list[pb.AgentEvent] = field(default_factory=list)
    gaps: int = 0
    duplicates: int = 0
    reconnects: int = 0
    error: str = ""


class LongChaos:
    def __init__(self, cluster: Cluster, store: EventLog, kills: int) -> None:
        self.cluster = cluster
        self.store = store
        self.kills = kills
        self.keys = Keys(cluster.key_prefix)
        self.rng = random.Random(SEED)
        self.ports = [free_port() for _ in range(INSTANCES)]
        self.instances: dict[int, KeelProcess] = {}
        self.names: dict[int, str] = {}
        self.generation = 0
        self.channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
            for port in self.ports
        ]
        self.stubs: list[Any] = [pb_grpc.AgentServiceStub(c) for c in self.channels]
        self.live: dict[str, Tracked] = {}
        self.tally = Tally()
        self.kill_log: list[Kill] = []
        self.takeovers_ms: list[tuple[float, str, int]] = []  # (ms, run id, kill number)
        self.numbers = 0
        self.stopping = asyncio.Event()

    async def start_instance(self, port: int) -> None:
        self.generation += 1
        name = f"chaos-{port}-{self.generation}"
        self.instances[port] = await self.cluster.start(port=port, KEEL_INSTANCE_ID=name)
        self.names[port] = name

    # -- runs and their followers ----------------------------------------

    async def worker(self, slot: int) -> None:
        while not self.stopping.is_set():
            number = self.numbers
            self.numbers += 1
            await self.one_run(slot, number)

    async def one_run(self, slot: int, number: int) -> None:
        steps = steps_for(number)
        request = pb.StartRunRequest(
            agent_id="scripted", input=script(*steps), request_id=uuid.uuid4().hex
        )
        run_id = ""
        for attempt in range(200):  # a server may be down: the next one, same request id
            try:
                stub = self.stubs[(slot + attempt) % INSTANCES]
                run_id = (await stub.StartRun(request)).run.run_id
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                await asyncio.sleep(0.05)
        if not run_id:
            self.tally.note(f"run {number} could not be started")
            return
        self.tally.runs_started += 1
        tracked = Tracked(number, run_id)
        self.live[run_id] = tracked
        try:
            followed = await self.follow(run_id, slot)
        finally:
            self.live.pop(run_id, None)
        await self.check(tracked, steps, followed)

    async def follow(self, run_id: str, first: int) -> Followed:
        """Every event of the run, resuming on the next server after each failure."""
        seen = Followed()
        server = first
        while True:
            call = self.stubs[server % INSTANCES].Observe(
                pb.ObserveRequest(run_id=run_id, offset=len(seen.events))
            )
            try:
                async for response in call:
                    if response.WhichOneof("kind") != "events":
                        continue
                    for event in response.events.events:
                        expected = len(seen.events)
                        if event.index < expected:
                            seen.duplicates += 1
                            continue
                        if event.index > expected:
                            seen.gaps += 1
                            seen.error = f"expected {expected}, got {event.index}"
                            return seen
                        seen.events.append(event)
                        if event.WhichOneof("payload") in TERMINAL:
                            return seen
                seen.error = "the stream ended before the run's end"
                return seen
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    seen.error = f"{exc.code().name}: {exc.details()}"
                    return seen
                seen.reconnects += 1
                server += 1
                await asyncio.sleep(0.05)
            finally:
                call.cancel()

    async def observe_log(self, run_id: str) -> list[pb.AgentEvent]:
        """The run's whole log through one Observe, on whichever server is up."""
        for attempt in range(200):
            events: list[pb.AgentEvent] = []
            try:
                call = self.stubs[attempt % INSTANCES].Observe(pb.ObserveRequest(run_id=run_id))
                async for response in call:
                    if response.WhichOneof("kind") == "events":
                        events.extend(response.events.events)
                return events
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                await asyncio.sleep(0.05)
        raise AssertionError(f"no server answered Observe({run_id})")

    async def check(self, tracked: Tracked, steps: Any, followed: Followed) -> None:
        tally, run_id = self.tally, tracked.run_id
        tally.follower_reconnects += followed.reconnects
        tally.follower_gaps += followed.gaps
        tally.follower_duplicates += followed.duplicates
        if followed.error:
            tally.follower_errors += 1
            tally.note(f"follower of {run_id}: {followed.error}")
        record = await self.store.get_run(run_id)
        deadline = time.monotonic() + END_TIMEOUT_S
        while not record.state.terminal and time.monotonic() < deadline:
            await asyncio.sleep(0.5)  # its follower failed: the run may still end
            record = await self.store.get_run(run_id)
        if not record.state.terminal:
            tally.runs_stranded += 1
            tally.note(
                f"stranded: {run_id} {record.state.value} owner {record.owner} "
                f"epoch {record.epoch} next_index {record.next_index}"
            )
            return
        if record.state.value == "succeeded":
            tally.runs_succeeded += 1
        else:
            tally.runs_failed += 1
            tally.note(f"{run_id} ended {record.state.value}: {record.error}")
        events = await self.observe_log(run_id)
        if [e.index for e in events] != list(range(len(events))):
            tally.log_not_dense += 1
            tally.note(f"{run_id}: log indices {[e.index for e in events][:20]}...")
        if [e.SerializeToString() for e in followed.events] != [
            e.SerializeToString() for e in events
        ]:
            tally.follower_differs += 1
            tally.note(
                f"{run_id}: the follower saw {len(followed.events)} events, the log holds "
                f"{len(events)}"
            )
        if text_of(effective_events(events)) != expected_text(*steps):
            tally.text_wrong += 1
            tally.note(f"{run_id}: effective text differs from the script's")
        tally.superseded += sum(e.WhichOneof("payload") == "step_superseded" for e in events)
        await self.check_tools(tracked, events)
        if tracked.deaths:
            tally.runs_taken_over += 1
        for death in tracked.deaths:
            self.measure_takeover(tracked, death, events)
        for earlier, later in itertools.pairwise(tracked.deaths):
            if later.next_index == earlier.next_index:
                tally.takeovers_chained += 1  # its new owner died before appending anything

    async def check_tools(self, tracked: Tracked, events: list[pb.AgentEvent]) -> None:
        tally, run_id = self.tally, tracked.run_id
        key_of = {
            e.tool_call.tool_call_id: json.loads(e.tool_call.args_json)["key"]
            for e in events
            if e.WhichOneof("payload") == "tool_call" and e.tool_call.tool_name == "record"
        }
        counters = await self.counters(run_id)
        for key in ("a", "b"):
            if counters.get(key) != 1:
                tally.effects_not_once += 1
                tally.note(f"{run_id}: effect of record {key!r} happened {counters.get(key)} times")
            tally.reinvocations += max(0, counters.get(f"calls:{key}", 0) - 1)
        for death in tracked.deaths:
            for call_id in death.journaled:
                called = key_of.get(call_id)
                if called is None:
                    continue
                before = death.invocations.get(f"calls:{called}", 0)
                now = counters.get(f"calls:{called}", 0)
                if now != before:
                    tally.journaled_reinvoked += 1
                    tally.note(
                        f"{run_id}: {call_id} ({called}) was journaled when kill {death.kill} "
                        f"struck, with {before} invocations; {now} now"
                    )

    def measure_takeover(self, tracked: Tracked, death: Death, events: list[pb.AgentEvent]) -> None:
        after = [
            e for e in events[death.next_index :] if e.time.ToNanoseconds() / 1e9 > death.killed_at
        ]
        if not after:
            self.tally.takeover_unmeasured += 1
            self.tally.note(f"{tracked.run_id}: no event after kill {death.kill}")
            return
        if after[0].index != death.next_index:
            self.tally.note(
                f"{tracked.run_id}: event {death.next_index} is stamped before kill {death.kill}"
            )
        ms = (after[0].time.ToNanoseconds() / 1e9 - death.killed_at) * 1000
        self.tally.takeovers_measured += 1
        self.takeovers_ms.append((ms, tracked.run_id, death.kill))

    async def counters(self, run_id: str) -> dict[str, int]:
        raw = cast(dict[bytes, bytes], await self.store.client.hgetall(self.keys.counters(run_id)))
        return {k.decode(): int(v) for k, v in raw.items()}

    # -- the kills ---------------------------------------------------------

    async def kill_one(self, number: int) -> None:
        port = self.rng.choice(self.ports)
        name = self.names[port]
        kill = Kill(number, port, name, time.time())
        self.instances[port].kill()
        await self.instances[port].wait()
        await asyncio.sleep(SETTLE_S)
        await self.note_orphans(kill)
        await self.start_instance(port)
        kill.restart_s = time.time() - kill.killed_at
        self.kill_log.append(kill)
        print(
            f"[chaos] kill {number}/{self.kills}: {name} owned {kill.orphans} unfinished runs; "
            f"{self.tally.runs_started} runs started, {self.tally.runs_succeeded} checked",
            flush=True,
        )

    async def note_orphans(self, kill: Kill) -> None:
        """The runs the killed server owned and had not ended, as Redis holds them now."""
        runs = list(self.live.values())
        client = self.store.client
        pipe = client.pipeline(transaction=False)
        for tracked in runs:
            run_id = tracked.run_id
            pipe.hmget(
                self.keys.run(run_id),
                [RunField.OWNER, RunField.STATE, RunField.NEXT_INDEX, RunField.EPOCH],
            )
            pipe.hkeys(self.keys.tools(run_id))
            pipe.hgetall(self.keys.counters(run_id))
        replies = await pipe.execute()
        for i, tracked in enumerate(runs):
            (owner, state, next_index, epoch), tools, counters = replies[3 * i : 3 * i + 3]
            if owner is None or owner.decode() != kill.instance:
                continue
            if state is not None and RunState(state.decode()).terminal:
                continue
            kill.orphans += 1
            tracked.deaths.append(
                Death(
                    kill=kill.number,
                    killed_at=kill.killed_at,
                    next_index=int(next_index or 0),
                    epoch=int(epoch or 0),
                    journaled=sorted(t.decode() for t in tools),
                    invocations={k.decode(): int(v) for k, v in counters.items()},
                )
            )

    async def run(self) -> dict[str, Any]:
        began = time.monotonic()
        for port in self.ports:
            await self.start_instance(port)
        workers = [asyncio.create_task(self.worker(slot)) for slot in range(LIVE)]
        try:
            for number in range(1, self.kills + 1):
                await asyncio.sleep(self.rng.uniform(*KILL_GAP_S))
                await self.kill_one(number)
            kills_done = time.monotonic()
            self.stopping.set()
            done, pending = await asyncio.wait(workers, timeout=END_TIMEOUT_S)
            for task in done:
                if task.exception() is not None:
                    self.tally.note(f"a worker failed: {task.exception()!r}")
                    self.tally.follower_errors += 1
            self.tally.runs_stranded += len(self.live)
            for tracked in self.live.values():
                record = await self.store.get_run(tracked.run_id)
                self.tally.note(
                    f"stranded: {tracked.run_id} {record.state.value} owner {record.owner} "
                    f"epoch {record.epoch} next_index {record.next_index}"
                )
            for task in pending:
                task.cancel()
            end_s = time.monotonic() - kills_done
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            for channel in self.channels:
                await channel.close()
        return self.result(time.monotonic() - began, end_s)

    def result(self, duration_s: float, end_s: float) -> dict[str, Any]:
        times = sorted(ms for ms, _, _ in self.takeovers_ms)
        worst = max(self.takeovers_ms, default=None)

        def pct(q: float) -> float | None:
            return times[min(len(times) - 1, int(q * len(times)))] if times else None

        restarts = [k.restart_s for k in self.kill_log]
        return {
            "started_at": datetime.datetime.now(datetime.UTC)
            .replace(microsecond=0)
            .isoformat()
            .replace("+00:00", "Z"),
            "duration_s": duration_s,
            "drain_s": end_s,
            "kills": len(self.kill_log),
            "instances": INSTANCES,
            "live_runs": LIVE,
            "settings": dict(CHAOS_ENV),
            "cpus": os.cpu_count(),
            "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg()),
            "tally": asdict(self.tally),
            "orphans_per_kill": [k.orphans for k in self.kill_log],
            "restart_s": {
                "median": statistics.median(restarts) if restarts else None,
                "max": max(restarts, default=None),
            },
            "takeover_ms": {
                "count": len(times),
                "min": times[0] if times else None,
                "median": statistics.median(times) if times else None,
                "p95": pct(0.95),
                "max": times[-1] if times else None,
                "worst_run": worst[1] if worst else None,
                "worst_kill": worst[2] if worst else None,
            },
            "failures": failures(self.tally),
            "takeovers": [
                {"ms": round(ms, 1), "run_id": run_id, "kill": kill}
                for ms, run_id, kill in self.takeovers_ms
            ],
        }


def failures(tally: Tally) -> list[str]:
    checks = {
        "runs that did not succeed": tally.runs_failed,
        "runs stranded": tally.runs_stranded,
        "gaps seen by followers": tally.follower_gaps,
        "duplicates seen by followers": tally.follower_duplicates,
        "followers that failed": tally.follower_errors,
        "logs not dense": tally.log_not_dense,
        "followers that saw other events than the log": tally.follower_differs,
        "runs whose effective text is wrong": tally.text_wrong,
        "record effects not exactly once": tally.effects_not_once,
        "journaled tool calls invoked again": tally.journaled_reinvoked,
        "takeovers without a new owner's event": tally.takeover_unmeasured,
    }
    return [f"{name}: {value}" for name, value in checks.items() if value]


def markdown(result: dict[str, Any]) -> str:
    tally, takeover = result["tally"], result["takeover_ms"]
    failed = result["failures"]
    settings = result["settings"]
    orphans = result["orphans_per_kill"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f} ms"

    lines = [
        "# Chaos at scale: repeated SIGKILLs",
        "",
        f"`scripts/chaos --kills {result['kills']}` (the long mode of "
        "`tests/chaos/test_repeated_chaos.py`), "
        f"{result['started_at']}, {result['duration_s'] / 60:.1f} minutes.",
        "",
        f"**{'PASSED' if not failed else 'FAILED'}**: "
        + ("every check held." if not failed else "; ".join(failed)),
        "",
        f"{result['instances']} Keel servers (`python -m server serve`, scripted agent) on one "
        f"Redis, lease {settings['KEEL_LEASE_TTL_S']} s, sweep every "
        f"{settings['KEEL_SWEEP_INTERVAL_S']} s. {result['live_runs']} runs under way at all "
        "times (text, the journaled `record` tool taking 100 ms, text, `record` again, text: "
        "about 2 s undisturbed), each started with StartRun on one server and followed to its "
        "end by a client that resumes on the next server whenever its stream fails. "
        f"{result['kills']} times: wait {KILL_GAP_S[0]:g} to {KILL_GAP_S[1]:g} s, SIGKILL a "
        "random server, read from Redis "
        "which unfinished runs it owned, start it again on its port. Then every run must end.",
        "",
        f"Machine: {result['cpus']} cores, shared with other work (load average at the end: "
        f"{result['load_average']}); the servers, Redis and the test's clients all ran on it.",
        "",
        "## Results",
        "",
        "| | count | must be |",
        "|---|---|---|",
        f"| SIGKILLs | {result['kills']} | |",
        f"| runs started | {tally['runs_started']} | |",
        f"| runs finished (succeeded) | {tally['runs_succeeded']} | all |",
        f"| runs that ended otherwise | {tally['runs_failed']} | 0 |",
        f"| runs stranded (not ended {END_TIMEOUT_S:.0f} s after the last kill) | "
        f"{tally['runs_stranded']} | 0 |",
        f"| runs a killed server owned (taken over at least once) | {tally['runs_taken_over']} | |",
        f"| takeovers (a run and a kill of its owner) | {tally['takeovers_measured']} | |",
        f"| ... whose new owner was killed too before it appended anything | "
        f"{tally['takeovers_chained']} | |",
        f"| `step_superseded` events | {tally['superseded']} | |",
        f"| follower reconnects | {tally['follower_reconnects']} | |",
        f"| lost indices (gaps) seen by followers | {tally['follower_gaps']} | 0 |",
        f"| duplicate indices seen by followers | {tally['follower_duplicates']} | 0 |",
        f"| followers that failed otherwise | {tally['follower_errors']} | 0 |",
        f"| runs whose log is not dense (0..n-1) | {tally['log_not_dense']} | 0 |",
        f"| runs whose follower saw other events than the log holds | "
        f"{tally['follower_differs']} | 0 |",
        f"| runs whose effective text is not the script's | {tally['text_wrong']} | 0 |",
        f"| `record` calls whose effect happened other than once | "
        f"{tally['effects_not_once']} | 0 |",
        f"| journaled `record` calls invoked again after their owner died | "
        f"{tally['journaled_reinvoked']} | 0 |",
        f"| invocations of interrupted `record` calls beyond the first (at least once, "
        f"allowed) | {tally['reinvocations']} | |",
        "",
        "## Takeover time",
        "",
        "From the SIGKILL to the first event a new owner appended to each run the killed "
        "server owned (the event at the run's next index as Redis held it once the killed "
        "process was reaped; event times are the servers' wall clock, the same machine's). "
        "It includes the rest of the dead owner's lease (up to "
        f"{settings['KEEL_LEASE_TTL_S']} s), the sweep, the claim, reading the checkpoint, and "
        "the new owner's first append; when the new owner was itself killed before it "
        "appended, the time runs on to the next one.",
        "",
        "| takeovers | min | median | p95 | worst |",
        "|---|---|---|---|---|",
        f"| {takeover['count']} | {ms(takeover['min'])} | {ms(takeover['median'])} | "
        f"{ms(takeover['p95'])} | {ms(takeover['max'])} |",
        "",
        "| under 1 s | 1 to 1.5 s | 1.5 to 2 s | 2 to 3 s | 3 s or more |",
        "|---|---|---|---|---|",
        "| " + " | ".join(str(n) for n in _buckets(result["takeovers"])) + " |",
        "",
        f"Worst: run `{takeover['worst_run']}` after kill {takeover['worst_kill']}. "
        f"Unfinished runs owned by a killed server: {sum(orphans)} over {len(orphans)} kills "
        f"(at most {max(orphans, default=0)} at once). A killed server listened again "
        f"{result['restart_s']['median'] or 0:.1f} s after its SIGKILL (median; worst "
        f"{result['restart_s']['max'] or 0:.1f} s). Every run had ended "
        f"{result['drain_s']:.1f} s after the last kill.",
        "",
    ]
    if tally["examples"]:
        lines += ["Notes:", "", *[f"- {text}" for text in tally["examples"]], ""]
    return "\n".join(lines)


def _buckets(takeovers: list[dict[str, Any]]) -> list[int]:
    bounds = (1000, 1500, 2000, 3000)
    counts = [0] * (len(bounds) + 1)
    for takeover in takeovers:
        counts[sum(takeover["ms"] >= bound for bound in bounds)] += 1
    return counts


def write_report(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(result))
    path.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
