"""Leases of the runs this process owns: renewed together, lost ones reported.

Every run this process executes holds a lease in the log (lease_ttl_s). One
task renews all of them every `renew_interval_s` (a third of the TTL, so a
renewal can fail twice before the lease lapses). A renewal answered "no"
means the run's epoch moved on: another instance took it over, so this
process must stop executing it at once, without writing anything (its
writes would be refused anyway: they carry the old epoch). Or it means the
run ended (or suspended) at this epoch, committed here a moment before its
supervisor dropped the lease: the run's record tells the two apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from server.errors import RunNotFound, StoreUnavailable
from server.events.log import EventLog

log = logging.getLogger(__name__)

OnLost = Callable[[str], None]


class LeaseKeeper:
    """Renews the leases of the runs registered with it."""

    def __init__(self, event_log: EventLog, *, renew_interval_s: float, on_lost: OnLost) -> None:
        self._log = event_log
        self._renew_interval_s = renew_interval_s
        self._on_lost = on_lost
        self._epochs: dict[str, int] = {}  # run id -> the epoch this process owns it at
        self._task: asyncio.Task[None] | None = None

    def hold(self, run_id: str, epoch: int) -> None:
        """Keep renewing the lease of `run_id` at `epoch` until `drop`."""
        self._epochs[run_id] = epoch
        if self._task is None:
            self._task = asyncio.create_task(self._renew_forever(), name="lease-keeper")

    def holds(self, run_id: str) -> bool:
        """Whether the lease of `run_id` is still renewed here."""
        return run_id in self._epochs

    def drop(self, run_id: str) -> None:
        self._epochs.pop(run_id, None)

    async def release(self, run_id: str) -> None:
        """Stop renewing and hand the lease back, so another instance can claim the run now."""
        epoch = self._epochs.pop(run_id, None)
        if epoch is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._log.release(run_id, epoch)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._renew_interval_s)
            held = list(self._epochs.items())
            results = await asyncio.gather(
                *(self._log.renew(run_id, epoch) for run_id, epoch in held),
                return_exceptions=True,
            )
            for (run_id, epoch), renewed in zip(held, results, strict=True):
                if isinstance(renewed, BaseException):
                    # Try again next round; if the store stays away the lease
                    # lapses and our writes are fenced, which is what we want.
                    log.warning("renewing the lease of run %s failed: %r", run_id, renewed)
                elif not renewed and self._epochs.get(run_id) == epoch:
                    await self._refused(run_id, epoch)

    async def _refused(self, run_id: str, epoch: int) -> None:
        """A renewal of `run_id` at `epoch` was refused: the run was taken over, or its
        owner (here) ended or suspended it just now, before dropping its lease."""
        try:
            record = await self._log.get_run(run_id)
        except RunNotFound:
            record = None
        except StoreUnavailable as exc:
            log.warning("reading run %s after a refused renewal failed: %r", run_id, exc)
            return  # try again next round
        if self._epochs.get(run_id) != epoch:
            return  # dropped meanwhile
        self._epochs.pop(run_id, None)
        if record is not None and record.epoch == epoch and not record.state.runnable:
            return  # this owner's own ending: nothing was lost
        log.warning("run %s was taken over by another instance", run_id)
        self._on_lost(run_id)
