"""The push dispatcher against a config replaced at the worst moments: between its reads of
a run's deliveries and configs, and between its last reading and the configs' expiry. The
new config must be told either way (a store's steps are separate round trips, so on Redis
and PostgreSQL such a config can land anywhere between them)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import cast

from a2a.types import a2a_pb2 as a2a

from server.a2a.push.dispatcher import Dispatcher
from server.a2a.push.memory import MemoryPushStore
from server.a2a.push.sender import Sender
from server.a2a.push.store import Delivery, PushConfig
from server.events.log import RunRecord, RunState
from server.events.memory import MemoryEventLog
from tests.contract.test_event_log import make_events, new_run


class RacingStore(MemoryPushStore):
    """A memory store that, once armed, lets `replacement` land right after a read."""

    def __init__(self) -> None:
        super().__init__()
        self.released = False
        self.armed: tuple[frozenset[str], Callable[[], bool]] | None = None
        self.replacement: PushConfig | None = None

    async def _after(self, read: str) -> None:
        if self.armed is None or read not in self.armed[0] or not self.armed[1]():
            return
        self.armed = None
        assert self.replacement is not None
        await self.put_config(self.replacement)

    async def configs(self, run_id: str) -> list[PushConfig]:
        found = await super().configs(run_id)
        await self._after("configs")
        return found

    async def deliveries(self, run_id: str) -> dict[str, Delivery]:
        found = await super().deliveries(run_id)
        await self._after("deliveries")
        return found

    async def release(self, run_id: str, owner: str) -> None:
        self.released = True
        await super().release(run_id, owner)


class Told:
    """A Sender whose every delivery succeeds; it keeps the urls it was given."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    async def send(self, config: PushConfig, task: a2a.Task) -> str:
        self.urls.append(config.url)
        return ""

    async def close(self) -> None:
        pass


async def snapshot(record: RunRecord) -> a2a.Task:
    return a2a.Task(id=record.run_id)


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def ended_run_with_a_told_config() -> tuple[RacingStore, Told, Dispatcher, str]:
    log = MemoryEventLog()
    run = await new_run(log)
    await log.append(run.run_id, 1, make_events(run.run_id, 0, 1), state=RunState.SUCCEEDED)
    store, told = RacingStore(), Told()
    dispatcher = Dispatcher(
        log,
        store,
        cast(Sender, told),
        snapshot,
        instance_id="d",
        hold_ms=5_000,
        sweep_interval_s=0.02,
        retry_initial_ms=10,
        retry_max_ms=100,
        retention_ms=86_400_000,
    )
    dispatcher.open()
    await store.put_config(PushConfig("c0", run.run_id, "https://example.com/first"))
    dispatcher.poke(run.run_id)
    await until(lambda: told.urls == ["https://example.com/first"] and store.released)
    await asyncio.sleep(0.05)  # its watcher is done: expired, out of the index
    store.released = False
    store.replacement = PushConfig("c0", run.run_id, "https://example.com/again")
    return store, told, dispatcher, run.run_id


async def test_a_config_replaced_between_the_two_reads_is_told() -> None:
    store, told, dispatcher, run_id = await ended_run_with_a_told_config()
    try:
        # The next pass's first read (whichever it is) is followed by the replacement.
        store.armed = (frozenset({"deliveries", "configs"}), lambda: True)
        await store.mark_due(run_id)
        dispatcher.poke(run_id)
        await until(lambda: "https://example.com/again" in told.urls)
    finally:
        await dispatcher.close()


async def test_a_config_replaced_between_the_last_reading_and_the_expiry_is_told() -> None:
    store, told, dispatcher, run_id = await ended_run_with_a_told_config()
    try:
        # The pass ends (released); its reading of the configs is followed by the replacement.
        store.armed = (frozenset({"configs"}), lambda: store.released)
        await store.put_config(PushConfig("c1", run_id, "https://example.com/second"))
        dispatcher.poke(run_id)
        await until(lambda: "https://example.com/again" in told.urls)
        assert told.urls.count("https://example.com/second") == 1
    finally:
        await dispatcher.close()
