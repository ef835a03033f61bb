"""Where push-notification configs live, what was delivered to each, and which runs a
dispatcher must look after: one protocol, in memory beside the memory log, on Redis beside
Redis (docs/a2a.md, "Push notifications").

A run is *due* when its notifications need someone: a config was added, or the dispatcher
that held it (renewing a deadline) died. `claim` hands due runs to one dispatcher until a
deadline it renews; `release` lets go of a run whose notifications are all delivered. A
config's delivery state is written by whichever dispatcher holds the run; if two ever
hold it at once (one stalled past its deadline), a notification goes out twice, which
at-least-once delivery allows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Protocol

MAX_CONFIGS_PER_TASK = 10


@dataclass(frozen=True, slots=True)
class PushConfig:
    """Where to tell a task's changes: A2A's TaskPushNotificationConfig, as stored."""

    config_id: str
    run_id: str
    url: str
    token: str = ""  # sent as X-A2A-Notification-Token
    auth_scheme: str = ""  # with auth_credentials: "Authorization: <scheme> <credentials>"
    auth_credentials: str = ""
    create_time_ms: int = 0

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes | str) -> PushConfig:
        return cls(**json.loads(data))


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one config was told: `mark` names the task state last delivered (mark_of);
    after a failed attempt, `attempts` counts the failures since the last success and the
    next try waits until `not_before_ms`."""

    mark: str = ""
    attempts: int = 0
    not_before_ms: int = 0
    error: str = ""  # the last failure, for the logs and GetTaskPushNotificationConfig

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes | str) -> Delivery:
        return cls(**json.loads(data))


class PushStore(Protocol):
    """Push-notification configs by run, their deliveries, and the index of due runs."""

    async def put_config(self, config: PushConfig) -> None:
        """Store (or replace, by id) a config of its run, with no delivery yet, and make the
        run due now, ending whoever's hold on it (their renew fails). Raises
        InvalidArgument beyond MAX_CONFIGS_PER_TASK configs."""

    async def configs(self, run_id: str) -> list[PushConfig]:
        """The run's configs, oldest first."""

    async def delete_config(self, run_id: str, config_id: str) -> bool:
        """Delete a config and its delivery state; False if the run had no such config."""

    async def deliveries(self, run_id: str) -> dict[str, Delivery]:
        """What each config of the run was told, by config id (absent: nothing yet)."""

    async def record(self, run_id: str, config_id: str, delivery: Delivery) -> None:
        """Write a config's delivery state (nothing if the config was deleted since)."""

    async def claim(self, owner: str, limit: int, hold_ms: int) -> list[str]:
        """Up to `limit` due runs, now held by `owner` for `hold_ms` (by the store's clock)."""

    async def renew(self, run_id: str, owner: str, hold_ms: int) -> bool:
        """Hold the run `hold_ms` longer; False when `owner` no longer holds it."""

    async def release(self, run_id: str, owner: str) -> None:
        """Let go of the run: nobody needs to look after it (until a config is added)."""

    async def mark_due(self, run_id: str) -> None:
        """Make the run due now, unless a dispatcher holds it."""

    async def expire(self, run_id: str, ttl_ms: int) -> None:
        """Delete the run's configs and deliveries after `ttl_ms` (0: now), as its run
        expires; the run leaves the index."""
