"""Discovery plugins against real things: an inventory file, the system resolver (`localhost`), a
DNS server on the loopback serving SRV records, ZooKeeper's runner registry."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import msgspec
import pytest

from taskcore.coord.runners import RunnerInfo, node_path
from taskcore.coord.session import ZkSession
from taskcore.core.errors import DiscoveryError
from taskcore.core.model import NodeInfo
from taskcore.core.settings import Settings
from taskcore.plugins import DiscoveryContext
from taskerman_dev.launchers import ZooKeeperServer
from taskerman_router.discovery import (
    AwsTagsDiscovery,
    DnsDiscovery,
    RegistryDiscovery,
    StaticDiscovery,
    instance_node,
    load_plugins,
)

SRV_NAME = "_cql._tcp.cass.test."
SRV_RECORDS = [
    "20 10 9042 cass-3.cass.test.",
    "10 10 9042 cass-2.cass.test.",
    "10 60 9042 cass-1.cass.test.",
    "10 60 9142 cass-1.cass.test.",  # the same host on another port is one node
]


class ZoneServer(asyncio.DatagramProtocol):
    """A tiny authoritative DNS server on the loopback: SRV records of one name, NXDOMAIN else."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records
        self.transport: asyncio.DatagramTransport | None = None
        self.queries = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # not a subclass on 3.11

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        self.queries += 1
        query = dns.message.from_wire(data)
        reply = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text()
        if question.rdtype == dns.rdatatype.SRV and name in self.records:
            reply.answer.append(dns.rrset.from_text_list(name, 60, "IN", "SRV", self.records[name]))
        else:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(reply.to_wire(), addr)


@pytest.fixture
async def dns_port() -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: ZoneServer({SRV_NAME: SRV_RECORDS}), local_addr=("127.0.0.1", 0)
    )
    yield int(transport.get_extra_info("sockname")[1])
    transport.close()


def _ctx(inventory: Path | None = None, zk: ZkSession | None = None) -> DiscoveryContext:
    return DiscoveryContext(inventory=inventory, zk=zk)


def test_every_builtin_plugin_is_installed() -> None:
    plugins = load_plugins(_ctx())
    assert {"static", "registry", "dns", "aws_tags"} <= set(plugins)


async def test_static_reads_attributes_and_edits_without_restart(tmp_path: Path) -> None:
    inv = tmp_path / "inventory.toml"
    inv.write_text('[[clusters."db".node]]\nname = "db-1"\nzone = "z1"\n')
    static = StaticDiscovery(_ctx(inv))
    assert await static.nodes("db") == [NodeInfo(name="db-1", attributes={"zone": "z1"})]
    inv.write_text('[clusters."db"]\nnodes = ["db-1", "db-2"]\n')
    assert [n.name for n in await static.nodes("db")] == ["db-1", "db-2"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[clusters."db"]\nnodes = []', "lists no nodes"),
        ('[clusters."db"]\ndns = "db.example"', "lists no nodes (it has `dns`: use that discovery plugin)"),
        ('[clusters."other"]\nnodes = ["x"]', "unknown cluster 'db'"),
        ("[clusters.db\n", "inventory"),
    ],
)
async def test_static_errors(tmp_path: Path, text: str, needle: str) -> None:
    inv = tmp_path / "inventory.toml"
    inv.write_text(text)
    with pytest.raises(DiscoveryError, match=re.escape(needle)):
        await StaticDiscovery(_ctx(inv)).nodes("db")
    with pytest.raises(DiscoveryError, match="needs an inventory file"):
        await StaticDiscovery(_ctx()).nodes("db")


async def test_dns_resolves_localhost_by_cluster_name() -> None:
    nodes = await DnsDiscovery(_ctx()).nodes("localhost")
    assert "127.0.0.1" in [n.name for n in nodes]
    for n in nodes:
        assert n.attributes["address"] == n.name
        assert n.attributes["family"] in ("ipv4", "ipv6")
        assert n.attributes["dns_name"] == "localhost"


async def test_dns_name_from_the_inventory(tmp_path: Path) -> None:
    inv = tmp_path / "inventory.toml"
    inv.write_text('[clusters."web:local"]\ndns = "localhost"\n')
    nodes = await DnsDiscovery(_ctx(inv)).nodes("web:local")
    assert "127.0.0.1" in [n.name for n in nodes]


