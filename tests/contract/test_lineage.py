"""The Redis log's lineage: which redis-server process wrote which events (server/events/
incarnation.py and lineage.py), against real redis-servers restarted on their AOF files."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from server.errors import LogRolledBack, StoreUnavailable
from server.events import lineage
from server.events.redis import RedisEventLog
from tests.conftest import DisposableRedis, _start_redis, _stop_redis
from tests.contract.test_event_log import make_events, new_run


async def run_id_of(url: str) -> str:
    client = aioredis.from_url(url)
    try:
        return str((await client.info("server"))["run_id"])
    finally:
        await client.aclose()


async def test_appends_stamp_the_redis_process_that_wrote_them(
    redis_url: str, key_prefix: str
) -> None:
    log = await RedisEventLog.connect(redis_url, key_prefix=key_prefix)
    try:
        run = await new_run(log)
        assert (await log.get_run(run.run_id)).lineage == ""  # no events, no stamp
        await log.append(run.run_id, 1, make_events(run.run_id, 0, 2))
        await log.append(run.run_id, 1, make_events(run.run_id, 2, 2))
        stamped = (await log.get_run(run.run_id)).lineage
        assert stamped == f"{await run_id_of(redis_url)}@0"
        assert await log.history(run.run_id) == (4, stamped)

        # A flushed script cache is no new incarnation: the same process answers.
        admin = aioredis.from_url(redis_url)
        await admin.script_flush()
        await admin.aclose()
        await log.append(run.run_id, 1, make_events(run.run_id, 4, 1))
        assert (await log.get_run(run.run_id)).lineage == stamped
    finally:
        await log.close()


async def test_no_server_stamps_an_incarnation_it_has_not_noticed_ended(
    tmp_path: Path, key_prefix: str
) -> None:
    """Two servers' logs on one Redis restarted on its AOF: whichever appends first after
    the restart, each stamps the new process, never the one it knew before."""
    process, url = _start_redis(tmp_path, persistence=("--appendonly", "yes"))
    redis = DisposableRedis(url, process, tmp_path, ("--appendonly", "yes"))
    first = await RedisEventLog.connect(url, key_prefix=key_prefix, socket_timeout_s=1)
    second = await RedisEventLog.connect(url, key_prefix=key_prefix, socket_timeout_s=1)
    try:
        a, b = await new_run(first), await new_run(first)
        await first.append(a.run_id, 1, make_events(a.run_id, 0, 3))
        await second.append(b.run_id, 1, make_events(b.run_id, 0, 3))
        before = await run_id_of(url)

        redis.kill()
        redis.restart()
        after = await run_id_of(url)
        assert after != before
        for log in (first, second):  # each notices the restart on its pooled connections
            with pytest.raises(StoreUnavailable):
                await log.ping()
        # `first` loads the new incarnation's script; `second` still believes the old one.
        await first.append(a.run_id, 1, make_events(a.run_id, 3, 1))
        await second.append(b.run_id, 1, make_events(b.run_id, 3, 1))
        await second.append(a.run_id, 1, make_events(a.run_id, 4, 1))
        assert (await first.get_run(a.run_id)).lineage == f"{before}@0,{after}@3"
        assert (await first.get_run(b.run_id)).lineage == f"{before}@0,{after}@3"
    finally:
        await first.close()
        await second.close()
        _stop_redis(redis.process)


def test_a_client_holds_the_logs_history_until_it_went_back() -> None:
    text = "A@0,B@120"
    assert lineage.parse(text) == (("A", 0), ("B", 120))
    assert lineage.latest(text) == "B"
    assert lineage.incarnation_at(lineage.parse(text), 119) == "A"
    lineage.check("r", text, "", 500, 200)  # no incarnation: nothing checked
    lineage.check("r", text, "Z", 0, 200)  # nothing held: nothing to lose
    lineage.check("r", text, "A", 120, 200)  # A's events, all still there
    lineage.check("r", text, "B", 200, 200)
    with pytest.raises(LogRolledBack) as past_a:
        lineage.check("r", text, "A", 150, 200)  # it holds A's 120..149: rewritten by B
    assert past_a.value.diverged_at == 120
    with pytest.raises(LogRolledBack) as past_head:
        lineage.check("r", text, "B", 250, 200)  # it holds more than the log
    assert past_head.value.diverged_at == 200
    with pytest.raises(LogRolledBack) as unknown:
        lineage.check("r", text, "C", 10, 200)  # everything C wrote is gone
    assert unknown.value.diverged_at is None
    with pytest.raises(LogRolledBack):
        lineage.check("r", "", "A", 250, 200)  # no lineage: only the head
    lineage.check("r", "", "A", 200, 200)
