"""Maintenance windows and freezes: parsing, open or closed at a given time, when they open next."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from taskcore.core import windows
from taskcore.core.windows import WindowError

AMS = ZoneInfo("Europe/Amsterdam")


def at(text: str, zone: ZoneInfo = AMS) -> float:
    """Epoch seconds of a local time `YYYY-MM-DD HH:MM` in `zone`."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=zone).timestamp()


WEEKDAYS = windows.parse("Mon-Fri 02:00-05:00 Europe/Amsterdam")


@pytest.mark.parametrize(
    ("when", "is_open"),
    [
        ("2026-12-07 02:00", True),  # a Monday, at the opening minute
        ("2026-12-07 04:59", True),
        ("2026-12-07 05:00", False),  # closes at 05:00
        ("2026-12-07 01:59", False),
        ("2026-12-05 03:00", False),  # a Saturday
        ("2026-12-11 03:00", True),  # a Friday
    ],
)
def test_weekday_window(when: str, is_open: bool) -> None:
    assert windows.is_open(WEEKDAYS, at(when)) is is_open


def test_next_open_skips_the_weekend_and_is_now_while_open() -> None:
    assert windows.next_open(WEEKDAYS, at("2026-12-04 06:00")) == at("2026-12-07 02:00")  # Fri → Mon
    assert windows.next_open(WEEKDAYS, at("2026-12-07 03:00")) == at("2026-12-07 03:00")


def test_a_window_past_midnight_closes_the_next_morning() -> None:
    night = windows.parse("Fri 22:00-02:00 UTC")
    utc = ZoneInfo("UTC")
    assert windows.is_open(night, at("2026-12-04 23:00", utc))  # Friday night
    assert windows.is_open(night, at("2026-12-05 01:30", utc))  # Saturday morning: Friday's window
    assert not windows.is_open(night, at("2026-12-05 22:30", utc))  # Saturday night: not listed


def test_wall_clock_hours_hold_across_daylight_saving() -> None:
    daily = windows.parse("daily 02:00-03:00 Europe/Amsterdam")
    assert windows.is_open(daily, at("2026-07-01 02:30"))  # summer time
    assert windows.is_open(daily, at("2026-12-01 02:30"))  # winter time


@pytest.mark.parametrize(
    ("spec", "days"),
    [("daily", set(range(7))), ("Sat,Sun", {5, 6}), ("Fri-Mon", {4, 5, 6, 0}), ("mon,wed-thu", {0, 2, 3})],
)
def test_day_specs(spec: str, days: set[int]) -> None:
    assert windows.parse(f"{spec} 01:00-02:00 UTC").days == days


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("Mon-Fri 02:00-05:00", "give DAYS HH:MM-HH:MM ZONE"),
        ("Someday 02:00-05:00 UTC", "use Mon…Sun"),
        ("Mon 2-5 UTC", "not HH:MM-HH:MM"),
        ("Mon 25:00-26:00 UTC", "not a time of day"),
        ("Mon 03:00-03:00 UTC", "same time"),
        ("Mon 02:00-05:00 Mars/Olympus", "unknown time zone"),
    ],
)
def test_bad_windows_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(WindowError, match=says):
        windows.parse(text)


def test_gate_a_freeze_closes_whatever_the_windows_say() -> None:
    now = at("2026-12-07 03:00")
    assert windows.gate(("Mon-Fri 02:00-05:00 Europe/Amsterdam",), None, "", now) is None
    frozen = windows.gate(("Mon-Fri 02:00-05:00 Europe/Amsterdam",), now + 60, "release week", now)
    assert frozen == windows.Closed(until=now + 60, reason="release week", frozen=True)
    assert windows.gate((), now - 1, "over", now) is None  # a freeze that ended
    assert windows.gate((), None, "", now) is None  # no windows: always open


def test_gate_outside_every_window_waits_for_the_first_to_open() -> None:
    now = at("2026-12-05 12:00")  # a Saturday
    closed = windows.gate(
        ("Mon-Fri 02:00-05:00 Europe/Amsterdam", "Sun 20:00-21:00 Europe/Amsterdam"), None, "", now
    )
    assert closed == windows.Closed(
        until=at("2026-12-06 20:00"), reason="Sun 20:00-21:00 Europe/Amsterdam", frozen=False
    )


def test_check_normalises_and_bounds() -> None:
    assert windows.check_windows(["Mon-Fri  02:00-05:00 UTC", "Mon-Fri 02:00-05:00 UTC"]) == (
        "Mon-Fri 02:00-05:00 UTC",
    )
    with pytest.raises(WindowError, match="at most"):
        windows.check_windows(["daily 01:00-02:00 UTC"] * (windows.MAX_WINDOWS + 1))
