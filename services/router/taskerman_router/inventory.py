"""The router's inventory file (TOML): clusters, their nodes with attributes, and where the other
discovery plugins look. Parsing is pure; only the cluster asked for is validated, so a mistake in
one cluster's entry never stops the others from routing.

```toml
[dns]                                   # optional: resolver for SRV look-ups (default: the system's)
nameservers = ["10.0.0.2"]
port = 53
timeout = 5.0

[clusters."demo:web"]
nodes = ["node-1", "node-2"]            # names only

[clusters."cassandra:geo"]
attributes = { dc = "eu" }              # every node of the cluster has these (a node's own win)
[[clusters."cassandra:geo".node]]
name = "cass-1"
zone = "eu-1a"
rack = "r1"
seed = true                             # any other key is an attribute; values become strings

[clusters."kafka:prod"]
dns = "kafka.prod.example"              # discovery "dns": A/AAAA records of this name
[clusters."redis:cache"]
srv = "_redis._tcp.cache.example"       # discovery "dns": SRV records of this name
[clusters."es:logs"]
aws_tags = { "taskerman:cluster" = "es:logs" }   # discovery "aws_tags"
aws_region = "eu-west-1"
aws_name_tag = "Name"                   # node names from this tag (default: private DNS name)
```
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import msgspec

from taskcore.core.errors import DiscoveryError
from taskcore.core.model import NodeInfo

CLUSTER_KEYS = {"nodes", "node", "attributes", "dns", "srv", "aws_tags", "aws_region", "aws_name_tag"}


class ClusterEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One cluster of the inventory."""

    nodes: tuple[NodeInfo, ...] = ()
    dns: str = ""
    srv: str = ""
    aws_tags: dict[str, str] = {}
    aws_region: str = ""
    aws_name_tag: str = ""


class DnsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Resolver settings for SRV look-ups; no nameservers means the system's resolver."""

    nameservers: tuple[str, ...] = ()
    port: int = 53
    timeout: float = 5.0


def read(path: Path) -> dict[str, Any]:
    """The inventory file as TOML data; DiscoveryError naming the file otherwise."""
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise DiscoveryError(f"inventory {path}: {e}") from e


def _attr_value(value: object, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise DiscoveryError(f"{where}: an attribute must be a string, number or boolean, got {value!r}")


def _attributes(raw: object, where: str) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise DiscoveryError(f"{where}: expected a table of attributes, got {raw!r}")
    return {str(k): _attr_value(v, f"{where}.{k}") for k, v in raw.items()}


def _node(raw: object, defaults: dict[str, str], where: str) -> NodeInfo:
    """A node given as a name, or as a table with `name` and attributes."""
    if isinstance(raw, str):
        name, attrs = raw, {}
    elif isinstance(raw, dict):
        fields = dict(raw)
        name = fields.pop("name", None)
        if not isinstance(name, str):
            raise DiscoveryError(f'{where}: a node table needs `name = "..."`, got {raw!r}')
        attrs = _attributes(fields, f"{where} ({name})")
    else:
        raise DiscoveryError(f"{where}: a node is a name or a table with `name`, got {raw!r}")
    if not name.strip() or len(name) > 512:
        raise DiscoveryError(f"{where}: invalid node name {name!r}")
    return NodeInfo(name=name, attributes={**defaults, **attrs})


def _text(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry.get(key, "")
    if not isinstance(value, str):
        raise DiscoveryError(f"{where}.{key}: expected a string, got {value!r}")
    return value


def cluster_entry(data: dict[str, Any], cluster: str, source: str) -> ClusterEntry | None:
    """The inventory's entry of `cluster` (None when it has none), validated; DiscoveryError
    naming the file, the cluster and the key otherwise."""
    clusters = data.get("clusters", {})
    if not isinstance(clusters, dict):
        raise DiscoveryError(f"inventory {source}: `clusters` must be a table")
    entry = clusters.get(cluster)
    if entry is None:
        return None
    where = f"inventory {source}: clusters.{cluster!r}"
    if not isinstance(entry, dict):
        raise DiscoveryError(f"{where}: expected a table, got {entry!r}")
    unknown = sorted(set(entry) - CLUSTER_KEYS)
    if unknown:
        raise DiscoveryError(f"{where}: unknown key(s) {unknown} (known: {sorted(CLUSTER_KEYS)})")
    defaults = _attributes(entry.get("attributes", {}), f"{where}.attributes")
    raw_nodes: list[tuple[str, object]] = []
    for key in ("nodes", "node"):
        listed = entry.get(key, [])
        if not isinstance(listed, list):
            raise DiscoveryError(f"{where}.{key}: expected a list, got {listed!r}")
        raw_nodes += [(f"{where}.{key}[{i}]", raw) for i, raw in enumerate(listed)]
    nodes: list[NodeInfo] = []
    seen: set[str] = set()
    for at, raw in raw_nodes:
        node = _node(raw, defaults, at)
        if node.name in seen:
            raise DiscoveryError(f"{at}: node {node.name!r} is listed twice")
        seen.add(node.name)
        nodes.append(node)
    tags = entry.get("aws_tags", {})
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise DiscoveryError(f"{where}.aws_tags: expected a table of strings, got {tags!r}")
    return ClusterEntry(
        nodes=tuple(nodes),
        dns=_text(entry, "dns", where),
        srv=_text(entry, "srv", where),
        aws_tags={str(k): v for k, v in tags.items()},
        aws_region=_text(entry, "aws_region", where),
        aws_name_tag=_text(entry, "aws_name_tag", where),
    )


def dns_config(data: dict[str, Any], source: str) -> DnsConfig:
    """The `[dns]` table; DiscoveryError naming what is wrong."""
    try:
        return msgspec.convert(data.get("dns", {}), DnsConfig)
    except msgspec.ValidationError as e:
        raise DiscoveryError(f"inventory {source}: [dns]: {e}") from e
