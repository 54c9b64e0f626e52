"""Which clusters a run of a schedule goes to: its one cluster, its list, or every known cluster its
pattern matches. Known clusters are those of the static inventory (the router's TOML file, when the
scheduler is given it) and those with a runner registered in ZooKeeper: the union of both."""

from __future__ import annotations

import asyncio
import fnmatch
import tomllib
from collections.abc import Iterable
from pathlib import Path

from taskcore.coord import runners
from taskcore.coord.session import ZkSession
from taskcore.core.errors import TaskermanError
from taskerman_scheduler.schedules import Schedule


class TargetError(TaskermanError):
    """The clusters of a run cannot be told now (an unreadable inventory): try again later."""


class NoTargets(TargetError):
    """A pattern matches no known cluster: the run has nowhere to go (its slot is skipped)."""


def matching(pattern: str, known: Iterable[str]) -> list[str]:
    """The known cluster names that match an fnmatch pattern (case-sensitive), sorted."""
    return sorted({c for c in known if fnmatch.fnmatchcase(c, pattern)})


def inventory_clusters(path: Path) -> set[str]:
    """The cluster names of an inventory file: its `[clusters."<name>"]` tables."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise TargetError(f"inventory {path}: {e}") from e
    clusters = data.get("clusters", {})
    if not isinstance(clusters, dict):
        raise TargetError(f"inventory {path}: `clusters` is not a table")
    return set(clusters)


class KnownClusters:
    """Resolves the clusters of a run; the inventory is read on every call, so edits count at once."""

    def __init__(self, zk: ZkSession | None, inventory: Path | None = None) -> None:
        self.zk = zk
        self.inventory = inventory

    async def names(self) -> set[str]:
        """Every cluster known to discovery: in the inventory, or with a registered runner."""
        names: set[str] = set()
        if self.inventory is not None:
            names |= await asyncio.to_thread(inventory_clusters, self.inventory)
        if self.zk is not None:
            names |= {r.cluster for r in await runners.registered(self.zk)}
        return names

    async def resolve(self, schedule: Schedule) -> list[str]:
        """The clusters one run of `schedule` emits a task to; NoTargets when a pattern matches none."""
        if schedule.clusters:
            return list(schedule.clusters)
        if not schedule.cluster_pattern:
            return [schedule.task.cluster_name]
        found = matching(schedule.cluster_pattern, await self.names())
        if not found:
            sources = ["the inventory"] if self.inventory is not None else []
            sources += ["registered runners"] if self.zk is not None else []
            raise NoTargets(
                f"no known cluster matches {schedule.cluster_pattern!r} "
                f"(looked in {' and '.join(sources) or 'nothing'})"
            )
        return found
