"""Schedule slots (pure): due slots, catch-up, time zones and DST, jitter, and slot task ids."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import msgspec
import pytest

from taskcore.core.model import decode_task
from taskcore.core.subjects import decode_token
from taskerman_scheduler.schedules import Schedule
from taskerman_scheduler.slots import due_slots, manual_task_id, next_slots, slot_delay, slot_task_id

T0 = datetime(2025, 1, 15, 12, 0, 0, tzinfo=UTC)


def _sched(cron: str, catchup: float = 0, timezone: str = "UTC") -> Schedule:
    task = decode_task(b'{"action": "test:sleep", "cluster_name": "c1"}')
    return Schedule(name="s", cron=cron, timezone=timezone, catchup=timedelta(seconds=catchup), task=task)


def _second(n: int) -> datetime:
    return T0 + timedelta(seconds=n)


def test_due_slots_between_last_and_now() -> None:
    s = _sched("* * * * * *")
    assert due_slots(s, _second(0), _second(3)) == [_second(1), _second(2), _second(3)]
    assert due_slots(s, _second(3), _second(3)) == []
    assert due_slots(s, _second(3), _second(3) + timedelta(milliseconds=999)) == []
    assert due_slots(s, _second(2) + timedelta(milliseconds=500), _second(3)) == [_second(3)]


def test_due_slots_without_history_only_within_grace() -> None:
    s = _sched("* * * * * *")
    got = due_slots(s, None, _second(100), grace=timedelta(seconds=3))
    assert got == [_second(98), _second(99), _second(100)]


def test_catchup_window_bounds_missed_slots() -> None:
    minutely = _sched("* * * * *", catchup=600)
    now = T0 + timedelta(hours=2, seconds=30)
    got = due_slots(minutely, T0, now)
    assert got[0] == now - timedelta(seconds=30) - timedelta(minutes=9)  # (now - 10m, now]
    assert len(got) == 10
    no_catchup = _sched("* * * * *")
    assert due_slots(no_catchup, T0, now) == []  # the last slot is 30 s old: missed
    assert due_slots(no_catchup, T0, now, grace=timedelta(seconds=31)) == [now - timedelta(seconds=30)]
    assert due_slots(minutely, None, now) == got  # no history: the same window


def test_recent_last_wins_over_window() -> None:
    s = _sched("* * * * * *", catchup=3600)
    assert due_slots(s, _second(10), _second(12)) == [_second(11), _second(12)]


def test_due_slots_limit_takes_oldest_first() -> None:
    s = _sched("* * * * * *", catchup=3600)
    got = due_slots(s, None, _second(3600), limit=5)
    assert got == [_second(1), _second(2), _second(3), _second(4), _second(5)]


def test_due_slots_requires_aware_datetimes() -> None:
    with pytest.raises(ValueError, match="aware"):
        due_slots(_sched("* * * * *"), None, datetime(2025, 1, 1))


def test_timezone_and_dst() -> None:
    berlin = _sched("0 3 * * *", catchup=86400 * 3, timezone="Europe/Berlin")
    winter = due_slots(berlin, None, datetime(2025, 1, 16, 12, tzinfo=UTC))
    assert winter[-1] == datetime(2025, 1, 16, 2, tzinfo=UTC)
    summer = due_slots(berlin, None, datetime(2025, 7, 16, 12, tzinfo=UTC))
    assert summer[-1] == datetime(2025, 7, 16, 1, tzinfo=UTC)


def test_repeated_hour_runs_fixed_time_jobs_once() -> None:
    # 2025-10-26: Berlin's clocks go from 03:00 CEST back to 02:00 CET; 02:30 happens twice.
    start = datetime(2025, 10, 25, 22, tzinfo=UTC)
    end = datetime(2025, 10, 26, 4, tzinfo=UTC)
    fixed = _sched("30 2 * * *", catchup=86400, timezone="Europe/Berlin")
    assert due_slots(fixed, start, end) == [datetime(2025, 10, 26, 0, 30, tzinfo=UTC)]
    every_15 = _sched("*/15 * * * *", catchup=86400, timezone="Europe/Berlin")
    got = due_slots(every_15, start, end)
    assert len(got) == 6 * 4  # real time: every 15 minutes through the repeated hour
    assert got == sorted(set(got))


def test_slot_task_id() -> None:
    slot = datetime(2025, 1, 15, 4, 0, 5, tzinfo=UTC)
    assert slot_task_id("nightly-restart", slot) == "sched-nightly-restart-20250115T040005"
    berlin = slot.astimezone(_sched("* * * * *", timezone="Europe/Berlin").tz)
    assert slot_task_id("nightly-restart", berlin) == "sched-nightly-restart-20250115T040005"
    odd = slot_task_id("a b.c:d", slot)
    assert decode_token(odd.removeprefix("sched-").rsplit("-", 1)[0]) == "a b.c:d"
    assert slot_task_id("a", slot) != slot_task_id("a-20250115T040005", slot)
    decode_task(b'{"action": "a:b", "cluster_name": "c", "task_id": "%s"}' % odd.encode())  # a valid id
    with pytest.raises(ValueError, match="aware"):
        slot_task_id("x", datetime(2025, 1, 1))


def test_jitter_is_deterministic_and_bounded() -> None:
    jitter = timedelta(seconds=30)
    slots = [T0 + timedelta(minutes=n) for n in range(200)]
    delays = [slot_delay("repair", s, jitter) for s in slots]
    assert delays == [slot_delay("repair", s, jitter) for s in slots]  # what every replica computes
    assert all(timedelta(0) <= d < jitter for d in delays)
    assert len(set(delays)) > 150  # spread over the window, per slot
    assert delays != [slot_delay("other", s, jitter) for s in slots]  # per schedule too
    assert slot_delay("repair", slots[0].astimezone(ZoneInfo("Asia/Tokyo")), jitter) == delays[0]
    assert slot_delay("repair", slots[0], timedelta(0)) == timedelta(0)


def test_due_slots_wait_for_their_jitter() -> None:
    s = msgspec.structs.replace(_sched("* * * * *"), jitter=timedelta(seconds=40))
    delay = slot_delay("s", T0, s.jitter)
    before = T0 - timedelta(seconds=1)
    assert due_slots(s, before, T0 + delay - timedelta(milliseconds=1)) == []
    assert due_slots(s, before, T0 + delay) == [T0]
    # a jittered slot is not "missed" while it waits: the window widens by the jitter
    assert due_slots(s, None, T0 + delay, grace=timedelta(seconds=1)) == [T0]
    assert [slot for slot, _ in next_slots(s, T0, 3)] == [T0 + timedelta(minutes=n) for n in (1, 2, 3)]
    assert all(emit - slot == slot_delay("s", slot, s.jitter) for slot, emit in next_slots(s, T0, 3))


def test_ids_per_cluster_and_manual_runs_never_collide() -> None:
    slot = datetime(2025, 1, 15, 4, 0, 5, tzinfo=UTC)
    base = slot_task_id("n", slot)
    per = {slot_task_id("n", slot, c) for c in ("a", "b", "a~b", "a b", "ü")}
    assert len(per) == 5
    assert all(i.startswith(base + "~") for i in per)
    manual = manual_task_id("n", slot)
    assert manual == "sched-n-manual-20250115T040005.000"
    assert manual_task_id("n", slot, "a") == manual + "~a"
    assert manual != slot_task_id("n-manual", slot)  # a slot id never has a `.`
    long_cluster = "c" * 400
    long_id = slot_task_id("n", slot, long_cluster)
    assert len(long_id) <= 200
    assert long_id != slot_task_id("n", slot, "d" * 400)
    decode_task(b'{"action": "a:b", "cluster_name": "c", "task_id": "%s"}' % long_id.encode())
