"""Schedule files: parse errors name the schedule, line and field; targets, durations, reloading."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from taskcore.core.actions import ActionRegistry
from taskerman_scheduler.schedule_file import ScheduleFile, load_schedules, parse_duration, parse_schedules
from taskerman_scheduler.schedules import ScheduleError

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
respect_windows = true
[schedule.task]
action = "test:sleep"
cluster_name = "c1"
nodes = ["n1"]
"""


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


@pytest.fixture(scope="module")
def registry() -> ActionRegistry:
    return ActionRegistry.installed()


def test_parse_good_file(registry: ActionRegistry, tmp_path: Path) -> None:
    path = tmp_path / "schedules.toml"
    path.write_text(GOOD)
    nightly, every = load_schedules(path, registry)
    assert nightly.name == "nightly-restart"
    assert nightly.cron == "0 3 * * *"
    assert nightly.timezone == "Europe/Berlin"
    assert nightly.overlap == "skip"
    assert nightly.catchup == timedelta(minutes=10)
    assert not nightly.respect_windows
    assert every.respect_windows
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
