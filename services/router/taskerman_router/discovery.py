"""The built-in discovery plugins (static, registry, dns, aws_tags), and loading every installed one.
Each resolves a cluster's nodes, with their attributes; the protocol they implement (Discovery,
DiscoveryFactory, DiscoveryContext) is in taskcore.plugins, with the `taskerman.discovery` group.

A plugin raises DiscoveryError when the cluster cannot be resolved for good (the task is
dead-lettered with that reason) and never returns an empty list. Any other exception is taken
as transient (a resolver or ZooKeeper that did not answer): the task is redelivered."""

from __future__ import annotations

import asyncio
import importlib
import logging
import socket
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import msgspec
from aiozk import exc

from taskcore.coord import runners
from taskcore.coord.runners import RunnerInfo
from taskcore.coord.session import ZkSession
from taskcore.core.errors import DiscoveryError
from taskcore.core.model import NodeInfo
from taskcore.core.subjects import encode_token
from taskcore.plugins import DISCOVERY_GROUP, Discovery, DiscoveryContext, DiscoveryFactory
from taskerman_router import inventory
from taskerman_router.inventory import ClusterEntry, DnsConfig

AWS_CLUSTER_TAG = "taskerman:cluster"
log = logging.getLogger(__name__)


def _entry(path: Path | None, cluster: str) -> tuple[ClusterEntry | None, DnsConfig]:
    """The cluster's inventory entry (None without an inventory or an entry) and the [dns] table.
    The file is read on every call, so an edit takes effect without a restart."""
    if path is None:
        return None, DnsConfig()
    data = inventory.read(path)
    return inventory.cluster_entry(data, cluster, str(path)), inventory.dns_config(data, str(path))


class StaticDiscovery:
    """Nodes listed in the inventory, with their attributes (see `inventory`)."""

    def __init__(self, ctx: DiscoveryContext) -> None:
        self.path = ctx.inventory

    async def nodes(self, cluster: str) -> list[NodeInfo]:
        if self.path is None:
            raise DiscoveryError("static discovery needs an inventory file (taskerman-router --inventory)")
        entry, _ = _entry(self.path, cluster)
        if entry is None:
            raise DiscoveryError(f"unknown cluster {cluster!r} in inventory {self.path}")
        if not entry.nodes:
            other = next((k for k in ("dns", "srv", "aws_tags") if getattr(entry, k)), None)
            hint = f" (it has `{other}`: use that discovery plugin)" if other else ""
            raise DiscoveryError(f"cluster {cluster!r} in {self.path} lists no nodes{hint}")
        return list(entry.nodes)


class RegisteredRunner(RunnerInfo, frozen=True, kw_only=True):
    """A runner's registration, with the attributes it may announce about its node."""

    attributes: dict[str, str] = {}  # noqa: RUF012 - a msgspec field: each instance gets its own


class RegistryDiscovery:
    """Runners that registered themselves (ephemeral znodes under /registry/<cluster>) and whose
    heartbeat is fresh; a node's attributes are those its runner registered, if any."""

    def __init__(self, ctx: DiscoveryContext) -> None:
        self.zk = ctx.zk

    async def nodes(self, cluster: str) -> list[NodeInfo]:
        if self.zk is None:
            raise DiscoveryError("registry discovery needs ZooKeeper")
        now, out, stale = time.time(), [], 0
        for r in await self._registered(self.zk, cluster):
            if r.stale(now):
                stale += 1
            else:
                out.append(NodeInfo(name=r.node, attributes=r.attributes))
        if not out:
            detail = f" ({stale} stale: no heartbeat for {runners.STALE_AFTER:.0f}s)" if stale else ""
            raise DiscoveryError(f"no live runner is registered for cluster {cluster!r}{detail}")
        return out

    @staticmethod
    async def _registered(zk: ZkSession, cluster: str) -> list[RegisteredRunner]:
        folder = f"/registry/{encode_token(cluster)}"  # see runners.node_path
        try:
            children = await zk.client.get_children(folder)
        except exc.NoNode:
            return []
        out: list[RegisteredRunner] = []
        for child in sorted(children):
            try:
                data = await zk.client.get_data(f"{folder}/{child}")
                out.append(msgspec.json.decode(data, type=RegisteredRunner))
            except exc.NoNode:
                continue  # unregistered meanwhile
            except msgspec.DecodeError as e:
                log.warning("registry entry left out cluster=%s znode=%s error=%s", cluster, child, e)
        return out


class DnsDiscovery:
    """A cluster's nodes from DNS: the SRV records of the inventory's `srv` name (or of a cluster
    named like `_svc._tcp.example`), else the A/AAAA records of its `dns` name (or of the cluster
    name itself) through the system resolver. SRV needs `dnspython`; the `[dns]` table of the
    inventory may name the servers to ask."""

    def __init__(self, ctx: DiscoveryContext) -> None:
        self.path = ctx.inventory

    async def nodes(self, cluster: str) -> list[NodeInfo]:
        entry, config = _entry(self.path, cluster)
        entry = entry or ClusterEntry()
        if entry.srv or (not entry.dns and cluster.startswith("_")):
            return await srv_nodes(entry.srv or cluster, config)
        return await address_nodes(entry.dns or cluster, config)


