"""Schedule slots (pure): which cron slots are due, when each goes out, and their task ids.

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
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from croniter import CroniterError, croniter  # type: ignore[import-untyped]

from taskcore.core.subjects import encode_token
from taskerman_scheduler.schedules import Schedule

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


def longest_task_id(name: str) -> int:
    """The length of the longest task id a schedule called `name` can give a task (a manual run on
    a cluster whose name is hashed): it must fit in MAX_TASK_ID."""
    return len(f"{SLOT_ID_PREFIX}{encode_token(name)}-") + _LONGEST_STAMP + _HASHED_CLUSTER


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
