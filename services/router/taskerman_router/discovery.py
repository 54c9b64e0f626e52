"""Discovery plugins: resolve a cluster's member nodes. Found by the `taskerman.discovery` entry point."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol

from taskcore import registry
from taskcore.coordination import ZkSession
from taskcore.errors import DiscoveryError

ENTRY_POINT_GROUP = "taskerman.discovery"


@dataclass(frozen=True)
class DiscoveryContext:
    """What a discovery plugin may use to build itself."""

    inventory: Path | None
    zk: ZkSession | None


class Discovery(Protocol):
    """Resolves the nodes of a cluster; raises DiscoveryError, never returns an empty list."""

    async def nodes(self, cluster: str) -> list[str]: ...


class DiscoveryFactory(Protocol):
    def __call__(self, ctx: DiscoveryContext) -> Discovery: ...


class StaticDiscovery:
    """Nodes listed in a TOML inventory: `[clusters."demo:web"] nodes = ["node-1", …]`.
    The file is read on every call, so an edit takes effect without a restart."""

    def __init__(self, ctx: DiscoveryContext) -> None:
        self.path = ctx.inventory

    async def nodes(self, cluster: str) -> list[str]:
        if self.path is None:
            raise DiscoveryError("static discovery needs an inventory file (taskerman-router --inventory)")
        try:
            data = tomllib.loads(self.path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise DiscoveryError(f"inventory {self.path}: {e}") from e
        entry = data.get("clusters", {}).get(cluster)
        if entry is None:
            raise DiscoveryError(f"unknown cluster {cluster!r} in inventory {self.path}")
        nodes = entry.get("nodes", []) if isinstance(entry, dict) else []
        if not nodes or not all(isinstance(n, str) and n for n in nodes):
            raise DiscoveryError(f"cluster {cluster!r} in {self.path} has no valid `nodes` list")
        return list(nodes)


class RegistryDiscovery:
    """Runners that registered themselves (ephemeral znodes under /registry/<cluster>) and whose
    heartbeat is fresh."""

    def __init__(self, ctx: DiscoveryContext) -> None:
        self.zk = ctx.zk

    async def nodes(self, cluster: str) -> list[str]:
        if self.zk is None:
            raise DiscoveryError("registry discovery needs ZooKeeper")
        nodes = await registry.live_nodes(self.zk, cluster)
        if not nodes:
            raise DiscoveryError(f"no live runner is registered for cluster {cluster!r}")
        return nodes


def load_plugins(ctx: DiscoveryContext) -> dict[str, Discovery]:
    """Every installed discovery plugin, built for this context."""
    plugins: dict[str, Discovery] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        factory: DiscoveryFactory = ep.load()
        plugins[ep.name] = factory(ctx)
    return plugins
