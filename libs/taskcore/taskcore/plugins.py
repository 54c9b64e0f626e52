"""The plugin API: everything a pack author writes against, in one place.

Taskerman has three kinds of plugins. Each is a class in your own distribution, registered under
an entry point group in its `pyproject.toml`; the services find them with
`importlib.metadata.entry_points`, so installing the distribution is all it takes.

Actions (group `taskerman.actions`, loaded by the runner and validated by the scheduler's submit
API). Subclass `Action`; set `name` (`<pack>:<verb>`), `version`, and `Args` (a msgspec Struct the
task's args must validate against; `NoArgs` by default) and, when the node operator's
`[packs.<pack>]` table configures the pack, `Config`. Implement `pre_check`, `execute_action` and
`post_check`: each receives an `ActionContext`; a step fails by raising (`ActionFailed` says what
was wrong), returning means it passed. Call `ctx.checkpoint()` before every side effect and watch
`ctx.cancelled` in long steps. Raise `InvalidTask` from `check_args` when an argument asks for
something the node's config does not allow::

    [project.entry-points."taskerman.actions"]
    "mypack:restart" = "mypack.actions:Restart"

Discovery (group `taskerman.discovery`, loaded by the router; a task picks one by name). Register a
`DiscoveryFactory`, usually the class itself: it is called with a `DiscoveryContext` (the
inventory file, a ZooKeeper session) and returns a `Discovery`, whose `nodes(cluster)` returns the
cluster's `NodeInfo`s, never an empty list. Raise `DiscoveryError` when the cluster cannot be
resolved for good (the task is dead-lettered with that reason); any other exception counts as
transient and the task is redelivered::

    [project.entry-points."taskerman.discovery"]
    consul = "mypack.discovery:ConsulDiscovery"

Routing (group `taskerman.routing`, loaded by the router; a task picks one by name). Register a
class built without arguments that is a `Routing`: `order(task, nodes)` returns the nodes in the
order the task visits them, and may leave some out. It must be pure (the same input gives the same
output) and may only return nodes it was given, each at most once::

    [project.entry-points."taskerman.routing"]
    racks_apart = "mypack.routing:RacksApart"

The built-in implementations (the `taskcore.packs` actions; static, registry, dns and aws_tags
discovery and the name, zone and seeds_last routings in `taskerman_router`) are examples of each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from taskcore.coord.session import ZkSession
from taskcore.core.actions import ENTRY_POINT_GROUP as ACTION_GROUP
from taskcore.core.actions import Action, ActionContext, AnyConfig, NoArgs
from taskcore.core.errors import ActionFailed, DiscoveryError, InvalidTask
from taskcore.core.model import NodeInfo, Task

__all__ = [
    "ACTION_GROUP",
    "DISCOVERY_GROUP",
    "ROUTING_GROUP",
    "Action",
    "ActionContext",
    "ActionFailed",
    "AnyConfig",
    "Discovery",
    "DiscoveryContext",
    "DiscoveryError",
    "DiscoveryFactory",
    "InvalidTask",
    "NoArgs",
    "NodeInfo",
    "Routing",
]

DISCOVERY_GROUP = "taskerman.discovery"
ROUTING_GROUP = "taskerman.routing"


@dataclass(frozen=True)
class DiscoveryContext:
    """What a discovery plugin may use to build itself."""

    inventory: Path | None
    zk: ZkSession | None


class Discovery(Protocol):
    """Resolves the nodes of a cluster; raises DiscoveryError, never returns an empty list."""

    async def nodes(self, cluster: str) -> list[NodeInfo]: ...


class DiscoveryFactory(Protocol):
    """What the `taskerman.discovery` entry point names: builds a Discovery from the context."""

    def __call__(self, ctx: DiscoveryContext) -> Discovery: ...


class Routing(Protocol):
    """Orders (and may filter) a task's nodes. Pure: the same input gives the same output. It may
    only return nodes it was given, each at most once."""

    def order(self, task: Task, nodes: list[NodeInfo]) -> list[NodeInfo]: ...
