"""Schedule files: parse errors name the schedule, line and field; due slots, catch-up and slot ids."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec
import pytest

from taskcore.core.actions import ActionRegistry
from taskcore.core.model import decode_task
from taskcore.core.subjects import decode_token
from taskerman_scheduler.schedule_file import ScheduleFile, load_schedules, parse_duration, parse_schedules
from taskerman_scheduler.schedules import Schedule, ScheduleError
from taskerman_scheduler.slots import due_slots, manual_task_id, next_slots, slot_delay, slot_task_id
from taskerman_scheduler.targets import matching

GOOD = """\
# maintenance
[[schedule]]
name = "nightly-restart"
cron = "0 3 * * *"
timezone = "Europe/Berlin"
overlap = "skip"
catchup = "10m"
[schedule.task]
action = "test:sleep"
cluster_name = "demo:web"
limit = 2
taskerman_params = { action_args = { seconds = 0.5 } }

[[schedule]]
name = "every second"
cron = "* * * * * *"
overlap = "allow"
[schedule.task]
action = "test:sleep"
cluster_name = "c1"
nodes = ["n1"]
"""

T0 = datetime(2025, 1, 15, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def registry() -> ActionRegistry:
    return ActionRegistry.installed()


def _sched(cron: str, catchup: float = 0, timezone: str = "UTC") -> Schedule:
    task = decode_task(b'{"action": "test:sleep", "cluster_name": "c1"}')
    return Schedule(name="s", cron=cron, timezone=timezone, catchup=timedelta(seconds=catchup), task=task)


def _second(n: int) -> datetime:
    return T0 + timedelta(seconds=n)


def test_parse_good_file(registry: ActionRegistry, tmp_path: Path) -> None:
    path = tmp_path / "schedules.toml"
    path.write_text(GOOD)
    nightly, every = load_schedules(path, registry)
    assert nightly.name == "nightly-restart"
    assert nightly.cron == "0 3 * * *"
    assert nightly.timezone == "Europe/Berlin"
    assert nightly.overlap == "skip"
    assert nightly.catchup == timedelta(minutes=10)
    assert nightly.task.limit == 2
    assert nightly.task.action_args == {"seconds": 0.5}
    assert nightly.task.task_id == ""
    assert every.timezone == "UTC"
    assert every.overlap == "allow"
    assert every.catchup == timedelta(0)
    assert every.task.nodes == ("n1",)


def test_empty_file_has_no_schedules(registry: ActionRegistry) -> None:
    assert parse_schedules("", registry) == []


def _error(text: str, registry: ActionRegistry) -> ScheduleError:
    with pytest.raises(ScheduleError) as info:
        parse_schedules(text, registry, source="s.toml")
    return info.value


def _second_schedule_with(registry: ActionRegistry, old: str, new: str) -> ScheduleError:
    """GOOD with one line of its second schedule (header on line 14) changed."""
    head, sep, tail = GOOD.partition('name = "every second"')
    assert sep
    return _error(head + sep + tail.replace(old, new, 1), registry)


@pytest.mark.parametrize(
    ("old", "new", "field", "needle"),
    [
        ('cron = "* * * * * *"', 'cron = "61 * * * *"', "cron", "out of range"),
        ('cron = "* * * * * *"', 'cron = "* * *"', "cron", "columns"),
        ('cron = "* * * * * *"', 'cron = "0 0 30 2 *"', "cron", "invalid cron"),
        ('overlap = "allow"', 'overlap = "sometimes"', "overlap", "skip"),
        ('overlap = "allow"', 'timezone = "Mars/Olympus"', "timezone", "Mars/Olympus"),
        ('overlap = "allow"', 'catchup = "soon"', "catchup", "duration"),
        ('overlap = "allow"', "catchup = -5", "catchup", "negative"),
        ('overlap = "allow"', "colour = 1", "colour", "unknown field"),
        ('cluster_name = "c1"', "cluster_name = 7", "task.cluster_name", "str"),
        ('cluster_name = "c1"', 'cluster_name = "c1"\nlimit = 0', "task.limit", ">= 1"),
        ('cluster_name = "c1"', 'cluster_name = "c1"\nbogus = 1', "task.bogus", "unknown field"),
        ('cluster_name = "c1"', 'cluster_name = "  "', "task.cluster_name", "blank"),
        ('cluster_name = "c1"', 'cluster_name = "c1"\ntask_id = "x"', "task.task_id", "own id"),
        ('action = "test:sleep"', 'action = "nope:never"', "task.action", "unknown action"),
        ('nodes = ["n1"]', "taskerman_params = { action_args = { secs = 1 } }", "task", "secs"),
    ],
)
def test_errors_name_schedule_line_and_field(
    registry: ActionRegistry, old: str, new: str, field: str, needle: str
) -> None:
    e = _second_schedule_with(registry, old, new)
    assert e.index == 1
    assert e.name == "every second"
    assert e.line == 14
    assert e.field is not None
    assert e.field.startswith(field), e
    assert needle in e.problem, e
    assert str(e).startswith(f"s.toml: schedule[1] 'every second' (line 14): {e.field}: "), e


def test_duplicate_name(registry: ActionRegistry) -> None:
    e = _error(GOOD.replace('"every second"', '"nightly-restart"'), registry)
    assert (e.index, e.field) == (1, "name")
    assert "duplicate" in e.problem
    assert "schedule[0]" in e.problem


def test_blank_and_missing_name(registry: ActionRegistry) -> None:
    e = _error(GOOD.replace('name = "every second"', 'name = " "'), registry)
    assert (e.index, e.field) == (1, "name")
    e = _error(GOOD.replace('name = "every second"', ""), registry)
    assert (e.index, e.field) == (1, "name")
    assert "missing" in e.problem


def test_missing_task_and_cron(registry: ActionRegistry) -> None:
    e = _error('[[schedule]]\nname = "a"\ncron = "* * * * *"\n', registry)
    assert (e.index, e.name, e.field, e.line) == (0, "a", "task", 1)
    e = _error(
        '[[schedule]]\nname = "a"\n[schedule.task]\naction = "test:sleep"\ncluster_name = "c"\n', registry
    )
    assert e.field == "cron"


def test_toml_syntax_error_names_the_line(registry: ActionRegistry) -> None:
    e = _error(GOOD.replace("limit = 2", "limit = = 2"), registry)
    assert e.index is None
    assert "line 11" in str(e)


def test_wrong_top_level_shape(registry: ActionRegistry) -> None:
    assert _error('schedule = "daily"', registry).field == "schedule"
    assert _error("[other]\nx = 1", registry).field == "other"


def test_unreadable_file(registry: ActionRegistry, tmp_path: Path) -> None:
    with pytest.raises(ScheduleError, match="cannot read"):
        load_schedules(tmp_path / "absent.toml", registry)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(0, 0), (90, 90), (1.5, 1.5), ("90", 90), ("30s", 30), ("10m", 600), ("1h30m", 5400), ("1d", 86400)],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "m", "10 minutes", "-1", "1x", True])
def test_parse_duration_rejects(text: str | bool) -> None:
    with pytest.raises(ValueError, match=r"duration|negative"):
        parse_duration(text)


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


TARGETS = """\
[[schedule]]
name = "repair"
cron = "0 * * * *"
overlap = "queue"
jitter = "30s"
cluster_pattern = "cassandra:*"
[schedule.task]
action = "test:sleep"
owner = "gsi"

