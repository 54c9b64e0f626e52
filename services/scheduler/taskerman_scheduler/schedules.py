"""Declarative schedules: the validated `Schedule` and the errors about schedules.

A schedule fires at the slots of its cron expression in its time zone (slots.py works them out and
names their tasks) and is written in a TOML schedule file (schedule_file.py parses it)."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal
from zoneinfo import ZoneInfo

import msgspec

from taskcore.core.errors import TaskermanError
from taskcore.core.model import Task

Overlap = Literal["skip", "allow", "queue"]
OVERLAPS: tuple[Overlap, ...] = ("skip", "allow", "queue")


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
    # a slot whose cluster is frozen or outside its maintenance windows is skipped for it
    respect_windows: bool = False
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
