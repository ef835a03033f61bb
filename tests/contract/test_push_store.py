"""The PushStore contract: every test runs against the memory, Redis and PostgreSQL stores
alike."""

from __future__ import annotations

import asyncio

import pytest

from server.a2a.push.factory import push_store_for
from server.a2a.push.store import MAX_CONFIGS_PER_TASK, Delivery, PushConfig, PushStore
from server.errors import InvalidArgument
from tests.contract.test_event_log import OpenEventLog

HOLD_MS = 60_000


@pytest.fixture
async def store(open_event_log: OpenEventLog) -> PushStore:
    return push_store_for(await open_event_log())


def config(config_id: str = "c1", run_id: str = "r1", **fields: object) -> PushConfig:
    values: dict[str, object] = {"url": f"https://example.com/{config_id}", "create_time_ms": 1}
    values.update(fields)
    return PushConfig(config_id, run_id, **values)  # type: ignore[arg-type]


async def test_configs_are_kept_by_run_oldest_first(store: PushStore) -> None:
    await store.put_config(config("b", create_time_ms=2, token="t"))
    await store.put_config(config("a", create_time_ms=3))
    await store.put_config(config("a", run_id="r2"))
    assert [c.config_id for c in await store.configs("r1")] == ["b", "a"]
    assert (await store.configs("r1"))[0].token == "t"
    assert [c.config_id for c in await store.configs("r2")] == ["a"]
    assert await store.configs("r3") == []
    assert await store.delete_config("r1", "b")
    assert not await store.delete_config("r1", "b")
    assert [c.config_id for c in await store.configs("r1")] == ["a"]


async def test_a_run_takes_a_bounded_number_of_configs(store: PushStore) -> None:
    for n in range(MAX_CONFIGS_PER_TASK):
        await store.put_config(config(f"c{n}"))
    with pytest.raises(InvalidArgument):
        await store.put_config(config("one-more"))
    await store.put_config(config("c0", url="https://example.com/replaced"))  # a replacement
    assert (await store.configs("r1"))[0].url == "https://example.com/replaced"


async def test_deliveries_are_recorded_for_existing_configs_only(store: PushStore) -> None:
    await store.put_config(config("c1"))
    await store.record("r1", "c1", Delivery(mark="TASK_STATE_WORKING:1"))
    await store.record("r1", "gone", Delivery(mark="x"))
    assert await store.deliveries("r1") == {"c1": Delivery(mark="TASK_STATE_WORKING:1")}
    # Replacing a config starts its deliveries over; deleting it forgets them.
    await store.put_config(config("c1", url="https://example.com/new"))
    assert await store.deliveries("r1") == {}
    await store.record("r1", "c1", Delivery(attempts=2, not_before_ms=5, error="HTTP 500"))
    await store.delete_config("r1", "c1")
    assert await store.deliveries("r1") == {}


async def test_a_due_run_is_claimed_by_one_holder_until_it_lets_go(store: PushStore) -> None:
    await store.put_config(config("c1", run_id="r1"))
    await store.put_config(config("c1", run_id="r2"))
    assert sorted(await store.claim("a", 10, HOLD_MS)) == ["r1", "r2"]
    assert await store.claim("b", 10, HOLD_MS) == []  # held
    # A new config ends the hold: the next claim (here b's) reads it.
    await store.put_config(config("c2", run_id="r1"))
    assert not await store.renew("r1", "a", HOLD_MS)
    assert await store.claim("b", 10, HOLD_MS) == ["r1"]
    assert not await store.renew("r1", "a", HOLD_MS)
    assert await store.claim("a", 10, HOLD_MS) == []
    await store.release("r1", "b")
    assert await store.claim("a", 10, HOLD_MS) == []
    await store.mark_due("r1")
    assert await store.claim("a", 10, HOLD_MS) == ["r1"]
    assert await store.renew("r1", "a", HOLD_MS)
    assert not await store.renew("r1", "b", HOLD_MS)
    await store.release("r1", "b")  # not b's to release
    assert not await store.renew("r1", "b", HOLD_MS)
    await store.release("r1", "a")
    assert not await store.renew("r1", "a", HOLD_MS)
    assert await store.claim("b", 10, HOLD_MS) == []  # released: not due
    await store.mark_due("r1")
    assert await store.claim("b", 10, HOLD_MS) == ["r1"]


async def test_a_holder_that_stops_renewing_loses_the_run(store: PushStore) -> None:
    await store.put_config(config())
    assert await store.claim("a", 10, 100) == ["r1"]
    await asyncio.sleep(0.25)
    assert await store.claim("b", 10, HOLD_MS) == ["r1"]
    assert not await store.renew("r1", "a", HOLD_MS)
    assert await store.renew("r1", "b", HOLD_MS)


async def test_claim_takes_at_most_limit(store: PushStore) -> None:
    for n in range(5):
        await store.put_config(config(run_id=f"r{n}"))
    assert len(await store.claim("a", 2, HOLD_MS)) == 2
    assert len(await store.claim("a", 10, HOLD_MS)) == 3


async def test_a_config_added_after_release_makes_its_run_due(store: PushStore) -> None:
    """The dispatcher releases, then reads the configs: a config added before that read
    is seen by it, one added after is due by itself."""
    await store.put_config(config("c1"))
    assert await store.claim("a", 10, HOLD_MS) == ["r1"]
    await store.release("r1", "a")
    await store.put_config(config("c2"))
    assert await store.claim("b", 10, HOLD_MS) == ["r1"]


async def test_expire_forgets_the_run(store: PushStore) -> None:
    await store.put_config(config("c1"))
    await store.record("r1", "c1", Delivery(mark="m"))
    await store.expire("r1", 0)
    assert await store.configs("r1") == []
    assert await store.deliveries("r1") == {}
    assert await store.claim("a", 10, HOLD_MS) == []
    await store.put_config(config("c1", run_id="r2"))
    await store.expire("r2", 150)
    assert await store.claim("a", 10, HOLD_MS) == []  # out of the index at once
    assert [c.config_id for c in await store.configs("r2")] == ["c1"]
    await asyncio.sleep(0.4)
    assert await store.configs("r2") == []
