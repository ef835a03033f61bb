"""Random interleavings on both EventLogs: every observer sees exactly the log from its offset.

An example is a list of operations on two runs of one fresh log (with or
without `retain_events` trimming), played in order against the log and
against a model of what it must hold:

- appends of each run's current writer (some end the run), replays of its
  last batch (a retry after a lost reply), a batch sent twice at once, and
  appends at a wrong index (IndexConflict, nothing written);
- appends of fenced writers (an older epoch, after a takeover), alone or
  racing the current writer's: refused with StaleEpoch, nothing written;
- takeovers (one to three claimers at once, forced or not; a forced one
  racing an append of the current writer, where the claim's record must
  show whether the append went first), renewals and releases by current
  and fenced owners;
- reads at offsets around the start, the earliest retained index and the
  head; observers (harness.Observer: subscribe, read pages, then live with
  re-reads on gaps and on_gap) joining at such offsets, which run as tasks
  of their own and so interleave with everything after them;
- pauses (loop turns, so observers catch up mid-example), drops of the
  pub/sub connection (Redis: its listeners get on_gap) and at most two
  lapses of time (Clock.advance: leases lapse, ended runs expire).

After every operation the runs' records must match the model. At the end,
once the observers caught up, each observer's events are checked against
the model: indices dense from its offset, every event the one committed at
that index, and all of them up to the head, unless it stopped because the
log had trimmed its next event (OffsetExpired: also the one right outcome
for an observer joining below the earliest index) or its ended run expired
(RunNotFound). A notification gap without on_gap, or an event notified
twice, fails the test. Then the log must hold exactly the model's retained
events.

On Redis, leases and retention are tiny (harness.Timing), so a lease may
lapse and an ended run expire at any moment; the model then accepts either
outcome and learns from it, never asserting on time.

Examples: 300 on memory and 60 on Redis, derandomized (the same ones on
every run). KEEL_PROPERTY_EXAMPLES=500 (or any count) runs that many per
backend, random: a failure prints the blob that reproduces it
(@reproduce_failure).
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from keel.v1.agent_service_pb2 import AgentEvent

from server.errors import IndexConflict, OffsetExpired, RunNotFound, StaleEpoch
from server.events.log import EventLog, RunRecord, RunState
from tests.property.harness import (
    Clock,
    Expiry,
    Observer,
    Timing,
    check_dense,
    drop_pubsub_connection,
    ending_event,
    new_key_prefix,
    new_run_id,
    open_log,
    property_settings,
    redis_url_for,
    run_example,
    text_events,
    timeout_for,
    wait_for,
    wire,
)

CI_EXAMPLES = {"memory": 300, "redis": 60}
RUNS = 2
MAX_LAPSES = 2  # Clock.advance waits on Redis: the rest are skipped


# --- operations ----------------------------------------------------------------


@dataclass(frozen=True)
class Append:
    """The current writer appends `count` events; `end`: the last one ends the run."""

    run: int
    count: int
    end: bool


@dataclass(frozen=True)
class FencedAppend:
    """A fenced writer appends at the right index (maybe ending the run): refused."""

    run: int
    writer: int
    count: int
    end: bool


@dataclass(frozen=True)
class Race:
    """The current writer and a fenced one append at the same index at once."""

    run: int
    writer: int
    count: int
    fenced_first: bool


@dataclass(frozen=True)
class Duplicate:
    """The current writer sends a batch and, before its reply, the same batch again."""

    run: int
    count: int


@dataclass(frozen=True)
class ClaimRace:
    """Another instance takes the run over (force) while the current writer appends."""

    run: int
    count: int
    claim_first: bool


@dataclass(frozen=True)
class Replay:
    """The writer of the run's last batch sends it again."""

    run: int


@dataclass(frozen=True)
class Misplaced:
    """The current writer appends other events `shift` away from the next index."""

    run: int
    shift: int


@dataclass(frozen=True)
class Takeover:
    """`claimers` instances claim the run at once."""

    run: int
    force: bool
    claimers: int


