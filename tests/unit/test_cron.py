"""Cron expressions in a time zone (server/schedules/cron.py): what is accepted, how ticks
are found, and what daylight saving time does (croniter's behaviour, pinned here)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from server.schedules.cron import Cron, CronError

NEW_YORK = ZoneInfo("America/New_York")


def ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


def local(tick_ms: int, zone: ZoneInfo = NEW_YORK) -> str:
    return datetime.fromtimestamp(tick_ms / 1000, zone).isoformat()


@pytest.mark.parametrize(
    ("expression", "field", "says"),
    [
        ("", "cron", "is required"),
        ("* * *", "cron", "has 3 fields"),
        ("* * * * * * *", "cron", "has 7 fields"),
        ("61 * * * *", "cron", "not a valid cron expression"),
        ("*/0 * * * *", "cron", "not a valid cron expression"),
        ("0 0 31 2 *", "cron", "can never occur"),
        ("@reboot", "cron", "unknown nickname"),
    ],
)
def test_bad_expressions_say_what_is_wrong(expression: str, field: str, says: str) -> None:
    with pytest.raises(CronError) as caught:
        Cron.parse(expression)
    assert caught.value.field == field and says in str(caught.value)


@pytest.mark.parametrize("zone", ["Mars/Olympus", "../../etc/passwd", "America/New York"])
def test_unknown_time_zones_are_refused(zone: str) -> None:
    with pytest.raises(CronError) as caught:
        Cron.parse("* * * * *", zone)
    assert caught.value.field == "timezone" and "unknown time zone" in str(caught.value)


def test_five_fields_six_with_leading_seconds_and_nicknames() -> None:
    start = ms(datetime(2026, 1, 1, 10, 0, 0, 500_000, tzinfo=UTC))
    every_second = Cron.parse("* * * * * *")
    assert every_second.after(start, 3) == [start + 500, start + 1500, start + 2500]
    every_two = Cron.parse("*/2 * * * * *")  # seconds first: 0, 2, 4, ...
    assert every_two.next_after(start) == start + 1500
    assert every_two.latest_at_or_before(start) == start - 500
    assert every_two.latest_at_or_before(start - 500) == start - 500  # at or before
    assert every_two.before(start, 2) == [start - 500, start - 2500]
    minutely = Cron.parse("*/15 * * * *")
    assert minutely.next_after(start) == ms(datetime(2026, 1, 1, 10, 15, tzinfo=UTC))
    daily = Cron.parse("@DAILY", "")
    assert (daily.expression, daily.timezone) == ("@daily", "UTC")
    assert daily.next_after(start) == ms(datetime(2026, 1, 2, tzinfo=UTC))
    assert Cron.parse("  0  6 * * 1-5 ").expression == "0 6 * * 1-5"


def test_ticks_are_read_in_the_schedules_time_zone() -> None:
    six_am = Cron.parse("0 6 * * *", "America/New_York")
    start = ms(datetime(2026, 12, 1, 12, tzinfo=UTC))
    assert six_am.next_after(start) == ms(datetime(2026, 12, 2, 11, tzinfo=UTC))  # EST: UTC-5
    summer = ms(datetime(2026, 7, 1, 12, tzinfo=UTC))
    assert six_am.next_after(summer) == ms(datetime(2026, 7, 2, 10, tzinfo=UTC))  # EDT: UTC-4


def test_spring_forward_a_tick_in_the_skipped_hour_fires_once_right_after_the_gap() -> None:
    # 2027-03-14: New York's clocks go from 02:00 EST to 03:00 EDT; 02:30 does not exist.
    cron = Cron.parse("30 2 * * *", "America/New_York")
    start = ms(datetime(2027, 3, 13, 12, tzinfo=NEW_YORK))
    assert [local(t) for t in cron.after(start, 3)] == [
        "2027-03-14T03:00:00-04:00",
        "2027-03-15T02:30:00-04:00",
        "2027-03-16T02:30:00-04:00",
    ]


def test_fall_back_a_tick_in_the_repeated_hour_fires_at_both_of_its_instants() -> None:
    # 2027-11-07: clocks go from 02:00 EDT back to 01:00 EST; 01:30 happens twice.
    cron = Cron.parse("30 1 * * *", "America/New_York")
    start = ms(datetime(2027, 11, 6, 12, tzinfo=NEW_YORK))
    ticks = cron.after(start, 3)
    assert [local(t) for t in ticks] == [
        "2027-11-07T01:30:00-04:00",
        "2027-11-07T01:30:00-05:00",
        "2027-11-08T01:30:00-05:00",
    ]
    assert ticks[1] - ticks[0] == 3600 * 1000  # an hour apart
    # Hourly ticks go on through both hours, every one a distinct instant.
    hourly = Cron.parse("0 * * * *", "America/New_York")
    around = hourly.after(ms(datetime(2027, 11, 7, 0, 30, tzinfo=NEW_YORK)), 4)
    assert [b - a for a, b in itertools.pairwise(around)] == [3600 * 1000] * 3
