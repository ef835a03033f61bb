"""Redis URLs: which kind of Redis a URL names (no Redis client imported here)."""

from __future__ import annotations

# A cluster's scheme, and the plain scheme its nodes are reached with.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    """Whether `url` names a Redis Cluster (redis+cluster://, rediss+cluster://)."""
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme.lower() in CLUSTER_SCHEMES


def node_url(url: str) -> str:
    """A cluster URL as the plain URL of the node it names."""
    scheme, _, rest = url.partition("://")
    return f"{CLUSTER_SCHEMES[scheme.lower()]}://{rest}"