@dataclass(frozen=True)
class Renew:
    run: int
    fenced: bool


@dataclass(frozen=True)
class Release:
    run: int
    fenced: bool


class Anchor(enum.Enum):
    START = "start"
    EARLIEST = "earliest"
    HEAD = "head"


@dataclass(frozen=True)
class Read:
    run: int
    anchor: Anchor
    delta: int
    limit: int


@dataclass(frozen=True)
class Join:
    """An observer joins at an offset and follows the run (a task of its own)."""

    run: int
    anchor: Anchor
    delta: int
    page: int


@dataclass(frozen=True)
class Pause:
    turns: int


@dataclass(frozen=True)
class Drop:
    """The pub/sub connection drops (Redis; nothing on memory): listeners get on_gap."""


@dataclass(frozen=True)
class Lapse:
    """Time passes: leases lapse, ended runs expire."""


Op = (
    Append
    | FencedAppend
    | Race
    | Duplicate
    | ClaimRace
    | Replay
    | Misplaced
    | Takeover
    | Renew
    | Release
    | Read
    | Join
    | Pause
    | Drop
    | Lapse
)

_runs = st.integers(0, RUNS - 1)
_anchors = st.sampled_from(Anchor)
_weighted: list[tuple[int, st.SearchStrategy[Op]]] = [
    (4, st.builds(Append, _runs, st.integers(1, 4), st.just(False))),
    (1, st.builds(Append, _runs, st.integers(1, 3), st.just(True))),
    (1, st.builds(FencedAppend, _runs, st.integers(0, 3), st.integers(1, 3), st.booleans())),
    (1, st.builds(Race, _runs, st.integers(0, 3), st.integers(1, 3), st.booleans())),
    (1, st.builds(Duplicate, _runs, st.integers(1, 3))),
    (1, st.builds(ClaimRace, _runs, st.integers(1, 3), st.booleans())),
    (1, st.builds(Replay, _runs)),
    (1, st.builds(Misplaced, _runs, st.sampled_from([-2, -1, 1, 2]))),
    (2, st.builds(Takeover, _runs, st.booleans(), st.integers(1, 3))),
    (1, st.builds(Renew, _runs, st.booleans())),
    (1, st.builds(Release, _runs, st.booleans())),
    (2, st.builds(Read, _runs, _anchors, st.integers(-2, 2), st.integers(1, 6))),
    (3, st.builds(Join, _runs, _anchors, st.integers(-2, 2), st.integers(1, 4))),
    (2, st.builds(Pause, st.integers(1, 5))),
    (1, st.builds(Drop)),
    (1, st.builds(Lapse)),
]
# A strategy listed n times is drawn n times as often (one_of does not weight repeats).
OPS: st.SearchStrategy[Op] = st.sampled_from([s for n, s in _weighted for _ in range(n)]).flatmap(
    lambda strategy: strategy
)


# --- the model -----------------------------------------------------------------


@dataclass
class RunModel:
    run_id: str
    events: list[AgentEvent] = field(default_factory=list)  # every committed event
    epoch: int = 1
    earliest: int = 0
    state: RunState = RunState.RUNNING
    fenced: list[int] = field(default_factory=list)  # epochs of the writers taken over
    last_batch: tuple[int, list[AgentEvent], RunState | None] | None = None  # epoch, events
    lease_free: bool = False  # certainly claimable (released or lapsed) while runnable
    expiry: Expiry = Expiry.NO
    batches: int = 0

    @property
    def next(self) -> int:
        return len(self.events)

    def gone(self, error: RunNotFound) -> None:
        """The log said the run is gone: only an ended run's retention runs out."""
        assert self.expiry is not Expiry.NO, f"{self.run_id} vanished while {self.state}: {error}"
        self.expiry = Expiry.YES


@dataclass
class Joined:
    observer: Observer
    model: RunModel
    below_earliest: bool  # joined below the earliest retained index of a retained run
    after_expiry: bool  # joined a run known to be gone