async def address_nodes(name: str, config: DnsConfig) -> list[NodeInfo]:
    """One node per address of `name` (A and AAAA, via getaddrinfo), named by the address."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(config.timeout):
            infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno == socket.EAI_AGAIN:
            raise  # the resolver did not answer: transient, the task is redelivered
        raise DiscoveryError(f"dns: {name!r} does not resolve ({e.strerror})") from e
    nodes: dict[str, NodeInfo] = {}
    for family, _, _, _, sockaddr in infos:
        address = str(sockaddr[0])
        kind = "ipv6" if family == socket.AF_INET6 else "ipv4"
        attrs = {"address": address, "family": kind, "dns_name": name}
        nodes.setdefault(address, NodeInfo(name=address, attributes=attrs))
    if not nodes:
        raise DiscoveryError(f"dns: {name!r} has no A or AAAA record")
    return list(nodes.values())


async def srv_nodes(name: str, config: DnsConfig) -> list[NodeInfo]:
    """One node per SRV target of `name` (by priority, then weight), named by the target host."""
    import dns.asyncresolver  # noqa: PLC0415 - only SRV look-ups need dnspython
    import dns.exception  # noqa: PLC0415
    import dns.rdtypes.IN.SRV  # noqa: PLC0415
    import dns.resolver  # noqa: PLC0415

    resolver = dns.asyncresolver.Resolver(configure=not config.nameservers)
    if config.nameservers:
        resolver.nameservers = list(config.nameservers)
        resolver.port = config.port
    try:
        answer = await resolver.resolve(name, "SRV", lifetime=config.timeout)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.YXDOMAIN) as e:
        raise DiscoveryError(f"dns: no SRV record for {name!r} ({e})") from e
    records = sorted(
        (r for r in answer if isinstance(r, dns.rdtypes.IN.SRV.SRV)),
        key=lambda r: (r.priority, -r.weight, r.target.to_text(), r.port),
    )
    nodes: dict[str, NodeInfo] = {}
    for r in records:
        target = r.target.to_text(omit_final_dot=True)
        if not target or target == ".":  # "." means: the service is not available here
            continue
        attrs = {"port": str(r.port), "priority": str(r.priority), "weight": str(r.weight), "dns_name": name}
        nodes.setdefault(target, NodeInfo(name=target, attributes=attrs))
    if not nodes:
        raise DiscoveryError(f"dns: the SRV records of {name!r} name no host")
    return list(nodes.values())


class AwsTagsDiscovery:
    """Running EC2 instances carrying the cluster's tags: the inventory's `aws_tags`, or
    `taskerman:cluster = <cluster>`. Needs boto3, the optional extra `taskerman[aws]`, imported
    only here; credentials and region come from boto3's usual sources (or `aws_region`)."""

    def __init__(self, ctx: DiscoveryContext) -> None:
        self.path = ctx.inventory

    async def nodes(self, cluster: str) -> list[NodeInfo]:
        try:
            boto3 = importlib.import_module("boto3")
            botocore = importlib.import_module("botocore.exceptions")
        except ImportError as e:
            raise DiscoveryError(
                "aws_tags discovery needs boto3: install the extra, pip install 'taskerman[aws]'"
            ) from e
        entry, _ = _entry(self.path, cluster)
        entry = entry or ClusterEntry()
        tags = entry.aws_tags or {AWS_CLUSTER_TAG: cluster}
        permanent = (botocore.NoCredentialsError, botocore.NoRegionError, botocore.ClientError)
        try:
            instances = await asyncio.to_thread(_describe, boto3, tags, entry.aws_region or None)
        except permanent as e:
            raise DiscoveryError(f"aws_tags: {e}") from e
        nodes: dict[str, NodeInfo] = {}
        for inst in instances:
            node = instance_node(inst, entry.aws_name_tag)
            nodes.setdefault(node.name, node)
        if not nodes:
            shown = ", ".join(f"{k}={v}" for k, v in tags.items())
            raise DiscoveryError(f"aws_tags: no running EC2 instance is tagged {shown}")
        return list(nodes.values())


def _describe(boto3: Any, tags: dict[str, str], region: str | None) -> list[dict[str, Any]]:
    """Every running instance with all of `tags` (blocking; run in a thread)."""
    client = boto3.client("ec2", region_name=region)
    filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
    filters.append({"Name": "instance-state-name", "Values": ["running"]})
    found: list[dict[str, Any]] = []
    for page in client.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page.get("Reservations", []):
            found += reservation.get("Instances", [])
    return found


def instance_node(inst: dict[str, Any], name_tag: str = "") -> NodeInfo:
    """A node from an EC2 instance description: named by `name_tag`'s value, else its private
    DNS name, else its id; its zone is the availability zone."""
    tags = {t.get("Key", ""): t.get("Value", "") for t in inst.get("Tags", [])}
    name = (tags.get(name_tag) if name_tag else "") or inst.get("PrivateDnsName") or inst["InstanceId"]
    attrs = {
        "zone": inst.get("Placement", {}).get("AvailabilityZone", ""),
        "instance_id": inst.get("InstanceId", ""),
        "instance_type": inst.get("InstanceType", ""),
        "private_ip": inst.get("PrivateIpAddress", ""),
    }
    return NodeInfo(name=str(name), attributes={k: str(v) for k, v in attrs.items() if v})


def load_plugins(ctx: DiscoveryContext) -> dict[str, Discovery]:
    """Every installed discovery plugin, built for this context; one that fails to load is logged
    and left out (its tasks are then dead-lettered as naming an unknown plugin)."""
    plugins: dict[str, Discovery] = {}
    for ep in entry_points(group=DISCOVERY_GROUP):
        try:
            factory: DiscoveryFactory = ep.load()
            plugins[ep.name] = factory(ctx)
        except Exception as e:
            log.error("discovery plugin %s (%s) failed to load: %r", ep.name, ep.value, e)
    return plugins
