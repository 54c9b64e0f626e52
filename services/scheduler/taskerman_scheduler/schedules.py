"""Declarative schedules: parsing a TOML schedule file, and which cron slots are due (pure).

A slot is an instant (UTC) at which a schedule's cron expression fires in its time zone; with
`jitter` it is emitted a little later, by a delay derived from a hash of the schedule name and the
slot, so every replica agrees on it. Each slot has a deterministic task id per target cluster, used
as both the task's `task_id` and its `Nats-Msg-Id`, so the same slot can never be stored twice in
`tasks.global`, even by two schedulers that both believe they lead.

Task ids (the name is subject-token encoded: it never holds `~`, `.` or whitespace):
    sched-<name>-<yyyymmddThhmmss>                    a slot of a one-cluster schedule
    sched-<name>-<yyyymmddThhmmss>~<cluster>          a slot, per cluster of a list or pattern schedule
    sched-<name>-manual-<yyyymmddThhmmss.mmm>[~<c>]   a manual trigger (`taskerman schedules trigger`)
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from croniter import CroniterError, croniter  # type: ignore[import-untyped]

from taskcore.core.actions import ActionRegistry
from taskcore.core.errors import InvalidTask, TaskermanError
from taskcore.core.model import Name, Task, check_task, invalid_from
from taskcore.core.subjects import encode_token

Overlap = Literal["skip", "allow", "queue"]
OVERLAPS: tuple[Overlap, ...] = ("skip", "allow", "queue")
SLOT_ID_PREFIX = "sched-"
SLOT_TIME_FORMAT = "%Y%m%dT%H%M%S"
MANUAL_MARK = "manual-"
MAX_TASK_ID = 200  # `Task.task_id`'s max_length
CLUSTER_SEP = "~"  # never in an encoded token, so `<id>~<cluster>` cannot be mistaken for another id
_HASHED_CLUSTER = 2 + 16  # `~#` + 16 hex digits: a cluster token too long for the id is hashed
_LONGEST_STAMP = len(MANUAL_MARK) + len("20000101T000000.000")
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


class UnknownSchedule(TaskermanError):
    """A request names a schedule that is not in the running set."""


class Schedule(msgspec.Struct, frozen=True, kw_only=True):
    """One validated schedule. `task` is the template: every field of the wire task except the id.

    It targets one cluster (`task.cluster_name`), a list (`clusters`) or every known cluster whose
    name matches `cluster_pattern` (fnmatch); for the last two the template's `cluster_name` is
    empty and each emitted task gets its own."""

    name: str
    cron: str
    timezone: str = "UTC"
    overlap: Overlap = "skip"
    catchup: timedelta = timedelta(0)
    jitter: timedelta = timedelta(0)
    clusters: tuple[str, ...] = ()
    cluster_pattern: str = ""
    task: Task

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def multi(self) -> bool:
        """Whether the schedule targets a list or a pattern (task ids then name the cluster)."""
        return bool(self.clusters or self.cluster_pattern)

    @property
    def target(self) -> str:
        """The target, for people: `cluster "a"`, `clusters "a", "b"` or `pattern "cassandra:*"`."""
        if self.cluster_pattern:
            return f"pattern {self.cluster_pattern!r}"
        if self.clusters:
            return "clusters " + ", ".join(repr(c) for c in self.clusters)
        return f"cluster {self.task.cluster_name!r}"

    def task_for(self, cluster: str, task_id: str) -> Task:
        """The task of one run on one cluster; a template without an owner names the schedule."""
        return msgspec.structs.replace(
            self.task, cluster_name=cluster, task_id=task_id, owner=self.task.owner or f"schedule:{self.name}"
        )


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


def slot_task_id(name: str, slot: datetime, cluster: str | None = None) -> str:
    """The task id (and Nats-Msg-Id) of one slot: `sched-<name token>-<UTC yyyymmddThhmmss>`, and
    `~<cluster token>` after it for one cluster of a list or pattern schedule.

    The name is subject-token encoded (reversible, no whitespace, `*`, `>` or `~`) and the time has
    a fixed width, so different (name, slot, cluster) triples never share an id."""
    if slot.tzinfo is None:
        raise ValueError("slot must be timezone-aware")
    stamp = slot.astimezone(UTC).strftime(SLOT_TIME_FORMAT)
    return with_cluster(f"{SLOT_ID_PREFIX}{encode_token(name)}-{stamp}", cluster)


def manual_task_id(name: str, at: datetime, cluster: str | None = None) -> str:
    """The task id of a manual run: `sched-<name token>-manual-<yyyymmddThhmmss.mmm>[~<cluster>]`.
    The `.` never occurs in a slot's id, so a manual run cannot take a slot's id."""
    if at.tzinfo is None:
        raise ValueError("the trigger time must be timezone-aware")
    utc = at.astimezone(UTC)
    stamp = f"{utc.strftime(SLOT_TIME_FORMAT)}.{utc.microsecond // 1000:03d}"
    return with_cluster(f"{SLOT_ID_PREFIX}{encode_token(name)}-{MANUAL_MARK}{stamp}", cluster)


def with_cluster(base: str, cluster: str | None) -> str:
    """`<base>~<cluster token>`, or with a hash of the name when the token would not fit in an id."""
    if cluster is None:
        return base
    task_id = f"{base}{CLUSTER_SEP}{encode_token(cluster)}"
    if len(task_id) > MAX_TASK_ID:
        task_id = f"{base}{CLUSTER_SEP}#{hashlib.sha256(cluster.encode()).hexdigest()[:16]}"
    return task_id


def slot_delay(name: str, slot: datetime, jitter: timedelta) -> timedelta:
    """How long after `slot` it is emitted: a fraction of `jitter` fixed by a hash of the schedule
    name and the slot (in [0, jitter), millisecond steps), so every replica computes the same."""
    if jitter <= timedelta(0):
        return timedelta(0)
    key = f"{name}\n{slot.astimezone(UTC).isoformat()}".encode()
    fraction = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    return timedelta(milliseconds=int(jitter / timedelta(milliseconds=1) * fraction))


def window_start(schedule: Schedule, now: datetime, grace: timedelta = DEFAULT_GRACE) -> datetime:
    """The oldest instant (exclusive) a slot may have and still be emitted at `now` (its jitter
    delays a slot's emission, so it widens the window by as much)."""
    return now - max(schedule.catchup, grace) - schedule.jitter


def due_slots(
    schedule: Schedule,
    last_emitted: datetime | None,
    now: datetime,
    *,
    grace: timedelta = DEFAULT_GRACE,
    limit: int = MAX_SLOTS_PER_CALL,
) -> list[datetime]:
    """The schedule's slots in `(last_emitted, now]` that are due, oldest first, as UTC datetimes.

    Slots before `now - max(catchup, grace) - jitter` were missed while no scheduler ran and are
    left out, whether `last_emitted` is older than that or unknown (None). With jitter a slot is
    due once its delay has passed too; the first slot not yet due ends the list (slots go out in
    order). When a repeated local hour (DST ends) makes a fixed-time job fire twice at the same
    wall-clock time, only the first counts, as in Vixie cron; jobs with a wildcard hour keep running
    in real time. At most `limit` slots."""
    if now.tzinfo is None or (last_emitted is not None and last_emitted.tzinfo is None):
        raise ValueError("due_slots needs timezone-aware datetimes")
    start = window_start(schedule, now, grace)
    if last_emitted is not None and last_emitted > start:
        start = last_emitted
    out: list[datetime] = []
    for slot in slots_after(schedule, start):
        if len(out) >= limit or slot + slot_delay(schedule.name, slot, schedule.jitter) > now:
            break
        out.append(slot)
    return out


def slots_after(schedule: Schedule, start: datetime) -> Iterator[datetime]:
    """The schedule's slots after `start`, for ever, as UTC datetimes (repeated hours as above)."""
    if start.tzinfo is None:
        raise ValueError("slots_after needs a timezone-aware datetime")
    tz = schedule.tz
    fixed_hour = _fixed_hour(schedule.cron)
    it = croniter(schedule.cron, start.astimezone(tz))
    while True:
        slot: datetime = it.get_next(datetime)
        local = slot.astimezone(tz)
        if fixed_hour and local.fold == 1 and _wall_time_repeats(schedule.cron, local):
            continue
        yield slot.astimezone(UTC)


def next_slots(schedule: Schedule, start: datetime, count: int) -> list[tuple[datetime, datetime]]:
    """The next `count` slots after `start`, each with the instant it will be emitted (jitter)."""
    out: list[tuple[datetime, datetime]] = []
    for slot in slots_after(schedule, start):
        if len(out) >= count:
            break
        out.append((slot, slot + slot_delay(schedule.name, slot, schedule.jitter)))
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
    longest = len(f"{SLOT_ID_PREFIX}{encode_token(raw.name)}-") + _LONGEST_STAMP + _HASHED_CLUSTER
    if longest > MAX_TASK_ID:
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
