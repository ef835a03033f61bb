"""The ceilings' client side: raw grpc.aio streaming, raw redis-py and raw psycopg, without Keel.

Each function runs in a client process of its own (see child.py) and
returns a JSON-able dict. The gRPC ones talk to bench/raw_grpc.py; the
Redis one to one of the benchmark's stores (a redis-server, or a cluster:
redis+cluster://); the PostgreSQL one to the benchmark's PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import psycopg
from keel.v1 import agent_service_pb2 as pb
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from bench.raw_grpc import METHOD, text_delta_event
from bench.stats import latency_summary_ms, median, spread

Params = dict[str, Any]


def _method(channel: grpc.aio.Channel) -> Any:
    return channel.unary_stream(
        METHOD,
        request_serializer=lambda data: data,
        response_deserializer=pb.StreamResponse.FromString,
    )


async def _read_stream(method: Any, request: bytes, start_ns: int) -> dict[str, int]:
    """Read one raw stream to its end: first and last receive times, messages, events."""
    first_ns = last_ns = 0
    messages = events = 0
    async for response in method(request):
        last_ns = time.perf_counter_ns()
        if not first_ns:
            first_ns = last_ns
        messages += 1
        events += len(response.events.events)
    return {
        "first_ms": (first_ns - start_ns) // 1000,
        "last_ns": last_ns,
        "messages": messages,
        "events": events,
    }


async def grpc_stream(params: Params) -> Params:
    """Messages/s (and events/s) of `streams` concurrent raw streams, best of `reps`.

    The time runs from the moment the requests are sent to the last message
    received, as for Keel's Stream, on a channel that is already connected.
    A ceiling is the best the machine did: the best rep is the headline, the
    spread is kept beside it.
    """
    streams, reps = int(params["streams"]), int(params["reps"])
    request = json.dumps(
        {"mode": "stream", "messages": int(params["messages"]), "batch": int(params["batch"])}
    ).encode()
    runs: list[Params] = []
    async with grpc.aio.insecure_channel(params["target"]) as channel:
        await channel.channel_ready()
        method = _method(channel)
        for _ in range(reps):
            start_ns = time.perf_counter_ns()
            results = await asyncio.gather(
                *(_read_stream(method, request, start_ns) for _ in range(streams))
            )
            total_s = (max(r["last_ns"] for r in results) - start_ns) / 1e9
            messages = sum(r["messages"] for r in results)
            events = sum(r["events"] for r in results)
            runs.append(
                {
                    "total_s": total_s,
                    "messages": messages,
                    "events": events,
                    "messages_per_s": messages / total_s,
                    "events_per_s": events / total_s,
                    "time_to_first_ms": min(r["first_ms"] for r in results) / 1000,
                }
            )
    best = max(runs, key=lambda r: r["messages_per_s"])
    return {
        "streams": streams,
        "messages_per_s": best["messages_per_s"],
        "events_per_s": best["events_per_s"],
        "total_ms": best["total_s"] * 1000,
        "time_to_first_ms": min(r["time_to_first_ms"] for r in runs),
        "messages_per_s_spread": spread([r["messages_per_s"] for r in runs]),
        "total_ms_spread": spread([r["total_s"] * 1000 for r in runs]),
        "reps": runs,
    }


async def grpc_fanout(params: Params) -> Params:
    """Latency from stamping an event to receiving it, over `streams` raw streams.

    Measured `reps` times; the rep with the lowest p99 is the ceiling.
    """
    reps = [await _fanout_once(params) for _ in range(int(params.get("reps", 1)))]
    best = min(reps, key=lambda r: r["p99_ms"])
    return {**best, "p99_ms_spread": spread([r["p99_ms"] for r in reps])}


async def _fanout_once(params: Params) -> Params:
    streams, ticks = int(params["streams"]), int(params["ticks"])
    warmup = int(params.get("warmup_ticks", 5))
    request = json.dumps(
        {
            "mode": "fanout",
            "group": uuid.uuid4().hex,
            "streams": streams,
            "ticks": ticks,
            "interval_ms": int(params["interval_ms"]),
        }
    ).encode()
    latencies: list[int] = []

    async def follow(method: Any) -> int:
        received = 0
        async for response in method(request):
            now = time.time_ns()
            for event in response.events.events:
                received += 1
                if event.index >= warmup:
                    latencies.append(now - event.time.ToNanoseconds())
        return received

    async with grpc.aio.insecure_channel(params["target"]) as channel:
        await channel.channel_ready()
        method = _method(channel)
        received = await asyncio.gather(*(follow(method) for _ in range(streams)))
    return {
        "streams": streams,
        "ok": all(n == ticks for n in received),
        **latency_summary_ms(latencies),
    }


# A minimal append: the next index, the ZADD and the PUBLISH Keel's APPEND does,
# without its checks (epoch, expected index, state, retention, TTL). On a cluster it
# SPUBLISHes, as Keel's scripts do there.
# KEYS[1] counter, KEYS[2] events ZSET; ARGV[1] channel, ARGV[2..] members.
RAW_APPEND = """
local n = #ARGV - 1
local last = redis.call('INCRBY', KEYS[1], n)
local args = {}
for i = 1, n do
  args[#args + 1] = last - n + i - 1
  args[#args + 1] = ARGV[i + 1]
end
redis.call('ZADD', KEYS[2], unpack(args))
redis.call('PUBLISH', ARGV[1], ARGV[n + 1])
return last
"""


CLUSTER_SCHEME = "redis+cluster://"


def _client(url: str) -> Redis | RedisCluster:
    """One Redis, or a cluster found from one of its nodes (redis+cluster://)."""
    if url.startswith(CLUSTER_SCHEME):
        return RedisCluster.from_url("redis://" + url.removeprefix(CLUSTER_SCHEME))
    return Redis.from_url(url)


async def append_rates(
    variants: dict[str, tuple[int, int]],
    timed: Callable[[int, int], Awaitable[float]],
    events: int,
    reps: int,
) -> Params:
    """Each variant (name: (batch, pipelined)) measured `reps` times, in rounds (so a slow
    moment of the machine does not fall on one variant only): its best rate, in events
    and calls per second, and the spread of its rates."""
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(max(1, reps)):
        for name, (batch, pipelined) in variants.items():
            rates[name].append(events / await timed(batch, pipelined))
    results: Params = {}
    for name, (batch, _pipelined) in variants.items():
        best = max(rates[name])
        results[name] = {
            "events_per_s": best,
            "calls_per_s": best / batch,
            "events_per_s_spread": spread(rates[name]),
        }
    return results


async def redis(params: Params) -> Params:
    """Raw redis-py: Lua appends (one at a time, pipelined, batched) and ZRANGEBYSCORE.

    Nobody subscribes to the channel the appends publish on. Each append
    variant is measured `append_reps` times (in rounds, so a slow moment of the
    machine does not fall on one variant only), the reads `reps` times; the
    best counts (a ceiling is the best the machine did), the spread is kept
    beside it. Each variant's keys share a hash tag (one slot: one node of a
    cluster, as a Keel run's keys do).
    """
    events = int(params["events"])
    members = [text_delta_event(i).SerializeToString() for i in range(events)]
    client = _client(params["url"])
    try:
        script = RAW_APPEND
        if isinstance(client, RedisCluster):
            script = script.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
        append = client.register_script(script)
        await client.script_load(script)  # on a cluster: on every node
        results: Params = {"member_bytes": median([len(m) for m in members])}

        async def timed(batch: int, pipelined: int) -> float:
            """Append every member, `batch` per call or `pipelined` calls at a time: s."""
            prefix = f"ceiling:{{{uuid.uuid4().hex}}}"
            keys = [f"{prefix}:next", f"{prefix}:events"]
            channel = f"{prefix}:live"
            start = time.perf_counter()
            if pipelined > 1:
                for first in range(0, events, pipelined):
                    async with client.pipeline(transaction=False) as pipe:
                        for member in members[first : first + pipelined]:
                            # EVALSHA itself: a cluster's pipeline refuses a Script's call.
                            pipe.execute_command("EVALSHA", append.sha, 2, *keys, channel, member)
                        await pipe.execute()
            else:
                for first in range(0, events, batch):
                    await append(keys=keys, args=[channel, *members[first : first + batch]])
            elapsed = time.perf_counter() - start
            await client.delete(*keys)  # a store with an AOF keeps no more than it must
            return elapsed

        await append(keys=["{warm}:next", "{warm}:events"], args=["{warm}:live", b"x"])
        variants = {
            "lua_append_one": (1, 1),
            "lua_append_pipelined_100": (1, 100),
            "lua_append_batch_10": (10, 1),
            "lua_append_batch_100": (100, 1),
            "lua_append_batch_1000": (1000, 1),
        }
        results.update(
            await append_rates(variants, timed, events, int(params.get("append_reps", 1)))
        )

        # ZRANGEBYSCORE of a 10,000-event run (or `events`), read whole and in pages.
        key = f"ceiling:{{{uuid.uuid4().hex}}}:events"
        for first in range(0, events, 1000):
            page = members[first : first + 1000]
            await client.zadd(key, {member: first + i for i, member in enumerate(page)})
        whole: list[float] = []
        paged: list[float] = []
        for _ in range(int(params.get("reps", 7))):
            start = time.perf_counter()
            got = await client.zrangebyscore(key, 0, "+inf")
            whole.append((time.perf_counter() - start) * 1000)
            assert len(got) == events
            start = time.perf_counter()
            for first in range(0, events, 1000):
                await client.zrangebyscore(key, first, "+inf", start=0, num=1000)
            paged.append((time.perf_counter() - start) * 1000)
        results["zrangebyscore_all"] = {
            "events": events,
            "ms": min(whole),
            "spread_ms": spread(whole),
        }
        results["zrangebyscore_pages_1000"] = {
            "events": events,
            "ms": min(paged),
            "spread_ms": spread(paged),
        }
        return results
    finally:
        await client.aclose()


# The raw PostgreSQL ceiling's table: the shape of Keel's events table (one row per event,
# its serialized AgentEvent as bytea, the primary key its run and index), in a schema of
# its own, without Keel's runs row, checks, trimming or NOTIFY.
PG_TABLE = """
CREATE TABLE {schema}.events (
    run_id text NOT NULL,
    idx bigint NOT NULL,
    body bytea NOT NULL,
    PRIMARY KEY (run_id, idx)
)
"""
# One row: a bare INSERT. A batch: one INSERT of every row from one array parameter (as
# Keel's append_events inserts a batch).
PG_INSERT_ONE = "INSERT INTO {schema}.events (run_id, idx, body) VALUES (%s, %s, %s)"
PG_INSERT_BATCH = (
    "INSERT INTO {schema}.events (run_id, idx, body) "
    "SELECT %s, %s + u.o - 1, u.b FROM unnest(%s::bytea[]) WITH ORDINALITY AS u(b, o)"
)
PG_READ_ALL = "SELECT body FROM {schema}.events WHERE run_id = %s AND idx >= %s ORDER BY idx"
PG_READ_PAGE = PG_READ_ALL + " LIMIT 1000"
# The same rows as one bytea[] value (one row to decode instead of one per event), as
# Keel's read does.
PG_READ_ALL_ARRAY = f"SELECT ARRAY({PG_READ_ALL})"
PG_READ_PAGE_ARRAY = f"SELECT ARRAY({PG_READ_PAGE})"


async def postgres(params: Params) -> Params:
    """Raw psycopg 3 (async, autocommit, as Keel uses it): a bare INSERT of the same
    serialized events Keel appends (one at a time, 100 pipelined, batched 10, 100 and
    1000 per INSERT), and reads of them by the primary key, whole and in pages of 1000,
    as rows (one per event) and as one bytea[] per read (what Keel's read does).

    The raw PostgreSQL counterpart of `redis`, variant for variant: each append variant
    `append_reps` times in rounds, the reads `reps` times; the best counts, the spread is
    kept beside it. Each rep inserts a run of its own (a fresh run_id) into one table, so
    the index grows as a store's does; the schema is dropped at the end.
    """
    events = int(params["events"])
    members = [text_delta_event(i).SerializeToString() for i in range(events)]
    schema = f"ceiling_{uuid.uuid4().hex[:8]}"
    one, batch_sql = PG_INSERT_ONE.format(schema=schema), PG_INSERT_BATCH.format(schema=schema)
    conn = await psycopg.AsyncConnection.connect(params["url"], autocommit=True)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(PG_TABLE.format(schema=schema))
        results: Params = {"member_bytes": median([len(m) for m in members])}

        async def timed(batch: int, pipelined: int) -> float:
            """Insert every member, `batch` per INSERT or `pipelined` INSERTs per round
            trip (psycopg's pipeline mode): s."""
            run_id = uuid.uuid4().hex
            start = time.perf_counter()
            if pipelined > 1:
                for first in range(0, events, pipelined):
                    async with conn.pipeline():
                        for i in range(first, min(events, first + pipelined)):
                            await conn.execute(one, (run_id, i, members[i]), prepare=True)
            elif batch == 1:
                for i, member in enumerate(members):
                    await conn.execute(one, (run_id, i, member), prepare=True)
            else:
                for first in range(0, events, batch):
                    await conn.execute(
                        batch_sql, (run_id, first, members[first : first + batch]), prepare=True
                    )
            return time.perf_counter() - start

        await timed(min(events, 100), 1)  # warm: the statements prepared, the table touched
        variants = {
            "insert_one": (1, 1),
            "insert_pipelined_100": (1, 100),
            "insert_batch_10": (10, 1),
            "insert_batch_100": (100, 1),
            "insert_batch_1000": (1000, 1),
        }
        results.update(
            await append_rates(variants, timed, events, int(params.get("append_reps", 1)))
        )

        # One run of `events` rows read by the primary key, whole and in pages of 1000.
        run_id = uuid.uuid4().hex
        for first in range(0, events, 1000):
            await conn.execute(batch_sql, (run_id, first, members[first : first + 1000]))
        await conn.execute(f"ANALYZE {schema}.events")
        reads = {
            "select_all": (PG_READ_ALL, False, False),
            "select_pages_1000": (PG_READ_PAGE, True, False),
            "select_array_all": (PG_READ_ALL_ARRAY, False, True),
            "select_array_pages_1000": (PG_READ_PAGE_ARRAY, True, True),
        }
        times: dict[str, list[float]] = {name: [] for name in reads}
        async with conn.cursor(binary=True) as cursor:
            for _ in range(int(params.get("reps", 7))):
                for name, (sql, paged, array) in reads.items():
                    query = sql.format(schema=schema)
                    got = 0
                    start = time.perf_counter()
                    for first in range(0, events, 1000) if paged else (0,):
                        await cursor.execute(query, (run_id, first), prepare=True)
                        rows = await cursor.fetchall()
                        got += len(rows[0][0]) if array else len(rows)
                    times[name].append((time.perf_counter() - start) * 1000)
                    assert got == events, (name, got)
        for name, measured in times.items():
            results[name] = {"events": events, "ms": min(measured), "spread_ms": spread(measured)}
        return results
    finally:
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()
