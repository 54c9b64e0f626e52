"""Runner configuration: which node(s) this process serves and the node operator's pack settings."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import msgspec

from taskcore.errors import TaskermanError


class NodeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One node's config file: `cluster`, `node`, and `[packs.<pack>]` tables."""

    cluster: str
    node: str
    packs: dict[str, dict[str, Any]] = {}


def load(path: Path) -> NodeConfig:
    """Read and validate a node config file; errors name the file and the field."""
    try:
        data = tomllib.loads(path.read_text())
        return msgspec.convert(data, NodeConfig)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as e:
        raise TaskermanError(f"runner config {path}: {e}") from e
