"""Where the stack's servers listen: the settings' NATS URLs and ZooKeeper hosts, and the members of
cluster mode on them."""

from __future__ import annotations

import urllib.parse

from taskcore.core.settings import Settings
from taskerman_dev import secrets
from taskerman_dev.devstack.record import CLUSTER_SIZE, StackError
from taskerman_dev.launchers import NatsCluster, ZooKeeperEnsemble


def nats_addresses(url: str) -> list[tuple[str, int]]:
    """Host and port of every NATS URL in the comma-separated list."""
    found = []
    for item in url.split(","):
        parts = urllib.parse.urlsplit(item.strip() if "://" in item else f"nats://{item.strip()}")
        found.append((parts.hostname or "127.0.0.1", parts.port or 4222))
    return found


def zk_addresses(hosts: str) -> list[tuple[str, int]]:
    """Host and port of every ZooKeeper host in the comma-separated list, ignoring any chroot."""
    found = []
    for item in hosts.partition("/")[0].split(","):
        host, _, port = item.strip().rpartition(":")
        if port.isdigit():
            found.append((host.strip("[]") or "127.0.0.1", int(port)))
        else:
            found.append((item.strip() or "127.0.0.1", 2181))
    return found


def nats_listen(url: str) -> tuple[str, int]:
    """Host and port to listen on, from the (first) NATS URL."""
    return nats_addresses(url)[0]


def zk_listen(hosts: str) -> tuple[str, int]:
    """Host and port to listen on, from the (first) ZooKeeper host, ignoring any chroot."""
    return zk_addresses(hosts)[0]


def member_ports(what: str, addresses: list[tuple[str, int]]) -> tuple[str, list[int]]:
    """The host and client ports of a cluster's members: the addresses when the setting names exactly
    CLUSTER_SIZE on one host (as `dev up --cluster-mode` prints them), else consecutive ports from the
    first (4222-4224 from the default)."""
    host, first = addresses[0]
    if len(addresses) == CLUSTER_SIZE:
        if {h for h, _ in addresses} != {host}:
            raise StackError(f"the {what} servers of --cluster-mode must share one host, not {addresses}")
        return host, [port for _, port in addresses]
    if first + CLUSTER_SIZE - 1 > 65535:
        raise StackError(f"no {CLUSTER_SIZE} {what} ports from {first} on")
    return host, [first + i for i in range(CLUSTER_SIZE)]


def server_groups(settings: Settings) -> tuple[NatsCluster, ZooKeeperEnsemble]:
    """The NATS cluster and ZooKeeper ensemble of cluster mode, on the ports the settings name (their
    route, monitoring, quorum and election ports are free ones); data kept under home across restarts."""
    nats_host, nats_ports = member_ports("NATS", nats_addresses(settings.nats_url))
    zk_host, zk_ports = member_ports("ZooKeeper", zk_addresses(settings.zk_hosts))
    home = settings.home
    return (
        NatsCluster(
            home / "nats-cluster",
            size=CLUSTER_SIZE,
            host=nats_host,
            ports=nats_ports,
            users=secrets.nats_users(home),
        ),
        ZooKeeperEnsemble(home / "zookeeper-ensemble", size=CLUSTER_SIZE, host=zk_host, ports=zk_ports),
    )
