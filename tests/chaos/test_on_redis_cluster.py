"""SIGKILL takeovers with the servers on a 3-master Redis Cluster (tests/redis_cluster.py):
the crash tests of test_takeover.py, collected here again with the cluster as their store."""

from __future__ import annotations

import pytest

from tests.chaos.test_takeover import (
    test_run_survives_sigkill_during_a_tool_call,
    test_run_survives_sigkill_of_its_owner,
    test_zombie_owner_is_fenced,
)

__all__ = [
    "test_run_survives_sigkill_during_a_tool_call",
    "test_run_survives_sigkill_of_its_owner",
    "test_zombie_owner_is_fenced",
]


@pytest.fixture
def chaos_redis_url(redis_cluster_url: str) -> str:
    return redis_cluster_url
