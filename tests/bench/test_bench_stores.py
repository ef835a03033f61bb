"""The benchmark's Redis stores: a redis-server with an AOF, a 3-master cluster, and how
their figures are analysed (each against its own store's raw Redis ceiling) and shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis

from bench import analysis, report
from bench.procs import REDIS_VARIANTS, RedisCluster, RedisServer, start_store
from bench.runner import WORKLOADS, runs_on, store_ceiling, store_of


def test_a_store_with_an_aof_fsyncs_as_asked_and_flushes() -> None:
    for policy in ("always", "everysec"):
        store = start_store(f"redis-aof-{policy}")
        try:
            assert isinstance(store, RedisServer)
            client = redis.Redis.from_url(store.url)
            try:
                assert client.config_get("appendonly") == {"appendonly": "yes"}
                assert client.config_get("appendfsync") == {"appendfsync": policy}
                client.set("k", "v")
                store.flush()
                assert client.dbsize() == 0
            finally:
                client.close()
            described = store.describe()
            assert described["appendfsync"] == policy and described["aof_rewrites"] == 0
            assert store.pids == [store.process.pid]
        finally:
            store.stop()


def test_a_cluster_store_has_every_slot_and_flushes_every_primary(tmp_path: Path) -> None:
    cluster = RedisCluster.start(tmp_path)
    try:
        assert cluster.url.startswith("redis+cluster://127.0.0.1:")
        assert len(cluster.pids) == 3 and all(p.poll() is None for p in cluster.processes)
        client = redis.RedisCluster.from_url(cluster.url.replace("redis+cluster", "redis", 1))
        try:
            for i in range(30):  # keys in many slots: on every node
                client.set(f"key-{i}", "v")
            holding = 0
            for port in cluster.ports:
                node = cluster.node(port)
                try:
                    holding += node.dbsize() > 0
                finally:
                    node.close()
            assert holding == 3
            cluster.flush()
            assert client.dbsize() == 0  # summed over the primaries
        finally:
            client.close()
    finally:
        cluster.stop()
    assert all(p.poll() is not None for p in cluster.processes)


def test_the_redis_variants_run_what_runs_on_redis_on_stores_of_their_own() -> None:
    assert set(REDIS_VARIANTS) == {"redis-aof-everysec", "redis-aof-always", "cluster"}
    for workload in WORKLOADS:
        for variant in REDIS_VARIANTS:
            assert runs_on(workload, variant) == ("redis" in workload.backends)
        assert not runs_on(workload, "cluster") or workload.key[0] in "abcdefghi"
    assert store_of("memory") is None
    assert store_of("temporal") == "redis"
    assert store_of("cluster") == "cluster"
    assert store_ceiling("redis") == "redis"
    assert store_ceiling("redis-aof-always") == "redis@redis-aof-always"


def _lua(one: float) -> dict[str, Any]:
    return {
        "lua_append_one": {"events_per_s": one},
        "lua_append_pipelined_100": {"events_per_s": one * 4},
        "lua_append_batch_100": {"events_per_s": one * 30},
    }


def _grpc(messages_per_s: float) -> dict[str, Any]:
    return {
        "streams": 1,
        "messages_per_s": messages_per_s,
        "events_per_s": messages_per_s,
        "total_ms": 1.0,
        "time_to_first_ms": 1.0,
    }


def _stream(events_per_s: float, redis_cpu: float) -> dict[str, Any]:
    return {
        "ok": True,
        "events_per_s": events_per_s,
        "server_cpu_us_per_event": 40.0,
        "redis_cpu_us_per_event": redis_cpu,
    }


def _results() -> dict[str, Any]:
    return {
        "ceilings": {
            "grpc_one_stream": _grpc(20_000.0),
            "grpc_many_streams": _grpc(30_000.0),
            "redis": _lua(10_000.0),
            "redis@redis-aof-always": _lua(2_500.0),
        },
        "workloads": {
            "a_stream": {
                "memory": {"ok": True, "events_per_s": 12_000.0},
                "redis": _stream(10_000.0, 5.0),
                "redis-aof-always": _stream(5_000.0, 10.0),
            },
            "b_concurrent": {
                "redis": _stream(9_000.0, 8.0),
                "redis-aof-always": _stream(6_000.0, 12.0),
            },
        },
        "stores": {
            "redis": {"kind": "redis-server", "appendonly": False},
            "redis-aof-always": {
                "kind": "redis-server",
                "appendonly": True,
                "appendfsync": "always",
            },
        },
    }


def test_a_variant_is_held_against_its_own_stores_raw_ceiling() -> None:
    results = _results()
    rows = analysis.figures(results["ceilings"], results["workloads"])
    vs_redis = next(r for r in rows if r["figure"] == "events/s at the client (vs Redis)")
    assert vs_redis["backends"]["redis"]["ceiling"] == 10_000.0
    assert vs_redis["backends"]["redis-aof-always"]["ceiling"] == 2_500.0
    assert vs_redis["backends"]["redis-aof-always"]["ratio"] == 2.0
    grpc = next(r for r in rows if r["figure"] == "aggregate events/s")
    assert grpc["backends"]["redis-aof-always"]["ratio"] == 6_000.0 / 30_000.0
    targets = analysis.targets(results["ceilings"], results["workloads"])
    b_cpu = next(t for t in targets if t["workload"] == "b_concurrent")
    assert set(b_cpu["backends"]) == {"redis", "redis-aof-always"}  # "on Redis": variants too


def test_the_stores_table_puts_each_store_beside_plain_redis() -> None:
    results = _results()
    results.update(analysis.derive(results))
    table = results["stores_table"]
    assert table["stores"] == ["redis", "redis-aof-always"]
    rows = {(row["workload"], row["figure"]): row for row in table["rows"]}
    one = rows[("", analysis.STORE_CEILINGS[0][0])]["backends"]
    assert one["redis-aof-always"]["vs_redis"] == 0.25
    b = rows[("b_concurrent", "aggregate events/s")]["backends"]
    assert b["redis-aof-always"]["vs_redis"] == 6_000.0 / 9_000.0
    cpu = rows[("b_concurrent", "Redis CPU per event (all its nodes)")]["backends"]
    assert cpu["redis-aof-always"]["value"] == 12.0
    # Without a variant there is no such table.
    plain = {**results, "workloads": {"a_stream": {"redis": _stream(1.0, 1.0)}}}
    assert analysis.derive(plain)["stores_table"] is None

    shape = {"mode": "full", "started_at": "now", "duration_s": 1.0, "machine": {}}
    markdown = report.markdown({**results, **shape}, None)
    assert "## The same workloads on each Redis store" in markdown
    assert "| workload | figure | redis | redis-aof-always |" in markdown
    assert "redis-aof-always: appendonly yes, appendfsync always" in markdown
    assert "| redis-aof-always ratio |" in markdown  # a column of the figures table
    assert "| redis@redis-aof-always lua_append_one | 2,500 events/s |" in markdown