[[schedule]]
name = "pair"
cron = "0 * * * *"
clusters = ["a", "b c"]
[schedule.task]
action = "test:sleep"
"""


def test_parse_targets_queue_and_jitter(registry: ActionRegistry) -> None:
    pattern, listed = parse_schedules(TARGETS, registry)
    assert (pattern.overlap, pattern.jitter, pattern.cluster_pattern) == (
        "queue",
        timedelta(seconds=30),
        "cassandra:*",
    )
    assert pattern.multi
    assert pattern.target == "pattern 'cassandra:*'"
    assert pattern.task.cluster_name == ""  # each task gets its own
    task = pattern.task_for("cassandra:geo", "t1")
    assert (task.cluster_name, task.task_id, task.owner) == ("cassandra:geo", "t1", "gsi")
    assert listed.clusters == ("a", "b c")
    assert listed.task_for("a", "t2").owner == "schedule:pair"
    single = parse_schedules(GOOD, registry)[0]
    assert not single.multi
    assert single.target == "cluster 'demo:web'"


@pytest.mark.parametrize(
    ("old", "new", "field", "needle"),
    [
        ('cluster_pattern = "cassandra:*"', "", "task.cluster_name", "exactly one"),
        (
            'cluster_pattern = "cassandra:*"',
            'cluster_pattern = "x"\nclusters = ["a"]',
            "cluster",
            "exactly one",
        ),
        ('owner = "gsi"', 'owner = "gsi"\ncluster_name = "a"', "cluster_pattern", "exactly one"),
        ('cluster_pattern = "cassandra:*"', 'cluster_pattern = " "', "cluster_pattern", "blank"),
        ('cluster_pattern = "cassandra:*"', "clusters = []", "clusters", "at least one"),
        ('cluster_pattern = "cassandra:*"', 'clusters = ["a", "a"]', "clusters[1]", "twice"),
        ('cluster_pattern = "cassandra:*"', 'clusters = ["a", ""]', "clusters[1]", "length"),
        ('owner = "gsi"', 'nodes = ["n1"]', "task.nodes", "one cluster"),
        ('jitter = "30s"', 'jitter = "soon"', "jitter", "duration"),
        ('jitter = "30s"', "jitter = -1", "jitter", "negative"),
    ],
)
def test_target_errors(registry: ActionRegistry, old: str, new: str, field: str, needle: str) -> None:
    e = _error(TARGETS.replace(old, new, 1), registry)
    assert (e.index, e.name) == (0, "repair")
    assert e.field is not None
    assert e.field.startswith(field), e
    assert needle in e.problem, e


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


def test_too_long_a_name_is_rejected(registry: ActionRegistry) -> None:
    e = _error(GOOD.replace('"every second"', '"' + "x" * 160 + '"'), registry)
    assert (e.index, e.field) == (1, "name")
    assert "too long" in e.problem


def test_schedule_file_reload(registry: ActionRegistry, tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(GOOD)
    source = ScheduleFile(path, registry)
    assert [s.name for s in source.load()] == ["nightly-restart", "every second"]
    assert source.poll() is None  # unchanged
    path.write_text(GOOD.replace('"every second"', '"each second"'))
    changed = source.poll()
    assert changed is not None
    assert [s.name for s in changed] == ["nightly-restart", "each second"]
    path.write_text(GOOD.replace('cron = "0 3 * * *"', 'cron = "0 25 * * *"'))
    with pytest.raises(ScheduleError, match="cron"):
        source.poll()
    assert source.poll() is None  # a broken change is reported once
    path.unlink()
    with pytest.raises(ScheduleError, match="cannot read"):
        source.poll()


def test_matching_clusters() -> None:
    known = ["cassandra:b", "cassandra:a", "Cassandra:X", "redis:a", "cassandra:a"]
    assert matching("cassandra:*", known) == ["cassandra:a", "cassandra:b"]
    assert matching("*:a", known) == ["cassandra:a", "redis:a"]
    assert matching("nothing", known) == []


def test_the_readme_example_parses(registry: ActionRegistry) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Schedules", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    nightly, weekly, hourly = parse_schedules(example, registry, source="README.md")
    assert (nightly.task.cluster_name, nightly.jitter, nightly.catchup) == (
        "demo:web",
        timedelta(minutes=5),
        timedelta(hours=2),
    )
    assert (weekly.overlap, weekly.cluster_pattern) == ("queue", "cassandra:*")
    assert hourly.clusters == ("redis:sessions", "postgres:billing")