async def test_dns_srv_from_a_server_on_the_loopback(tmp_path: Path, dns_port: int) -> None:
    inv = tmp_path / "inventory.toml"
    inv.write_text(
        f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns_port}\ntimeout = 3.0\n'
        f'[clusters."cassandra:ring"]\nsrv = "{SRV_NAME}"\n'
    )
    nodes = await DnsDiscovery(_ctx(inv)).nodes("cassandra:ring")
    assert [n.name for n in nodes] == ["cass-1.cass.test", "cass-2.cass.test", "cass-3.cass.test"]
    assert nodes[0].attributes == {"port": "9042", "priority": "10", "weight": "60", "dns_name": SRV_NAME}
    # a cluster named like an SRV name is looked up as one
    by_name = await DnsDiscovery(_ctx(inv)).nodes(SRV_NAME.rstrip("."))
    assert [n.name for n in by_name] == [n.name for n in nodes]
    with pytest.raises(DiscoveryError, match=re.escape("no SRV record for '_cql._tcp.nowhere.test'")):
        await DnsDiscovery(_ctx(inv)).nodes("_cql._tcp.nowhere.test")


@pytest.mark.skipif(importlib.util.find_spec("boto3") is not None, reason="boto3 is installed")
async def test_aws_tags_without_boto3_says_to_install_the_extra() -> None:
    with pytest.raises(DiscoveryError) as e:
        await AwsTagsDiscovery(_ctx()).nodes("es:logs")
    assert "pip install 'taskerman[aws]'" in str(e.value)


def test_aws_instance_to_node() -> None:
    inst = {
        "InstanceId": "i-0abc",
        "InstanceType": "m5.large",
        "PrivateDnsName": "ip-10-0-0-1.ec2.internal",
        "PrivateIpAddress": "10.0.0.1",
        "Placement": {"AvailabilityZone": "eu-west-1a"},
        "Tags": [{"Key": "Name", "Value": "es-data-1"}],
    }
    node = instance_node(inst)
    assert node.name == "ip-10-0-0-1.ec2.internal"
    assert node.attributes == {
        "zone": "eu-west-1a",
        "instance_id": "i-0abc",
        "instance_type": "m5.large",
        "private_ip": "10.0.0.1",
    }
    assert instance_node(inst, name_tag="Name").name == "es-data-1"
    assert instance_node({"InstanceId": "i-1"}).name == "i-1"


@pytest.fixture
async def zk(zk_server: ZooKeeperServer, prefix: str) -> AsyncIterator[ZkSession]:
    settings = Settings(zk_hosts=zk_server.hosts, zk_chroot=f"/{prefix}")
    async with ZkSession.from_settings(settings) as session:
        yield session


async def _register(zk: ZkSession, cluster: str, node: str, age: float, **attributes: str) -> None:
    info = RunnerInfo(
        cluster=cluster, node=node, pid=1, version="0", actions=(), since=0.0, heartbeat=time.time() - age
    )
    raw = msgspec.to_builtins(info) | ({"attributes": attributes} if attributes else {})
    path = node_path(cluster, node)
    await zk.client.ensure_path(path.rsplit("/", 1)[0])
    await zk.client.create(path, data=msgspec.json.encode(raw))


async def test_registry_live_runners_with_their_attributes(zk: ZkSession) -> None:
    cluster = "kafka:prod eu"
    await _register(zk, cluster, "b-1", age=1, zone="eu-1a", rack="r1")
    await _register(zk, cluster, "a-1", age=2)
    await _register(zk, cluster, "stale-1", age=60, zone="eu-1b")
    await _register(zk, "other", "o-1", age=0)
    nodes = await RegistryDiscovery(_ctx(zk=zk)).nodes(cluster)
    assert nodes == [NodeInfo(name="a-1"), NodeInfo(name="b-1", attributes={"zone": "eu-1a", "rack": "r1"})]


async def test_registry_with_only_stale_runners_is_an_error(zk: ZkSession) -> None:
    await _register(zk, "c", "n1", age=60)
    with pytest.raises(DiscoveryError, match=r"no live runner is registered for cluster 'c' \(1 stale"):
        await RegistryDiscovery(_ctx(zk=zk)).nodes("c")
    with pytest.raises(DiscoveryError, match="no live runner"):
        await RegistryDiscovery(_ctx(zk=zk)).nodes("nobody")
    with pytest.raises(DiscoveryError, match="needs ZooKeeper"):
        await RegistryDiscovery(_ctx()).nodes("c")
