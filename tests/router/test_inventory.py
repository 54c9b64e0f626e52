"""The inventory file: node lists, node tables with attributes, other plugins' keys, clear errors."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from taskcore.core.errors import DiscoveryError
from taskcore.core.model import NodeInfo
from taskerman_router.inventory import ClusterEntry, DnsConfig, cluster_entry, dns_config

INVENTORY = """
[dns]
nameservers = ["127.0.0.1"]
port = 5353

[clusters."demo:web"]
nodes = ["node-1", "node-2"]

[clusters."cassandra:geo counter"]
attributes = { dc = "eu" }
[[clusters."cassandra:geo counter".node]]
name = "cass-1"
zone = "eu-1a"
rack = "r1"
[[clusters."cassandra:geo counter".node]]
name = "cass-2"
zone = "eu-1b"
seed = true
weight = 3
dc = "eu-west"

[clusters."mixed"]
nodes = ["a", { name = "b", zone = "z1" }]
[[clusters."mixed".node]]
name = "c"
zone = "z2"

[clusters."kafka:prod"]
dns = "kafka.prod.example"

[clusters."es:logs"]
aws_tags = { "team" = "search" }
aws_region = "eu-west-1"
aws_name_tag = "Name"
"""


def _entry(cluster: str, text: str = INVENTORY) -> ClusterEntry | None:
    return cluster_entry(tomllib.loads(text), cluster, "inv.toml")


def test_plain_node_list_keeps_working() -> None:
    entry = _entry("demo:web")
    assert entry is not None
    assert entry.nodes == (NodeInfo(name="node-1"), NodeInfo(name="node-2"))


def test_node_tables_carry_attributes_as_strings() -> None:
    entry = _entry("cassandra:geo counter")
    assert entry is not None
    assert entry.nodes == (
        NodeInfo(name="cass-1", attributes={"dc": "eu", "zone": "eu-1a", "rack": "r1"}),
        NodeInfo(name="cass-2", attributes={"dc": "eu-west", "zone": "eu-1b", "seed": "true", "weight": "3"}),
    )


def test_names_and_tables_mix_in_listed_order() -> None:
    entry = _entry("mixed")
    assert entry is not None
    assert entry.nodes == (
        NodeInfo(name="a"),
        NodeInfo(name="b", attributes={"zone": "z1"}),
        NodeInfo(name="c", attributes={"zone": "z2"}),
    )


def test_other_plugins_keys() -> None:
    kafka, es = _entry("kafka:prod"), _entry("es:logs")
    assert kafka == ClusterEntry(dns="kafka.prod.example")
    assert es == ClusterEntry(aws_tags={"team": "search"}, aws_region="eu-west-1", aws_name_tag="Name")
    data = tomllib.loads(INVENTORY)
    assert dns_config(data, "inv.toml") == DnsConfig(nameservers=("127.0.0.1",), port=5353)
    assert dns_config({}, "inv.toml") == DnsConfig()


def test_unknown_cluster_is_none() -> None:
    assert _entry("nope") is None
    assert cluster_entry({}, "nope", "inv.toml") is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[clusters.c]\nnodes = ["a", "a"]', "listed twice"),
        ('[clusters.c]\nnodes = ["a"]\n[[clusters.c.node]]\nname = "a"', "listed twice"),
        ('[clusters.c]\nnodes = "a"', "expected a list"),
        ('[clusters.c]\nnodes = [""]', "invalid node name"),
        ("[clusters.c]\nnodes = [3]", "a node is a name or a table"),
        ('[[clusters.c.node]]\nzone = "z"', "needs `name"),
        ('[[clusters.c.node]]\nname = "a"\nzone = ["x"]', "must be a string, number or boolean"),
        ('[[clusters.c.node]]\nname = "a"\n[clusters.c.node.more]\nx = 1', "must be a string"),
        ('[clusters.c]\nnode = ["a"]\nnodez = []', "unknown key(s) ['nodez']"),
        ("[clusters.c]\ndns = 5", "clusters.'c'.dns: expected a string"),
        ("[clusters.c]\naws_tags = { k = 1 }", "aws_tags: expected a table of strings"),
        ('clusters = "x"', "`clusters` must be a table"),
    ],
)
def test_mistakes_name_the_file_cluster_and_problem(text: str, needle: str) -> None:
    with pytest.raises(DiscoveryError) as e:
        _entry("c", text)
    assert "inv.toml" in str(e.value)
    assert needle in str(e.value)


def test_a_broken_cluster_does_not_stop_the_others() -> None:
    text = '[clusters.bad]\nnodes = "oops"\n[clusters.good]\nnodes = ["g"]'
    assert _entry("good", text) == ClusterEntry(nodes=(NodeInfo(name="g"),))


def test_bad_dns_table() -> None:
    data: dict[str, Any] = {"dns": {"nameserver": ["1.2.3.4"]}}
    with pytest.raises(DiscoveryError, match=r"inv.toml: \[dns\]"):
        dns_config(data, "inv.toml")
