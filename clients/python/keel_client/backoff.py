"""Capped exponential backoff with jitter, after gRPC's connection-backoff spec.

The n-th reconnect in a row (from 0) waits about
``min(initial_s * multiplier**n, max_s)``, spread by +/- ``jitter`` so that
many clients dropped by the same server restart do not come back in lockstep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long to wait before each reconnect of a row of failed reconnects."""

    initial_s: float = 0.05
    max_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2  # each delay is scaled by a random factor in [1 - jitter, 1 + jitter]

    def __post_init__(self) -> None:
        if self.initial_s < 0 or self.max_s < self.initial_s:
            raise ValueError("backoff needs 0 <= initial_s <= max_s")
        if self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError("backoff needs multiplier >= 1 and 0 <= jitter < 1")

    def delay_s(self, attempt: int) -> float:
        """The delay before reconnect number ``attempt`` (0 for the first of a row)."""
        # Cap the exponent before raising: 2.0 ** 10_000 overflows a float.
        capped_s = min(self.initial_s * self.multiplier ** min(attempt, 64), self.max_s)
        return capped_s * random.uniform(1 - self.jitter, 1 + self.jitter)
