"""Runner configuration: which node(s) this process serves and what only the node's operator decides:
which packs may run here, per-pack settings (service names, paths, ports, processes) and per-action
overrides (leases, step timeout). A task can only pick among the names these settings define."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec

from taskcore.core.actions import ActionRegistry, node_config
from taskcore.core.errors import InvalidTask, TaskermanError
from taskerman_runner.health import HealthCheck

GRACE_ENV = "TASKERMAN_SHUTDOWN_GRACE"
DEFAULT_GRACE = 30.0
MAX_AWAY_GRACE = 7 * 86400.0  # a week: an away note older than that is a runner that is gone


class ActionOverride(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Overrides of what an action declares about its leases and its step timeout."""

    exclusion_groups: tuple[str, ...] | None = None
    global_limit: int | None = None
    timeout: Annotated[float, msgspec.Meta(gt=0)] | None = None


class NodeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A node config file: `cluster`, `node`, `enabled_packs`, `away_grace`, `[packs.<pack>]` and
    `[actions."<pack>:<name>"]` tables, `[health]`. Without `enabled_packs` every installed pack may run.
    `away_grace` (seconds, 0: none): after a clean exit, the router still queues items for this
    node that long (a cron-mode runner, a node that reboots itself); without it, a node with no
    runner registered is recorded `unserved` and gets no item."""

    cluster: str
    node: str = ""
    away_grace: Annotated[float, msgspec.Meta(ge=0, le=MAX_AWAY_GRACE)] = 0.0
    enabled_packs: list[str] | None = None
    packs: dict[str, dict[str, Any]] = {}
    actions: dict[str, ActionOverride] = {}
    health: HealthCheck | None = None  # a down node takes a budget slot (health.py)


def load(path: Path) -> NodeConfig:
    """Read and validate a node config file; errors name the file and the field."""
    try:
        data = tomllib.loads(path.read_text())
        return msgspec.convert(data, NodeConfig)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as e:
        raise TaskermanError(f"runner config {path}: {e}") from e


def check(conf: NodeConfig, registry: ActionRegistry) -> list[str]:
    """What is wrong with a node config given the installed actions (empty: nothing): an unknown
    pack in `enabled_packs`, or a `[packs.<pack>]` table that one of the pack's enabled actions
    cannot use. The runner refuses to start on either, so an operator's typo shows at once rather
    than as dead letters later."""
    problems = []
    installed = registry.packs()
    for pack in conf.enabled_packs or ():
        if pack not in installed:
            problems.append(f"enabled_packs: no installed action belongs to pack {pack!r}")
    for pack, table in conf.packs.items():
        for name, cls in registry.by_pack(pack):
            try:
                node_config(cls, name, table)
            except InvalidTask as e:
                problems.append(f"[packs.{pack}]: {e.problem}")
                break
    return problems


def unknown_overrides(conf: NodeConfig, registry: ActionRegistry) -> list[str]:
    """`[actions."<name>"]` tables of actions that are not enabled here (harmless, maybe a typo)."""
    known = set(registry.names())
    return [name for name in conf.actions if name not in known]


def shutdown_grace(env: Mapping[str, str] | None = None) -> float:
    """Seconds a running action may take to finish after SIGTERM (`TASKERMAN_SHUTDOWN_GRACE`)."""
    env = os.environ if env is None else env
    raw = env.get(GRACE_ENV, "")
    if not raw.strip():
        return DEFAULT_GRACE
    try:
        grace = float(raw)
    except ValueError:
        grace = -1.0
    if not 0 <= grace < float("inf"):
        raise TaskermanError(f"{GRACE_ENV}={raw!r}: expected a number of seconds >= 0")
    return grace
