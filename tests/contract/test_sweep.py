"""The sweep's view of leases: `claimable` finds every run that needs an owner, and on
Redis reads nothing of the healthy ones.

The first tests run on both backends (the contract). The Redis-only ones at the
end check how: the lease deadline set (server/events/keys.py) that every write
of a lease keeps, so that a sweep looks only at runs whose deadline came, and
the full pass of the active set that finds runs without a deadline (written
before the deadline set existed, or whose deadline write a crash lost).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

import pytest
import redis.asyncio as aioredis

from server.events import redis as redis_log
from server.events import scripts
from server.events.keys import Keys, parse_run_index_member
from server.events.log import BusyPolicy, EventLog, RunState
from server.events.redis import RedisEventLog
from tests.contract.test_event_log import (
    RENEWED_LEASE_TTL_S,
    SHORT_TTL_S,
    DisposableRedis,
    LogClock,
    OpenEventLog,
    make_events,
    new_run,
)
from tests.contract.test_event_log_threads import finish, new_thread, run_on

# --- both backends -------------------------------------------------------------


async def test_among_renewed_runs_only_the_one_whose_lease_lapsed_is_claimable(
    open_event_log: OpenEventLog, log_clock: LogClock
) -> None:
    log = await open_event_log(lease_ttl_s=RENEWED_LEASE_TTL_S)
    healthy = [await new_run(log) for _ in range(20)]
    doomed = await new_run(log)  # its owner dies: nobody renews it
    for _ in range(2):  # together longer than the TTL
        await log_clock.advance(RENEWED_LEASE_TTL_S * 0.6)
        for run in healthy:
            assert await log.renew(run.run_id, 1)
        assert set(await log.claimable(100)) <= {doomed.run_id}
    assert await log.claimable(100) == [doomed.run_id]

    claimed = await log.claim(doomed.run_id, "instance-b")
    assert claimed is not None
    assert await log.claimable(100) == []


async def test_a_claimed_run_is_claimable_again_once_its_new_owners_lease_lapses(
    open_event_log: OpenEventLog, log_clock: LogClock
) -> None:
    log = await open_event_log(lease_ttl_s=SHORT_TTL_S)
    run = await new_run(log)
    await log_clock.advance(SHORT_TTL_S * 2.5)
    assert await log.claimable(10) == [run.run_id]
    assert await log.claim(run.run_id, "instance-b") is not None
    assert await log.claimable(10) == []
    await log_clock.advance(SHORT_TTL_S * 2.5)  # instance-b dies too
    assert await log.claimable(10) == [run.run_id]


async def test_a_renewal_after_a_lapse_makes_the_run_owned_again(
    open_event_log: OpenEventLog, log_clock: LogClock
) -> None:
    log = await open_event_log(lease_ttl_s=RENEWED_LEASE_TTL_S)
    run = await new_run(log)
    await log_clock.advance(RENEWED_LEASE_TTL_S * 1.5)
    assert await log.claimable(10) == [run.run_id]
    assert await log.renew(run.run_id, 1)  # the slow owner came back before any claim
    assert await log.claimable(10) == []


async def test_a_released_run_among_healthy_ones_is_claimable_at_once(event_log: EventLog) -> None:
    runs = [await new_run(event_log) for _ in range(10)]
    await event_log.release(runs[3].run_id, 1)
    assert await event_log.claimable(100) == [runs[3].run_id]


async def test_more_claimable_runs_than_a_page_are_all_found(event_log: EventLog) -> None:
    runs = [await new_run(event_log) for _ in range(230)]  # above redis.py's _DUE_PAGE
    for run in runs:
        await event_log.release(run.run_id, 1)
    found = await event_log.claimable(1000)
    assert sorted(found) == sorted(r.run_id for r in runs)
    assert len(await event_log.claimable(50)) == 50


async def test_a_resumed_run_is_claimable_once_its_resumers_lease_lapses(
    open_event_log: OpenEventLog, log_clock: LogClock
) -> None:
    log = await open_event_log(lease_ttl_s=SHORT_TTL_S)
    run = await new_run(log)
    await log.append(run.run_id, 1, make_events(run.run_id, 0, 1), state=RunState.SUSPENDED)
    assert await log.claimable(10) == []
    await log.decide(run.run_id, expected_epoch=1, decisions=b"{}", owner="instance-b", resume=True)
    assert await log.claimable(10) == [], "the resumer holds a lease"
    await log_clock.advance(SHORT_TTL_S * 2.5)  # and dies
    assert await log.claimable(10) == [run.run_id]


async def test_a_cancel_request_makes_a_suspended_run_claimable_at_once(
    event_log: EventLog,
) -> None:
    run = await new_run(event_log)
    await event_log.append(run.run_id, 1, make_events(run.run_id, 0, 1), state=RunState.SUSPENDED)
    assert await event_log.claimable(10) == []
    await event_log.request_cancel(run.run_id, "stop")
    assert await event_log.claimable(10) == [run.run_id]


async def test_a_thread_run_whose_owner_dies_before_renewing_is_claimable(
    open_event_log: OpenEventLog, log_clock: LogClock
) -> None:
    log = await open_event_log(lease_ttl_s=SHORT_TTL_S)
    thread = await new_thread(log)
    first, second = run_on(thread.thread_id), run_on(thread.thread_id)
    await log.start_thread_run(first, BusyPolicy.REJECT)
    await log.start_thread_run(second, BusyPolicy.ENQUEUE)
    assert await log.claimable(10) == []
    await log_clock.advance(SHORT_TTL_S * 2.5)
    assert await log.claimable(10) == [first.run_id]
    claimed = await log.claim(first.run_id, "instance-b")
    assert claimed is not None
    await finish(log, claimed, [b"m"])
    assert await log.claimable(10) == [second.run_id], "promoted, and nobody owns it"


# --- Redis only ----------------------------------------------------------------


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=False)
    yield client
    await client.aclose()


async def _calls(client: aioredis.Redis) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT (those of scripts included)."""
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}