class Scenario:
    """Plays operations against a log and the model, checking each answer."""

    def __init__(
        self, backend: str, redis_url: str, prefix: str, log: EventLog, clock: Clock, retain: int
    ) -> None:
        self.backend = backend
        self.redis_url = redis_url
        self.prefix = prefix
        self.log = log
        self.clock = clock
        self.retain = retain
        self.timing = Timing.of(backend)
        self.models = [RunModel(new_run_id()) for _ in range(RUNS)]
        self.joined: list[Joined] = []
        self.lapses = 0
        self.owners = 0

    async def start(self) -> None:
        for model in self.models:
            record = RunRecord(
                run_id=model.run_id,
                agent_id="echo",
                input="hello",
                request_id=f"req-{model.run_id}",
                state=RunState.RUNNING,
                create_time_ms=1_000,
                update_time_ms=1_000,
                owner="owner-0",
            )
            stored, created = await self.log.create_run(record)
            assert created and stored == record

    # Writes

    def _commit(self, model: RunModel, events: list[AgentEvent], state: RunState | None) -> None:
        model.events.extend(events)
        model.last_batch = (model.epoch, events, state)
        if self.retain > 0:
            model.earliest = max(model.earliest, model.next - self.retain)
        if state is not None and state.terminal:
            model.state = state
            model.expiry = Expiry.MAYBE if self.backend == "redis" else Expiry.NO

    def _batch(self, model: RunModel, count: int, end: bool) -> list[AgentEvent]:
        model.batches += 1
        tag = f"e{model.epoch}b{model.batches}"
        events = text_events(model.run_id, model.next, count - end, tag)
        if end:
            events.append(ending_event(model.run_id, model.next + count - 1, RunState.SUCCEEDED))
        return events

    async def append(self, op: Append) -> None:
        model = self.models[op.run]
        if model.state.terminal:
            return  # its writer has stopped
        events = self._batch(model, op.count, op.end)
        state = RunState.SUCCEEDED if op.end else None
        head = await self.log.append(model.run_id, model.epoch, events, state=state)
        assert head == model.next + len(events)
        self._commit(model, events, state)

    async def fenced_append(self, op: FencedAppend) -> None:
        model = self.models[op.run]
        if not model.fenced:
            return
        epoch = model.fenced[op.writer % len(model.fenced)]
        events = text_events(model.run_id, model.next, op.count, f"fenced{epoch}")
        state = RunState.FAILED if op.end else None
        try:
            await self.log.append(model.run_id, epoch, events, state=state)
        except StaleEpoch as refused:
            event("fenced append refused")
            assert (refused.epoch, refused.current_epoch) == (epoch, model.epoch)
        except RunNotFound as error:
            model.gone(error)
        else:
            raise AssertionError(f"a writer fenced at epoch {epoch} wrote to {model.run_id}")

    async def race(self, op: Race) -> None:
        model = self.models[op.run]
        if not model.fenced or model.state.terminal:
            return
        epoch = model.fenced[op.writer % len(model.fenced)]
        ours = self._batch(model, op.count, end=False)
        theirs = text_events(model.run_id, model.next, op.count, f"fenced{epoch}")
        current = self.log.append(model.run_id, model.epoch, ours)
        fenced = self.log.append(model.run_id, epoch, theirs)
        calls = (fenced, current) if op.fenced_first else (current, fenced)
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        fenced_outcome, current_outcome = outcomes if op.fenced_first else outcomes[::-1]
        assert isinstance(fenced_outcome, StaleEpoch), f"fenced writer got {fenced_outcome!r}"
        assert current_outcome == model.next + len(ours), f"writer got {current_outcome!r}"
        event("race of a current and a fenced writer")
        self._commit(model, ours, None)

    async def duplicate(self, op: Duplicate) -> None:
        model = self.models[op.run]
        if model.state.terminal:
            return
        events = self._batch(model, op.count, end=False)
        send = [self.log.append(model.run_id, model.epoch, events) for _ in range(2)]
        first, again = await asyncio.gather(*send, return_exceptions=True)
        assert first == model.next + op.count, f"a batch sent twice got {first!r} first"
        self._commit(model, events, None)
        if isinstance(again, IndexConflict):
            # A batch longer than the retention is trimmed as it commits: its replay
            # can no longer be recognized (the replay check needs the whole batch).
            assert events[0].index < model.earliest, f"a replay was refused: {again}"
            event("replay of a batch longer than the retention refused")
        else:
            assert again == first, f"the same batch sent again got {again!r}"

    async def claim_race(self, op: ClaimRace) -> None:
        """Either order is right; the claim's record tells which one the log took."""
        model = self.models[op.run]
        if model.state.terminal:
            return
        events = self._batch(model, op.count, end=False)
        self.owners += 1
        claim = self.log.claim(model.run_id, f"owner-{self.owners}", force=True)
        append = self.log.append(model.run_id, model.epoch, events)
        if op.claim_first:
            claimed, appended = await asyncio.gather(claim, append, return_exceptions=True)
        else:
            appended, claimed = await asyncio.gather(append, claim, return_exceptions=True)
        assert isinstance(claimed, RunRecord), f"a forced claim got {claimed!r}"
        assert claimed.epoch == model.epoch + 1
        if isinstance(appended, StaleEpoch):
            event("claim won the race with an append")
            assert claimed.next_index == model.next, "the claim saw an append that was refused"
        else:
            assert appended == model.next + op.count, f"the append got {appended!r}"
            assert claimed.next_index == appended, "the claim missed an append before it"
            event("append won the race with a claim")
            self._commit(model, events, None)
        model.fenced.append(model.epoch)
        model.epoch += 1
        model.lease_free = False

    async def replay(self, op: Replay) -> None:
        model = self.models[op.run]
        if model.last_batch is None:
            return
        epoch, events, state = model.last_batch
        try:
            head = await self.log.append(model.run_id, epoch, events, state=state)
        except StaleEpoch as refused:
            assert epoch != model.epoch and refused.current_epoch == model.epoch
        except IndexConflict as conflict:
            event("replay of a trimmed batch refused")
            # Only a batch the log no longer keeps whole cannot be recognized as a replay.
            assert events[0].index < model.earliest, f"replay refused: {conflict}"
        except RunNotFound as error:
            model.gone(error)
        else:
            assert epoch == model.epoch, "a replay by a fenced writer was accepted"
            assert head == model.next
            event("replay accepted as a no-op")

    async def misplaced(self, op: Misplaced) -> None:
        model = self.models[op.run]
        start = model.next + op.shift
        if start < 0:
            return
        events = text_events(model.run_id, start, 2, "misplaced")
        try:
            await self.log.append(model.run_id, model.epoch, events)
        except IndexConflict as conflict:
            assert (conflict.first_index, conflict.next_index) == (start, model.next)
        except RunNotFound as error:
            model.gone(error)
        else:
            raise AssertionError(f"an append at {start} (next {model.next}) was accepted")

    # Ownership

    async def takeover(self, op: Takeover) -> None:
        model = self.models[op.run]
        owners = [f"owner-{self.owners + i}" for i in range(1, op.claimers + 1)]
        self.owners += op.claimers
        claims = [self.log.claim(model.run_id, owner, force=op.force) for owner in owners]
        claimed = [record for record in await asyncio.gather(*claims) if record is not None]
        if model.state.terminal or model.expiry is not Expiry.NO:
            assert claimed == [], "an ended run was claimed"
            return
        if op.force:
            assert len(claimed) == op.claimers, "a forced claim of a runnable run failed"
        elif model.lease_free:
            assert claimed, "nobody could claim a run without a lease"
            # Two claimers, one wins (on Redis the winner's tiny lease might lapse first).
            assert self.backend == "redis" or len(claimed) == 1, "two claimers won"
        elif self.backend == "memory":
            assert claimed == [], "a held lease was taken without force"
        if not claimed:
            return  # on Redis the lease may or may not have lapsed by now
        claimed.sort(key=lambda record: record.epoch)
        epochs = [record.epoch for record in claimed]
        assert epochs == list(range(model.epoch + 1, model.epoch + 1 + len(claimed))), epochs
        assert len({record.owner for record in claimed}) == len(claimed)
        for record in claimed:
            assert record.owner in owners and record.state is model.state
            assert (record.next_index, record.earliest_index) == (model.next, model.earliest)
        event(f"takeover (force={op.force}, {len(claimed)} won)")
        model.fenced.extend(range(model.epoch, model.epoch + len(claimed)))
        model.epoch += len(claimed)
        model.lease_free = False

    async def renew(self, op: Renew) -> None:
        model = self.models[op.run]
        if op.fenced:
            if model.fenced:
                assert not await self.log.renew(model.run_id, model.fenced[-1])
            return
        renewed = await self.log.renew(model.run_id, model.epoch)
        assert renewed is (model.state.runnable and model.expiry is Expiry.NO)
        if renewed:
            model.lease_free = False

    async def release(self, op: Release) -> None:
        model = self.models[op.run]
        if op.fenced:
            if model.fenced:  # a no-op: it must not free the current owner's lease
                await self.log.release(model.run_id, model.fenced[-1])
            return
        await self.log.release(model.run_id, model.epoch)
        model.lease_free = True

    # Readers

    def _offset(self, model: RunModel, anchor: Anchor, delta: int) -> int:
        base = {Anchor.START: 0, Anchor.EARLIEST: model.earliest, Anchor.HEAD: model.next}
        return max(0, base[anchor] + delta)

    async def read(self, op: Read) -> None:
        model = self.models[op.run]
        offset = self._offset(model, op.anchor, op.delta)
        try:
            page = await self.log.read(model.run_id, offset, op.limit)
        except RunNotFound as error:
            event("read of an expired run")
            model.gone(error)
            return
        except OffsetExpired as expired:
            event("read below the earliest index refused")
            assert offset < model.earliest, f"read({offset}) refused: {expired}"
            assert (expired.offset, expired.earliest_offset, expired.next_offset) == (
                offset,
                model.earliest,
                model.next,
            )
            return
        assert model.expiry is not Expiry.YES, "an expired run was read"
        assert offset >= model.earliest, f"read({offset}) below earliest {model.earliest}"
        assert wire(page) == wire(model.events[offset : offset + op.limit])

    async def join(self, op: Join) -> None:
        model = self.models[op.run]
        offset = self._offset(model, op.anchor, op.delta)
        observer = Observer(self.log, model.run_id, offset, op.page)
        observer.start()
        below = offset < model.earliest and model.expiry is not Expiry.YES
        self.joined.append(Joined(observer, model, below, model.expiry is Expiry.YES))

    async def pause(self, op: Pause) -> None:
        for _ in range(op.turns):
            await asyncio.sleep(0)

    async def drop(self, _: Drop) -> None:
        if self.backend == "redis" and await drop_pubsub_connection(self.redis_url, self.prefix):
            event("pub/sub connection dropped")

    async def lapse(self, _: Lapse) -> None:
        if self.lapses == MAX_LAPSES:
            return
        self.lapses += 1
        await self.clock.advance(self.timing.lapse_s)
        for model in self.models:
            if model.state.terminal:
                model.expiry = Expiry.YES
            else:
                model.lease_free = True

    async def play(self, op: Op) -> None:
        handlers = {
            Append: self.append,
            FencedAppend: self.fenced_append,
            Race: self.race,
            Duplicate: self.duplicate,
            ClaimRace: self.claim_race,
            Replay: self.replay,
            Misplaced: self.misplaced,
            Takeover: self.takeover,
            Renew: self.renew,
            Release: self.release,
            Read: self.read,
            Join: self.join,
            Pause: self.pause,
            Drop: self.drop,
            Lapse: self.lapse,
        }
        await handlers[type(op)](op)  # type: ignore[operator]
        for model in self.models:
            await self.check_record(model)

    # Checks

    async def check_record(self, model: RunModel) -> None:
        try:
            record = await self.log.get_run(model.run_id)
        except RunNotFound as error:
            model.gone(error)
            return
        assert model.expiry is not Expiry.YES, f"{model.run_id} outlived its retention"
        assert (record.epoch, record.state) == (model.epoch, model.state)
        assert (record.next_index, record.earliest_index) == (model.next, model.earliest)

    async def check_log(self, model: RunModel) -> None:
        """The log holds exactly the model's retained events."""
        kept: list[AgentEvent] = []
        try:
            while page := await self.log.read(model.run_id, model.earliest + len(kept), 7):
                kept.extend(page)
        except RunNotFound as error:
            model.gone(error)
            return
        check_dense(kept, model.earliest)
        assert wire(kept) == wire(model.events[model.earliest :])

    async def finish(self) -> None:
        """Let the observers catch up, stop them and check what each one saw."""

        def caught_up() -> bool:
            return all(j.observer.reached(j.model.next) for j in self.joined)

        await wait_for(caught_up, "observers to reach the head")
        for joined in self.joined:
            await joined.observer.stop()
        for joined in self.joined:
            self.check_observer(joined)
        for model in self.models:
            await self.check_record(model)
            await self.check_log(model)

    def check_observer(self, joined: Joined) -> None:
        observer, model = joined.observer, joined.model
        seen = observer.events
        where = f"observer of {model.run_id} from {observer.offset}"
        check_dense(seen, observer.offset)
        assert wire(seen) == wire(model.events[observer.offset : observer.offset + len(seen)]), (
            f"{where} saw other events than the log's"
        )
        assert observer.gaps_found == 0, f"{where}: a notification went missing without on_gap"
        assert observer.told_twice == 0, f"{where} was notified of an event twice"
        if observer.gaps_told:
            event("observer told on_gap: read the log again")
        stopped = observer.stopped
        if joined.after_expiry:
            assert isinstance(stopped, RunNotFound), f"{where} followed an expired run"
        event(f"observer: {type(stopped).__name__ if stopped else 'followed to the head'}")
        if isinstance(stopped, RunNotFound):
            model.gone(stopped)
        elif isinstance(stopped, OffsetExpired):
            assert stopped.offset == observer.next, f"{where}: {stopped}"
            assert observer.next < stopped.earliest_offset <= model.earliest, f"{where}: {stopped}"
            if joined.below_earliest:
                assert seen == [], f"{where}, below the earliest index, saw events"
        else:
            assert not joined.below_earliest, f"{where}, below the earliest index, was served"
            assert observer.next == max(observer.offset, model.next), (
                f"{where} stopped at {observer.next}, the head is {model.next}"
            )


async def play(backend: str, redis_url: str, retain: int, ops: list[Op]) -> None:
    clock = Clock(jumps=backend == "memory")
    prefix = new_key_prefix()
    log = await open_log(backend, redis_url, clock, retain_events=retain, key_prefix=prefix)
    scenario = Scenario(backend, redis_url, prefix, log, clock, retain)
    try:
        await scenario.start()
        for op in ops:
            await scenario.play(op)
        await scenario.finish()
    finally:
        for joined in scenario.joined:
            if joined.observer.following:
                await joined.observer.stop()
        await log.close()


@pytest.mark.parametrize(
    "backend",
    [pytest.param(name, marks=timeout_for(count, 3.0)) for name, count in CI_EXAMPLES.items()],
)
def test_every_observer_sees_exactly_the_log_from_its_offset(
    backend: str, request: pytest.FixtureRequest
) -> None:
    redis_url = redis_url_for(backend, request)

    @property_settings(CI_EXAMPLES[backend])
    @given(retain=st.sampled_from([0, 2, 3, 5]), ops=st.lists(OPS, min_size=10, max_size=50))
    def interleavings(retain: int, ops: list[Op]) -> None:
        run_example(play(backend, redis_url, retain, ops))

    interleavings()
