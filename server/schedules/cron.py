"""Cron expressions in a time zone: parsing, checking and iterating them with croniter.

An expression has five fields (minute hour day-of-month month day-of-week),
six with a leading seconds field, or is one of the nicknames @hourly,
@daily (@midnight), @weekly, @monthly and @yearly (@annually). It is read
in an IANA time zone (zoneinfo). Ticks are instants, in unix milliseconds.

Daylight saving time follows croniter (see docs/schedules.md, and the tests
that pin it): on the day clocks spring forward, a tick in the skipped hour
(02:30 in New York) fires once, at the first instant after the gap (03:00
EDT); on the day they fall back, a tick in the repeated hour (01:30) fires
at both of its instants (01:30 EDT and 01:30 EST), an hour apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

NICKNAMES = ("@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually")
DEFAULT_TIMEZONE = "UTC"


class CronError(ValueError):
    """A bad expression or time zone; `field` names which ("cron" or "timezone")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class Cron:
    """A checked cron expression in a time zone."""

    expression: str
    timezone: str
    _zone: ZoneInfo = field(repr=False, compare=False)
    _seconds: bool = field(repr=False, compare=False)  # six fields: seconds first

    @classmethod
    def parse(cls, expression: str, timezone: str = "") -> Cron:
        """The cron of `expression` in `timezone` ("" is UTC); CronError says what is wrong."""
        zone = _zone(timezone or DEFAULT_TIMEZONE)
        text = " ".join(expression.split())
        if not text:
            raise CronError("cron", "is required")
        fields = text.split(" ")
        if text.startswith("@"):
            if text.lower() not in NICKNAMES:
                raise CronError(
                    "cron", f"unknown nickname {text!r}; use one of {', '.join(NICKNAMES)}"
                )
            text, seconds = text.lower(), False
        elif len(fields) in (5, 6):
            seconds = len(fields) == 6
        else:
            raise CronError(
                "cron",
                f"has {len(fields)} fields; a cron expression has 5 (minute hour "
                "day-of-month month day-of-week), 6 with a leading seconds field, or is "
                f"one of {', '.join(NICKNAMES)}",
            )
        try:
            croniter.expand(text, second_at_beginning=seconds, strict=True)
            croniter(text, datetime.now(zone), second_at_beginning=seconds)
        except (CroniterError, ValueError) as exc:
            raise CronError("cron", f"{text!r} is not a valid cron expression: {exc}") from None
        return cls(text, timezone or DEFAULT_TIMEZONE, zone, seconds)

    def next_after(self, ms: int) -> int:
        """The first tick strictly after `ms`."""
        return _ms(self._iter(ms).get_next(datetime))

    def latest_at_or_before(self, ms: int) -> int:
        """The last tick at or before `ms`."""
        return _ms(self._iter(ms + 1).get_prev(datetime))

    def before(self, ms: int, count: int) -> list[int]:
        """Up to `count` ticks strictly before `ms`, newest first."""
        ticks = self._iter(ms)
        return [_ms(ticks.get_prev(datetime)) for _ in range(count)]

    def after(self, ms: int, count: int) -> list[int]:
        """The first `count` ticks strictly after `ms`."""
        ticks = self._iter(ms)
        return [_ms(ticks.get_next(datetime)) for _ in range(count)]

    def _iter(self, ms: int) -> croniter:
        start = datetime.fromtimestamp(ms / 1000, UTC).astimezone(self._zone)
        return croniter(self.expression, start, second_at_beginning=self._seconds)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: "Europe", a name too long
        raise CronError(
            "timezone", f"unknown time zone {name!r}; use an IANA name such as America/New_York"
        ) from None


def _ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)