async def _redis_now_ms(client: aioredis.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_redis_a_sweep_reads_nothing_of_the_healthy_runs(
    disposable_redis: DisposableRedis,
) -> None:
    """200 live runs with their leases held: a sweep reads the one that needs an
    owner, not the 200 (before the deadline set: 201 HMGETs and 201 EXISTS each)."""
    log = await RedisEventLog.connect(disposable_redis.url, key_prefix="k", lease_ttl_s=30)
    counter = aioredis.Redis.from_url(disposable_redis.url)
    try:
        healthy = [await new_run(log) for _ in range(200)]
        released = await new_run(log)
        await log.release(released.run_id, 1)
        for first_sweep in (True, False):  # the first one also walks the active set
            await counter.config_resetstat()
            assert await log.claimable(100) == [released.run_id]
            calls = await _calls(counter)
            per_run_reads = sum(calls.get(c, 0) for c in ("hmget", "pttl", "exists"))
            assert per_run_reads <= 2, calls  # the released run's state and lease
            assert calls.get("sscan", 0) == (1 if first_sweep else 0), calls
            # ... and prunes the run index: two pages of it, every PRUNE_INTERVAL_S.
            assert calls.get("hget", 0) == (201 if first_sweep else 0), calls
        for run in healthy[:50]:
            assert await log.renew(run.run_id, 1)
        await counter.config_resetstat()
        assert await log.claimable(100) == [released.run_id]
        assert (await _calls(counter)).get("hmget", 0) == 1
    finally:
        await counter.aclose()
        await log.close()


async def test_redis_deadlines_follow_the_lease(
    redis_url: str, key_prefix: str, raw_redis: aioredis.Redis
) -> None:
    keys = Keys(key_prefix)
    log = await RedisEventLog.connect(redis_url, key_prefix=key_prefix, lease_ttl_s=30)

    async def deadline(run_id: str) -> float | None:
        return await raw_redis.zscore(keys.lease_deadlines, run_id)

    async def pttl_deadline(run_id: str) -> int:
        return await _redis_now_ms(raw_redis) + await raw_redis.pttl(keys.lease(run_id))

    try:
        run = await new_run(log)
        created = await deadline(run.run_id)
        assert created is not None and abs(created - await pttl_deadline(run.run_id)) <= 50
        await asyncio.sleep(0.01)
        assert await log.renew(run.run_id, 1)
        renewed = await deadline(run.run_id)
        assert renewed is not None and renewed > created
        assert abs(renewed - await pttl_deadline(run.run_id)) <= 50

        await log.release(run.run_id, 1)
        released = await deadline(run.run_id)
        assert released is not None and released <= await _redis_now_ms(raw_redis)
        claimed = await log.claim(run.run_id, "instance-b")
        assert claimed is not None
        assert abs((await deadline(run.run_id) or 0) - await pttl_deadline(run.run_id)) <= 50

        await log.append(run.run_id, 2, [], state=RunState.SUSPENDED)
        suspended = await deadline(run.run_id)
        assert suspended is not None and suspended <= await _redis_now_ms(raw_redis)
        assert await log.claimable(10) == []
        assert await deadline(run.run_id) is None, "a suspended run leaves it"
        assert not await raw_redis.sismember(keys.active_runs, run.run_id)

        await log.decide(run.run_id, expected_epoch=2, decisions=b"{}", owner="c", resume=True)
        assert abs((await deadline(run.run_id) or 0) - await pttl_deadline(run.run_id)) <= 50
        await log.append(run.run_id, 3, [], state=RunState.SUCCEEDED)
        assert await deadline(run.run_id) is None, "an ended run leaves it at once"
    finally:
        await log.close()


async def test_redis_a_due_member_still_leased_moves_to_its_lease_deadline(
    redis_url: str, key_prefix: str, raw_redis: aioredis.Redis
) -> None:
    """As after a claim whose deadline write was lost: looked at once, then left alone."""
    keys = Keys(key_prefix)
    log = await RedisEventLog.connect(redis_url, key_prefix=key_prefix, lease_ttl_s=30)
    try:
        run = await new_run(log)
        await raw_redis.zadd(keys.lease_deadlines, {run.run_id: 0})
        assert await log.claimable(10) == []
        moved = await raw_redis.zscore(keys.lease_deadlines, run.run_id)
        lapses = await _redis_now_ms(raw_redis) + await raw_redis.pttl(keys.lease(run.run_id))
        # TIME and PTTL are read apart and rounded to ms: the two may differ by a few.
        assert moved is not None and abs(moved - lapses) <= 100
    finally:
        await log.close()


async def test_redis_reschedule_leaves_a_deadline_a_writer_moved_meanwhile(
    redis_url: str, key_prefix: str, raw_redis: aioredis.Redis
) -> None:
    key = Keys(key_prefix).lease_deadlines
    await raw_redis.zadd(key, {"a": 5, "b": 7})
    moved = await raw_redis.eval(scripts.RESCHEDULE, 1, key, "a", "5", "100", "b", "6", "200")
    assert moved == 1
    assert await raw_redis.zscore(key, "a") == 100
    assert await raw_redis.zscore(key, "b") == 7, "read as 6: someone moved it since"


async def test_redis_stale_deadlines_and_active_members_are_removed(
    redis_url: str, key_prefix: str, raw_redis: aioredis.Redis
) -> None:
    keys = Keys(key_prefix)
    log = await RedisEventLog.connect(redis_url, key_prefix=key_prefix, lease_ttl_s=30)
    try:
        ended, live = await new_run(log), await new_run(log)
        await log.append(ended.run_id, 1, [], state=RunState.FAILED)
        # As if the removals after the terminal append were lost, and a run vanished.
        await raw_redis.zadd(keys.lease_deadlines, {ended.run_id: 0, "gone": 0})
        await raw_redis.sadd(keys.active_runs, ended.run_id, "gone")
        assert await log.claimable(10) == []
        left = cast(list[bytes], await raw_redis.zrange(keys.lease_deadlines, 0, -1))
        assert {m.decode() for m in left} == {live.run_id}
        active = cast(set[bytes], await raw_redis.smembers(keys.active_runs))
        assert {m.decode() for m in active} == {live.run_id}
    finally:
        await log.close()


async def test_redis_runs_without_a_deadline_are_found_by_a_servers_first_sweep(
    redis_url: str, key_prefix: str, raw_redis: aioredis.Redis
) -> None:
    """Runs from before the deadline set (in the active set only): the first sweep of
    a server walks the whole active set, and each run found gets its deadline."""
    keys = Keys(key_prefix)
    log = await RedisEventLog.connect(redis_url, key_prefix=key_prefix, lease_ttl_s=30)
    try:
        assert await log.claimable(10) == []  # its first full pass, over nothing
        lapsed, leased = await new_run(log), await new_run(log)
        # Their owner's server predates the deadline set; lapsed's owner died.
        await raw_redis.zrem(keys.lease_deadlines, lapsed.run_id, leased.run_id)
        await raw_redis.delete(keys.lease(lapsed.run_id))
        assert await log.claimable(10) == [], "only the next full pass looks at them"

        upgraded = await RedisEventLog.connect(redis_url, key_prefix=key_prefix, lease_ttl_s=30)
        try:
            assert await upgraded.claimable(10) == [lapsed.run_id]
        finally:
            await upgraded.close()
        assert await log.claimable(10) == [lapsed.run_id], "due now, for every server"
        deadline = await raw_redis.zscore(keys.lease_deadlines, leased.run_id)
        lapses = await _redis_now_ms(raw_redis) + await raw_redis.pttl(keys.lease(leased.run_id))
        assert deadline is not None and abs(deadline - lapses) <= 1000  # TIME, PTTL apart
    finally:
        await log.close()


async def test_redis_a_running_servers_sweep_walks_the_active_set_again_every_interval(
    redis_url: str, key_prefix: str, raw_redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_log, "FULL_PASS_INTERVAL_S", 0.5)
    keys = Keys(key_prefix)
    log = await RedisEventLog.connect(redis_url, key_prefix=key_prefix, lease_ttl_s=30)
    try:
        assert await log.claimable(10) == []  # its first full pass, over nothing
        run = await new_run(log)
        # Its deadline write was lost (a crash between the script and it), and its owner died.
        await raw_redis.zrem(keys.lease_deadlines, run.run_id)
        await raw_redis.delete(keys.lease(run.run_id))
        await asyncio.sleep(0.6)
        assert await log.claimable(10) == [run.run_id]
    finally:
        await log.close()


async def test_redis_sweeps_prune_the_run_index_of_expired_runs(
    redis_url: str, key_prefix: str, raw_redis: aioredis.Redis
) -> None:
    """Ended runs expire after their retention; their index members go with the next
    sweep's pruning, not only when a ListRuns walks past them. Live runs stay listed."""
    log = await RedisEventLog.connect(redis_url, key_prefix=key_prefix, terminal_ttl_s=0.2)
    keys = Keys(key_prefix)
    try:
        ended = [await new_run(log) for _ in range(5)]
        live = await new_run(log)
        for run in ended:
            await log.append(run.run_id, 1, [], state=RunState.SUCCEEDED)
        assert await raw_redis.zcard(keys.run_index) == 6
        await asyncio.sleep(0.5)  # their retention passes
        await log.claimable(10)  # the first sweep prunes
        members = await raw_redis.zrange(keys.run_index, 0, -1)
        assert [parse_run_index_member(m)[1] for m in members] == [live.run_id]
    finally:
        await log.close()
