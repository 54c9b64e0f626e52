"""Declarative schedules: parsing a TOML schedule file, and which cron slots are due (pure).

A slot is an instant (UTC) at which a schedule's cron expression fires in its time zone. Each slot
has a deterministic task id, used as both the task's `task_id` and its `Nats-Msg-Id`, so the same
slot can never be stored twice in `tasks.global`, even by two schedulers that both believe they lead.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from croniter import CroniterError, croniter  # type: ignore[import-untyped]

from taskcore.actions import ActionRegistry
from taskcore.errors import InvalidTask, TaskermanError
from taskcore.model import Task, check_task, invalid_from
from taskcore.subjects import encode_token

Overlap = Literal["skip", "allow"]
OVERLAPS: tuple[Overlap, ...] = ("skip", "allow")
SLOT_ID_PREFIX = "sched-"
SLOT_TIME_FORMAT = "%Y%m%dT%H%M%S"
MAX_TASK_ID = 200  # `Task.task_id`'s max_length
# Slots later than their time by at most this much are on time, not "missed": it covers the tick
# period and a leader failover. The scheduler passes its own (session timeout + ticks).
DEFAULT_GRACE = timedelta(seconds=5)
MAX_SLOTS_PER_CALL = 1000  # a long catch-up window is worked off across calls, oldest first

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SCHEDULE_HEADER = re.compile(r"^\s*\[\[\s*schedule\s*\]\]")


class ScheduleError(TaskermanError):
    """A schedule file, or one schedule in it, is invalid; says which, where, and what is wrong."""

    def __init__(
        self,
        problem: str,
        *,
        source: str = "",
        index: int | None = None,
        name: str | None = None,
        field: str | None = None,
        line: int | None = None,
    ) -> None:
        self.problem = problem
        self.source = source
        self.index = index
        self.name = name
        self.field = field
        self.line = line
        where = [source] if source else []
        if index is not None:
            label = f"schedule[{index}]"
            if name:
                label += f" {name!r}"
            if line is not None:
                label += f" (line {line})"
            where.append(label)
        if field:
            where.append(field)
        super().__init__(": ".join([*where, problem]))


class Schedule(msgspec.Struct, frozen=True, kw_only=True):
    """One validated schedule. `task` is the template: every field of the wire task except the id."""

    name: str
    cron: str
    timezone: str = "UTC"
    overlap: Overlap = "skip"
    catchup: timedelta = timedelta(0)
    task: Task

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class _RawSchedule(msgspec.Struct, forbid_unknown_fields=True):
    """A `[[schedule]]` table as written, before the checks msgspec cannot express."""

    name: str
    cron: str
    task: dict[str, Any]
    timezone: str = "UTC"
    overlap: str = "skip"
    catchup: str | int | float = 0


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


def check_cron(expr: str) -> None:
    """Raise ValueError unless croniter accepts `expr` (5 fields; 6 = with seconds last; 7 = and
    years) and it fires at least once."""
    try:
        croniter(expr, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except (CroniterError, ValueError, TypeError) as e:
        raise ValueError(f"invalid cron expression {expr!r}: {e}") from e


def slot_task_id(name: str, slot: datetime) -> str:
    """The task id (and Nats-Msg-Id) of one slot: `sched-<name token>-<UTC yyyymmddThhmmss>`.

    The name is subject-token encoded (reversible, no whitespace, `*` or `>`) and the time has a
    fixed width, so different (name, slot) pairs never share an id."""
    if slot.tzinfo is None:
        raise ValueError("slot must be timezone-aware")
    return f"{SLOT_ID_PREFIX}{encode_token(name)}-{slot.astimezone(UTC).strftime(SLOT_TIME_FORMAT)}"


def window_start(schedule: Schedule, now: datetime, grace: timedelta = DEFAULT_GRACE) -> datetime:
    """The oldest instant (exclusive) a slot may have and still be emitted at `now`."""
    return now - max(schedule.catchup, grace)


def due_slots(
    schedule: Schedule,
    last_emitted: datetime | None,
    now: datetime,
    *,
    grace: timedelta = DEFAULT_GRACE,
    limit: int = MAX_SLOTS_PER_CALL,
) -> list[datetime]:
    """The schedule's slots in `(last_emitted, now]`, oldest first, as UTC datetimes.

    Slots before `now - max(catchup, grace)` were missed while no scheduler ran and are left out,
    whether `last_emitted` is older than that or unknown (None). When a repeated local hour (DST
    ends) makes a fixed-time job fire twice at the same wall-clock time, only the first counts, as
    in Vixie cron; jobs with a wildcard hour keep running in real time. At most `limit` slots."""
    if now.tzinfo is None or (last_emitted is not None and last_emitted.tzinfo is None):
        raise ValueError("due_slots needs timezone-aware datetimes")
    start = window_start(schedule, now, grace)
    if last_emitted is not None and last_emitted > start:
        start = last_emitted
    tz = schedule.tz
    fixed_hour = _fixed_hour(schedule.cron)
    it = croniter(schedule.cron, start.astimezone(tz))
    out: list[datetime] = []
    while len(out) < limit:
        slot: datetime = it.get_next(datetime)
        if slot > now:
            break
        local = slot.astimezone(tz)
        if fixed_hour and local.fold == 1 and _wall_time_repeats(schedule.cron, local):
            continue
        out.append(slot.astimezone(UTC))
    return out


def _fixed_hour(cron: str) -> bool:
    """Whether the expression fires at fixed hours (not `*` or `*/n` in the hour field)."""
    fields = cron.split()
    if len(fields) == 1:  # an alias such as @daily
        return fields[0].lower() != "@hourly"
    return not fields[1].startswith("*")


def _wall_time_repeats(cron: str, local: datetime) -> bool:
    """Whether the first occurrence (fold=0) of this ambiguous wall-clock time is also a slot."""
    first = local.replace(fold=0)
    if first.utcoffset() == local.utcoffset():
        return False
    probe = croniter(cron, (first - timedelta(seconds=1)).astimezone(UTC).astimezone(local.tzinfo))
    nxt: datetime = probe.get_next(datetime)
    return nxt.astimezone(UTC) == first.astimezone(UTC)


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
    if len(slot_task_id(raw.name, datetime(2000, 1, 1, tzinfo=UTC))) > MAX_TASK_ID:
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
    try:
        catchup = parse_duration(raw.catchup)
    except ValueError as e:
        raise ScheduleError(str(e), field="catchup", **where) from e
    task = _parse_template(raw.task, registry, where)
    return Schedule(
        name=raw.name, cron=raw.cron, timezone=raw.timezone, overlap=overlap, catchup=catchup, task=task
    )


def _parse_template(template: dict[str, Any], registry: ActionRegistry, where: dict[str, Any]) -> Task:
    if "task_id" in template:
        raise ScheduleError("must not be set: each slot gets its own id", field="task.task_id", **where)
    try:
        task = msgspec.convert(template, Task, strict=True)
        check_task(task)
        registry.resolve(task)
    except msgspec.ValidationError as e:
        err = invalid_from(e)
        raise ScheduleError(err.problem, field=_task_field(err.field), **where) from e
    except InvalidTask as e:
        raise ScheduleError(e.problem, field=_task_field(e.field), **where) from e
    return task


def _task_field(field: str | None) -> str:
    return f"task.{field}" if field else "task"
