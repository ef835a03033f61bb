"""MemoryPushStore: the PushStore of one process, beside the memory log."""

from __future__ import annotations

import time

from server.a2a.push.store import MAX_CONFIGS_PER_TASK, Delivery, PushConfig
from server.errors import FieldViolation, InvalidArgument


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class MemoryPushStore:
    def __init__(self) -> None:
        self._configs: dict[str, dict[str, PushConfig]] = {}
        self._deliveries: dict[str, dict[str, Delivery]] = {}
        self._expires_ms: dict[str, int] = {}  # run id -> when its push state goes
        self._due: dict[str, tuple[int, str]] = {}  # run id -> (held until ms, owner)

    def _live(self, run_id: str) -> None:
        expires_ms = self._expires_ms.get(run_id)
        if expires_ms is not None and expires_ms <= _now_ms():
            self._forget(run_id)

    def _forget(self, run_id: str) -> None:
        self._configs.pop(run_id, None)
        self._deliveries.pop(run_id, None)
        self._expires_ms.pop(run_id, None)
        self._due.pop(run_id, None)

    async def put_config(self, config: PushConfig) -> None:
        self._live(config.run_id)
        configs = self._configs.setdefault(config.run_id, {})
        if config.config_id not in configs and len(configs) >= MAX_CONFIGS_PER_TASK:
            raise InvalidArgument(
                FieldViolation(
                    "id", f"a task has at most {MAX_CONFIGS_PER_TASK} push notification configs"
                )
            )
        configs[config.config_id] = config
        self._deliveries.setdefault(config.run_id, {}).pop(config.config_id, None)
        self._expires_ms.pop(config.run_id, None)
        self._due[config.run_id] = (0, "")  # due now, whoever held it

    async def configs(self, run_id: str) -> list[PushConfig]:
        self._live(run_id)
        return sorted(
            self._configs.get(run_id, {}).values(), key=lambda c: (c.create_time_ms, c.config_id)
        )

    async def delete_config(self, run_id: str, config_id: str) -> bool:
        self._live(run_id)
        self._deliveries.get(run_id, {}).pop(config_id, None)
        return self._configs.get(run_id, {}).pop(config_id, None) is not None

    async def deliveries(self, run_id: str) -> dict[str, Delivery]:
        self._live(run_id)
        return dict(self._deliveries.get(run_id, {}))

    async def record(self, run_id: str, config_id: str, delivery: Delivery) -> None:
        self._live(run_id)
        if config_id in self._configs.get(run_id, {}):
            self._deliveries.setdefault(run_id, {})[config_id] = delivery

    async def claim(self, owner: str, limit: int, hold_ms: int) -> list[str]:
        now_ms = _now_ms()
        due = sorted((held, run_id) for run_id, (held, _) in self._due.items() if held <= now_ms)
        claimed = [run_id for _, run_id in due[:limit]]
        for run_id in claimed:
            self._due[run_id] = (now_ms + hold_ms, owner)
        return claimed

    async def renew(self, run_id: str, owner: str, hold_ms: int) -> bool:
        held = self._due.get(run_id)
        if held is None or held[1] != owner:
            return False
        self._due[run_id] = (_now_ms() + hold_ms, owner)
        return True

    async def release(self, run_id: str, owner: str) -> None:
        held = self._due.get(run_id)
        if held is not None and held[1] == owner:
            del self._due[run_id]

    async def mark_due(self, run_id: str) -> None:
        if run_id not in self._due:
            self._due[run_id] = (0, "")

    async def expire(self, run_id: str, ttl_ms: int) -> None:
        self._due.pop(run_id, None)
        if ttl_ms <= 0:
            self._forget(run_id)
        elif run_id in self._configs:
            self._expires_ms[run_id] = _now_ms() + ttl_ms
