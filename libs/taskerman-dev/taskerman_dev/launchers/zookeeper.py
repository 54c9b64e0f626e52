"""ZooKeeper from Debian's `zookeeper` package, run as a plain java process: standalone, or an
ensemble on one host."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path

from taskcore.core.errors import ServerNotReady
from taskerman_dev.launchers.group import ServerGroup, group_ports
from taskerman_dev.launchers.ports import connect_host
from taskerman_dev.launchers.process import ServerProcess

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


class ZooKeeperServer(ServerProcess):
    """A standalone ZooKeeper from Debian's `zookeeper` package, run as a plain java process."""

    name = "zookeeper"

    def __init__(self, home: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        super().__init__(home, port, host)
        self.config_path = self.home / "zoo.cfg"

    @property
    def hosts(self) -> str:
        """Client connection string, host:port."""
        return f"{connect_host(self.host)}:{self.port}"

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
            with socket.create_connection((connect_host(self.host), self.port), timeout=1) as sock:
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


class ZooKeeperEnsemble(ServerGroup[ZooKeeperEnsembleMember]):
    """`size` ZooKeeper servers in one ensemble on one host, each under `home/zk-<i>` with distinct
    client, quorum and election ports; ready when one running member reports `Mode: leader` and the
    others `follower`. `ports` fixes the client ports (e.g. 2181-2183)."""

    what = "zookeeper servers"

    def __init__(
        self, home: Path, size: int = 3, host: str = "127.0.0.1", ports: Sequence[int] | None = None
    ) -> None:
        connect = connect_host(host)
        clients, extra = group_ports(2 * size, connect, ports, size)
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
