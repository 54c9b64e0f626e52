"""compose/ checked statically: the NATS cluster (a full mesh, fsync, configs nats-server accepts)
and the ZooKeeper ensemble."""

from __future__ import annotations

import subprocess

from taskerman_dev.launchers import nats_server_binary
from tests.compose.deployment import (
    NATS_CLIENT_PORT,
    ZK_CLIENT_PORT,
    bind_source,
    by_image,
    environment,
    nats_conf,
)


def test_nats_cluster_is_a_full_mesh_with_fsync() -> None:
    nodes = by_image("nats")
    names = set()
    for name, service in nodes.items():
        assert service["command"][-2:] == ["--config", "/etc/nats/nats.conf"] or "-c" in service["command"]
        conf = nats_conf(bind_source(name, service["command"][-1]))
        assert conf["sync_always"], name
        assert conf["listen"].endswith(f":{NATS_CLIENT_PORT}"), name
        cluster_port = conf["cluster_listen"].rpartition(":")[2]
        routes = {host for host, port in conf["routes"] if port == cluster_port}
        assert len(routes) == len(conf["routes"]), f"{name}: a route to another port than {cluster_port}"
        assert routes | {name} == set(nodes), f"{name} routes to {sorted(routes)}"
        names.add(conf["server_name"])
    assert len(names) == len(nodes)


def test_nats_configs_pass_nats_server_check() -> None:
    for name, service in by_image("nats").items():
        path = bind_source(name, service["command"][-1])
        out = subprocess.run(
            [nats_server_binary(), "-t", "-c", str(path)], capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, out.stderr


def test_zookeeper_ensemble() -> None:
    nodes = by_image("zookeeper")
    ids = {}
    for name, service in nodes.items():
        env = environment(service)
        ids[name] = int(env["ZOO_MY_ID"])
        servers = dict(s.split("=", 1) for s in env["ZOO_SERVERS"].split())
        assert set(servers) == {f"server.{i}" for i in range(1, len(nodes) + 1)}, name
        for key, address in servers.items():
            host = address.partition(":")[0]
            assert host in nodes, f"{name}: {key} names unknown host {host}"
            assert int(environment(nodes[host])["ZOO_MY_ID"]) == int(key.partition(".")[2]), (name, key)
            assert address.endswith(f";{ZK_CLIENT_PORT}"), (name, key)
        assert "srvr" in env["ZOO_4LW_COMMANDS_WHITELIST"].split(","), name
        assert env["ZOO_ADMINSERVER_ENABLED"] == "false", name
    assert sorted(ids.values()) == list(range(1, len(nodes) + 1))
