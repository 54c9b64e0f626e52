"""Runner configuration: which node(s) this process serves and what only the node's operator decides:
per-pack settings (service names, paths, ports) and per-action lease overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import msgspec

from taskcore.errors import TaskermanError


class ActionOverride(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Overrides of what an action declares about its leases."""

    exclusion_groups: tuple[str, ...] | None = None
    global_limit: int | None = None


class NodeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A node config file: `cluster`, `node`, `[packs.<pack>]` and `[actions."<pack>:<name>"]` tables."""

    cluster: str
    node: str = ""
    packs: dict[str, dict[str, Any]] = {}
    actions: dict[str, ActionOverride] = {}


def load(path: Path) -> NodeConfig:
    """Read and validate a node config file; errors name the file and the field."""
    try:
        data = tomllib.loads(path.read_text())
        return msgspec.convert(data, NodeConfig)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as e:
        raise TaskermanError(f"runner config {path}: {e}") from e
