"""The schedule file: `[[schedule]]` tables in TOML, parsed and validated into Schedules (every
problem is one ScheduleError naming the file, the schedule, its line and the field), and a
`ScheduleFile` that is re-read when it changes."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from taskcore.core.actions import ActionRegistry
from taskcore.core.errors import InvalidTask
from taskcore.core.model import Name, Task, check_task, invalid_from
from taskerman_scheduler.schedules import OVERLAPS, Schedule, ScheduleError
from taskerman_scheduler.slots import MAX_TASK_ID, check_cron, longest_task_id

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SCHEDULE_HEADER = re.compile(r"^\s*\[\[\s*schedule\s*\]\]")


class _RawSchedule(msgspec.Struct, forbid_unknown_fields=True):
    """A `[[schedule]]` table as written, before the checks msgspec cannot express."""

    name: str
    cron: str
    task: dict[str, Any]
    timezone: str = "UTC"
    overlap: str = "skip"
    catchup: str | int | float = 0
    jitter: str | int | float = 0
    clusters: list[str] | None = None
    cluster_pattern: str | None = None
    respect_windows: bool = False


class _RawFile(msgspec.Struct, forbid_unknown_fields=True):
    schedule: list[dict[str, Any]] = []


def parse_duration(value: str | float) -> timedelta:
    """`90`, `"90s"`, `"10m"`, `"1h30m"`, `"1d"` (a bare number is seconds) as a timedelta >= 0."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '10m', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        elif text and _DURATION.sub("", text) == "":
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION.findall(text))
        else:
            raise ValueError(f"expected a duration like '30s', '10m', '1h30m' or '1d', got {value!r}")
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return timedelta(seconds=seconds)


def parse_schedules(text: str, registry: ActionRegistry, source: str = "<schedules>") -> list[Schedule]:
    """Parse and validate a whole schedule file; ScheduleError naming the schedule and problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScheduleError(f"not valid TOML ({e})", source=source) from e
    try:
        raw_file = msgspec.convert(data, _RawFile, strict=True)
    except msgspec.ValidationError as e:
        err = invalid_from(e)
        raise ScheduleError(err.problem, source=source, field=err.field) from e
    lines = _header_lines(text, len(raw_file.schedule))
    schedules: list[Schedule] = []
    seen: dict[str, int] = {}
    for index, table in enumerate(raw_file.schedule):
        name = table.get("name") if isinstance(table.get("name"), str) else None
        where: dict[str, Any] = {"source": source, "index": index, "name": name, "line": lines[index]}
        sched = _parse_one(table, registry, where)
        if sched.name in seen:
            raise ScheduleError(f"duplicate name (also schedule[{seen[sched.name]}])", field="name", **where)
        seen[sched.name] = index
        schedules.append(sched)
    return schedules


def load_schedules(path: Path, registry: ActionRegistry) -> list[Schedule]:
    """Read and parse a schedule file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ScheduleError(f"cannot read schedule file ({e})", source=str(path)) from e
    return parse_schedules(text, registry, source=str(path))


class ScheduleFile:
    """A schedule file that is re-read when it changes (its mtime, size or inode).

    `load()` reads it now; `poll()` returns the new schedules once after each change, None while
    it is unchanged, and raises ScheduleError (once per change) when the changed file is broken:
    the caller keeps its last good schedules."""

    def __init__(self, path: Path, registry: ActionRegistry) -> None:
        self.path = path
        self.registry = registry
        self._seen: tuple[int, int, int] | None = None

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def load(self) -> list[Schedule]:
        self._seen = self._signature()
        return load_schedules(self.path, self.registry)

    def poll(self) -> list[Schedule] | None:
        signature = self._signature()
        if signature == self._seen:
            return None
        return self.load()


def _header_lines(text: str, count: int) -> list[int | None]:
    """Line numbers of the `[[schedule]]` headers, when they can be told apart (else unknown)."""
    found = [i for i, line in enumerate(text.splitlines(), start=1) if _SCHEDULE_HEADER.match(line)]
    if len(found) != count:
        return [None] * count
    return list(found)


