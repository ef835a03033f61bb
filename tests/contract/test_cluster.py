"""What only Redis Cluster has: runs spread over the nodes, sharded pub/sub with one
connection per node, and subscriptions that follow a slot to its new node.

The contract suite itself runs on the cluster too (the "cluster" backend of
tests/conftest.py); these tests look at the cluster's own side.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster

from server.events.redis import RedisEventLog
from server.events.urls import is_cluster_url
from tests.contract.test_event_log import Recorder, make_events, new_run


@pytest.fixture
async def cluster_log(redis_cluster_url: str, key_prefix: str) -> AsyncIterator[RedisEventLog]:
    log = await RedisEventLog.connect(redis_cluster_url, key_prefix=key_prefix)
    try:
        yield log
    finally:
        await log.close()


def client_of(log: RedisEventLog) -> RedisCluster:
    client = log.client
    assert isinstance(client, RedisCluster)
    return client


async def node_of(client: RedisCluster, key: str) -> ClusterNode:
    node = client.get_node_from_key(key)
    assert node is not None
    return node


async def our_pubsub_connections(
    client: RedisCluster, name: str
) -> dict[str, list[dict[str, str]]]:
    """Per node, this prefix's pub/sub connections (CLIENT LIST on each node)."""
    found: dict[str, list[dict[str, str]]] = {}
    for node in client.get_primaries():
        listed = await client.execute_command("CLIENT LIST", target_nodes=node)
        found[node.name] = [c for c in listed if c.get("name") == name]
    return found


def test_the_cluster_scheme_selects_a_cluster() -> None:
    assert is_cluster_url("redis+cluster://127.0.0.1:7000")
    assert is_cluster_url("rediss+cluster://example:7000")
    assert not is_cluster_url("redis://127.0.0.1:6379/0")
    assert not is_cluster_url("rediss://example:6379")


async def test_runs_spread_over_the_nodes_each_in_one_slot(cluster_log: RedisEventLog) -> None:
    client = client_of(cluster_log)
    keys = cluster_log.keys
    runs = [await new_run(cluster_log) for _ in range(24)]
    nodes = set()
    for run in runs:
        await cluster_log.append(run.run_id, 1, make_events(run.run_id, 0, 2))
        names = [*keys.run_keys(run.run_id), keys.lease(run.run_id), keys.live(run.run_id)]
        assert len({client.keyslot(name) for name in names}) == 1
        nodes.add((await node_of(client, keys.events(run.run_id))).name)
        assert [e.index for e in await cluster_log.read(run.run_id, 0, 10)] == [0, 1]
    assert len(nodes) == 3  # 24 random ids on 3 masters: all used but by a 3 * (2/3)^24 chance


async def test_notifications_are_sharded_with_one_connection_per_node(
    cluster_log: RedisEventLog,
) -> None:
    client = client_of(cluster_log)
    keys = cluster_log.keys
    runs = [await new_run(cluster_log) for _ in range(12)]
    recorders = [Recorder() for _ in range(24)]
    subscriptions = [
        await cluster_log.subscribe(runs[i % 12].run_id, recorder)
        for i, recorder in enumerate(recorders)
    ]
    for run in runs:
        await cluster_log.append(run.run_id, 1, make_events(run.run_id, 0, 1))
    for recorder in recorders:
        await recorder.wait_until(lambda r=recorder: len(r.events) == 1)  # type: ignore[misc]

    by_node = await our_pubsub_connections(client, keys.pubsub_client_name)
    channels_by_node: dict[str, int] = {}
    for run in runs:
        node = (await node_of(client, keys.live(run.run_id))).name
        channels_by_node[node] = channels_by_node.get(node, 0) + 1
    for node, connections in by_node.items():
        if node not in channels_by_node:
            assert connections == []
            continue
        (connection,) = connections  # one per node, however many listeners
        assert connection["ssub"] == str(channels_by_node[node])  # one per run, sharded
        assert connection["sub"] == "0"  # no classic (cluster-wide) subscription
        # The run's node publishes: its shard channels are known there and only there.
        shard = await client.execute_command(
            "PUBSUB SHARDCHANNELS", f"{keys.prefix}:*", target_nodes=client.get_node(node_name=node)
        )
        assert len(shard) == channels_by_node[node]
    for subscription in subscriptions:
        await subscription.close()


async def test_a_cancel_request_reaches_the_owner_over_the_runs_shard(
    cluster_log: RedisEventLog,
) -> None:
    run = await new_run(cluster_log)
    heard: list[str] = []

    class Control:
        def on_cancel(self, reason: str) -> None:
            heard.append(reason)

    subscription = await cluster_log.subscribe_control(run.run_id, Control())
    try:
        await cluster_log.request_cancel(run.run_id, "stop it")
        for _ in range(500):
            if heard:
                break
            await asyncio.sleep(0.01)
        assert heard == ["stop it"]
    finally:
        await subscription.close()


async def _migrate_slot(
    client: RedisCluster, slot: int, source: ClusterNode, target: ClusterNode
) -> None:
    """Move one slot and its keys from `source` to `target`, as redis-cli --cluster reshard does."""
    source_id = (await client.execute_command("CLUSTER MYID", target_nodes=source)).decode()
    target_id = (await client.execute_command("CLUSTER MYID", target_nodes=target)).decode()
    await client.execute_command(
        "CLUSTER SETSLOT", slot, "IMPORTING", source_id, target_nodes=target
    )
    await client.execute_command(
        "CLUSTER SETSLOT", slot, "MIGRATING", target_id, target_nodes=source
    )
    while True:
        keys = await client.execute_command("CLUSTER GETKEYSINSLOT", slot, 100, target_nodes=source)
        if not keys:
            break
        await client.execute_command(
            "MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys, target_nodes=source
        )
    for node in client.get_primaries():
        await client.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id, target_nodes=node)


async def test_a_listener_follows_its_runs_slot_to_another_node(
    cluster_log: RedisEventLog, redis_cluster_url: str, key_prefix: str
) -> None:
    """A slot migrated while a run streams: the node drops the channel, the listener is
    told on_gap (it re-reads the log) and hears the run's later events from the new node;
    writes follow the slot too."""
    client = client_of(cluster_log)
    keys = cluster_log.keys
    run = await new_run(cluster_log)
    recorder = Recorder()
    subscription = await cluster_log.subscribe(run.run_id, recorder)
    await cluster_log.append(run.run_id, 1, make_events(run.run_id, 0, 1))
    await recorder.wait_until(lambda: len(recorder.events) == 1)

    slot = client.keyslot(keys.events(run.run_id))
    source = await node_of(client, keys.events(run.run_id))
    target = next(node for node in client.get_primaries() if node.name != source.name)
    try:
        await _migrate_slot(client, slot, source, target)
        await recorder.wait_until(lambda: recorder.gaps >= 1, timeout_s=10)
        await cluster_log.append(run.run_id, 1, make_events(run.run_id, 1, 2))
        await recorder.wait_until(lambda: len(recorder.events) == 3, timeout_s=10)
        assert [e.index for e in recorder.events] == [0, 1, 2]
        assert [e.index for e in await cluster_log.read(run.run_id, 0, 10)] == [0, 1, 2]
        # Its channel is now on the new node's sharded connection.
        by_node = await our_pubsub_connections(client, keys.pubsub_client_name)
        (connection,) = by_node[target.name]
        assert int(connection["ssub"]) >= 1
    finally:
        await subscription.close()
        await _migrate_slot(client, slot, target, source)  # the session's cluster as it was
