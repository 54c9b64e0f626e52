"""Maintenance windows and freezes of a cluster, as pure functions of the time.

A window is written as an operator says it: `"Mon-Fri 02:00-05:00 Europe/Amsterdam"`, `"daily
22:00-02:00 UTC"` (past midnight: it closes the next morning), `"Sat,Sun 00:00-24:00 UTC"`. Days
are `Mon`…`Sun`, ranges (`Mon-Fri`, `Fri-Mon`), lists of both, or `daily`; times (`HH:MM`, or
`HH:MM:SS`) are local to the zone (an IANA name), so a window opens at its wall-clock hour through
daylight-saving changes (and lasts its length in real time). A cluster with windows is open while
any of them is; without windows it is always open. A freeze (`until`, a reason) closes it whatever
its windows say.

`gate(windows, freeze_until, freeze_reason, now)` says whether work may start now and, if not,
until when and why: runners start nothing on a closed cluster (what runs finishes)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_WINDOWS = 16
_TIME = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?-(\d{1,2}):(\d{2})(?::(\d{2}))?$")
DAY = 86400
LOOK_AHEAD_DAYS = 8  # every window opens within a week


class WindowError(ValueError):
    """A window the operator wrote cannot be read; the message says which part and how to write it."""


@dataclass(frozen=True)
class Window:
    """Opens at `start` (seconds after local midnight) on each of `days` (0 = Monday) and stays
    open `length` seconds, in `zone`."""

    days: frozenset[int]
    start: int
    length: int
    zone: ZoneInfo
    text: str


EXAMPLE = 'e.g. "Mon-Fri 02:00-05:00 Europe/Amsterdam" or "daily 22:00-02:00 UTC"'


def parse(text: str) -> Window:
    """A window from its text; WindowError with what is wrong otherwise."""
    parts = text.split()
    if len(parts) != 3:
        raise WindowError(f"window {text!r}: give DAYS HH:MM-HH:MM ZONE, {EXAMPLE}")
    days_text, hours, zone_name = parts
    days = _days(days_text, text)
    m = _TIME.match(hours)
    if not m:
        raise WindowError(f"window {text!r}: hours {hours!r} are not HH:MM-HH:MM, {EXAMPLE}")
    h1, m1, s1, h2, m2, s2 = (int(g or 0) for g in m.groups())
    if h1 > 23 or m1 > 59 or s1 > 59 or h2 > 24 or m2 > 59 or s2 > 59 or (h2 == 24 and (m2 or s2)):
        raise WindowError(f"window {text!r}: {hours!r} is not a time of day (00:00 to 24:00)")
    start, end = h1 * 3600 + m1 * 60 + s1, h2 * 3600 + m2 * 60 + s2
    if start == end:
        raise WindowError(f"window {text!r}: it opens and closes at the same time")
    length = end - start if end > start else end + DAY - start  # past midnight
    try:
        zone = ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise WindowError(
            f"window {text!r}: unknown time zone {zone_name!r} (an IANA name such as UTC)"
        ) from None
    return Window(days=days, start=start, length=length, zone=zone, text=" ".join(parts))


def _days(spec: str, text: str) -> frozenset[int]:
    if spec.lower() == "daily":
        return frozenset(range(7))
    out: set[int] = set()
    for part in spec.lower().split(","):
        first, sep, last = part.partition("-")
        if first not in DAYS or (sep and last not in DAYS):
            raise WindowError(f"window {text!r}: days {spec!r}: use Mon…Sun, ranges like Mon-Fri, or daily")
        a = DAYS.index(first)
        b = DAYS.index(last) if sep else a
        out.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(out)


def openings(w: Window, now: float) -> list[tuple[float, float]]:
    """The window's (opens, closes) periods around `now`, as epoch seconds: from the day before
    (a period past midnight may still be open) to a week ahead."""
    today = datetime.fromtimestamp(now, w.zone).date()
    out = []
    for delta in range(-1, LOOK_AHEAD_DAYS):
        day = today + timedelta(days=delta)
        if day.weekday() not in w.days:
            continue
        local = datetime(day.year, day.month, day.day, tzinfo=w.zone) + timedelta(seconds=w.start)
        opens = local.timestamp()
        out.append((opens, opens + w.length))
    return out


def is_open(w: Window, now: float) -> bool:
    return any(opens <= now < closes for opens, closes in openings(w, now))


def next_open(w: Window, now: float) -> float:
    """When the window next opens after `now` (now, if it is open)."""
    return min(opens if opens > now else now for opens, closes in openings(w, now) if closes > now)


@dataclass(frozen=True)
class Closed:
    """Work may not start before `until` (epoch seconds), because of `reason`."""

    until: float
    reason: str
    frozen: bool


def gate(
    windows: tuple[str, ...], freeze_until: float | None, freeze_reason: str, now: float
) -> Closed | None:
    """None while work may start on the cluster; else until when and why not."""
    if freeze_until is not None and freeze_until > now:
        return Closed(until=freeze_until, reason=freeze_reason, frozen=True)
    parsed = [parse(w) for w in windows]
    if not parsed or any(is_open(w, now) for w in parsed):
        return None
    first = min(parsed, key=lambda w: next_open(w, now))
    return Closed(until=next_open(first, now), reason=first.text, frozen=False)


def check_windows(windows: list[str]) -> tuple[str, ...]:
    """The windows as stored (normalised text), each read once so that a bad one is refused
    when it is set, not when a runner meets it."""
    if len(windows) > MAX_WINDOWS:
        raise WindowError(f"at most {MAX_WINDOWS} windows per cluster, got {len(windows)}")
    return tuple(dict.fromkeys(parse(w).text for w in windows))