def _parse_one(table: Mapping[str, Any], registry: ActionRegistry, where: dict[str, Any]) -> Schedule:
    try:
        raw = msgspec.convert(table, _RawSchedule, strict=True)
    except msgspec.ValidationError as e:
        err = invalid_from(e)
        raise ScheduleError(err.problem, field=err.field, **where) from e
    if not raw.name.strip():
        raise ScheduleError("must not be blank", field="name", **where)
    if longest_task_id(raw.name) > MAX_TASK_ID:
        raise ScheduleError(
            f"too long for a task id (max {MAX_TASK_ID} chars with prefix)", field="name", **where
        )
    try:
        check_cron(raw.cron)
    except ValueError as e:
        raise ScheduleError(str(e), field="cron", **where) from e
    overlap = next((o for o in OVERLAPS if o == raw.overlap), None)
    if overlap is None:
        raise ScheduleError(
            f"expected one of {', '.join(OVERLAPS)}, got {raw.overlap!r}", field="overlap", **where
        )
    try:
        ZoneInfo(raw.timezone)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ScheduleError(f"unknown time zone {raw.timezone!r}", field="timezone", **where) from e
    durations: dict[str, timedelta] = {}
    for field, value in (("catchup", raw.catchup), ("jitter", raw.jitter)):
        try:
            durations[field] = parse_duration(value)
        except ValueError as e:
            raise ScheduleError(str(e), field=field, **where) from e
    clusters, pattern = _parse_targets(raw, where)
    task = _parse_template(raw.task, registry, where, multi=bool(clusters or pattern))
    return Schedule(
        name=raw.name,
        cron=raw.cron,
        timezone=raw.timezone,
        overlap=overlap,
        catchup=durations["catchup"],
        jitter=durations["jitter"],
        clusters=clusters,
        cluster_pattern=pattern,
        respect_windows=raw.respect_windows,
        task=task,
    )


def _parse_targets(raw: _RawSchedule, where: dict[str, Any]) -> tuple[tuple[str, ...], str]:
    """`clusters` and `cluster_pattern`; exactly one of them or `task.cluster_name` is given."""
    given = [
        f
        for f, present in (
            ("task.cluster_name", "cluster_name" in raw.task),
            ("clusters", raw.clusters is not None),
            ("cluster_pattern", raw.cluster_pattern is not None),
        )
        if present
    ]
    if len(given) != 1:
        problem = "give exactly one of task.cluster_name, clusters or cluster_pattern"
        field = given[-1] if given else "task.cluster_name"
        raise ScheduleError(f"{problem} (given: {', '.join(given) or 'none'})", field=field, **where)
    if raw.cluster_pattern is not None:
        if not raw.cluster_pattern.strip():
            raise ScheduleError("must not be blank", field="cluster_pattern", **where)
        return (), raw.cluster_pattern
    if raw.clusters is None:
        return (), ""
    if not raw.clusters:
        raise ScheduleError("must list at least one cluster", field="clusters", **where)
    for i, cluster in enumerate(raw.clusters):
        try:
            msgspec.convert(cluster, Name)
        except msgspec.ValidationError as e:
            raise ScheduleError(invalid_from(e).problem, field=f"clusters[{i}]", **where) from e
        if not cluster.strip():
            raise ScheduleError("must not be blank", field=f"clusters[{i}]", **where)
        if cluster in raw.clusters[:i]:
            raise ScheduleError(f"{cluster!r} is listed twice", field=f"clusters[{i}]", **where)
    return tuple(raw.clusters), ""


def _parse_template(
    template: dict[str, Any], registry: ActionRegistry, where: dict[str, Any], *, multi: bool
) -> Task:
    if "task_id" in template:
        raise ScheduleError("must not be set: each slot gets its own id", field="task.task_id", **where)
    if multi:
        for field in ("nodes", "destnode"):
            if template.get(field):
                raise ScheduleError(
                    "cannot be used with clusters or cluster_pattern: node names belong to one cluster",
                    field=f"task.{field}",
                    **where,
                )
        template = {**template, "cluster_name": "placeholder"}  # each task gets its own
    try:
        task = msgspec.convert(template, Task, strict=True)
        check_task(task)
        registry.resolve(task)
    except msgspec.ValidationError as e:
        err = invalid_from(e)
        raise ScheduleError(err.problem, field=_task_field(err.field), **where) from e
    except InvalidTask as e:
        raise ScheduleError(e.problem, field=_task_field(e.field), **where) from e
    return msgspec.structs.replace(task, cluster_name="") if multi else task


def _task_field(field: str | None) -> str:
    return f"task.{field}" if field else "task"
