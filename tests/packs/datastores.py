"""Support for the datastore pack tests: the ActionContext a runner would build, and real Redis and
PostgreSQL servers from Debian's packages (`scripts/install-datastores.sh`) on free ports."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from taskcore.core.actions import Action, ActionContext, ActionRegistry
from taskcore.core.model import Task
from taskcore.runtime import procs

FAKES = Path(__file__).parent / "fakes"
INSTALL_HINT = "run `bash scripts/install-datastores.sh` (make test does)"


def action_context(
    cls: type[Action],
    table: dict[str, Any],
    args: dict[str, Any] | None = None,
    *,
    node: str = "node-1",
    cluster: str = "packs:test",
    task_id: str = "t-packs",
) -> ActionContext:
    """What the runner hands an action: arguments validated against its schema, the node's pack table
    against its Config, and the arguments checked against that config (InvalidTask otherwise)."""
    task = msgspec.convert(
        {
            "action": cls.name,
            "cluster_name": cluster,
            "task_id": task_id,
            "taskerman_params": {"action_args": args or {}},
        },
        Task,
    )
    pack = cls.name.split(":", 1)[0]
    _, validated, config = ActionRegistry({cls.name: cls}).resolve_for_node(task, {pack: table})
    return ActionContext(
        task=task,
        cluster=cluster,
        node=node,
        args=validated,
        token=1,
        attempt=1,
        pack_config=table,
        config=config,
    )


async def run_steps(action: Action, ctx: ActionContext) -> None:
    await action.pre_check(ctx)
    await action.execute_action(ctx)
    await action.post_check(ctx)


def sha256sum_check(checksum: Path) -> None:
    """`sha256sum -c` accepts the checksum file (run where it is, as an operator would)."""
    subprocess.run(["sha256sum", "-c", checksum.name], cwd=checksum.parent, check=True, capture_output=True)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def require(program: str) -> str:
    found = shutil.which(program)
    if found is None:
        raise RuntimeError(f"{program} is not installed: {INSTALL_HINT}")
    return found


def wait_for(what: str, probe: Any, within: float = 20.0) -> Any:
    """Poll `probe()` until it returns something truthy; AssertionError naming `what` after `within` s."""
    until = time.monotonic() + within
    while True:
        if result := probe():
            return result
        if time.monotonic() > until:
            raise AssertionError(f"{what}: not within {within}s")
        time.sleep(0.05)


# --- Redis ----------------------------------------------------------------------------------------------


class RedisServer:
    """A redis-server (daemonized, so that a restart command can start it the same way) in `home`."""

    def __init__(self, home: Path, port: int, replica_of: int | None = None) -> None:
        self.home, self.port = home, port
        self.conf = home / "redis.conf"
        self.pidfile = home / "redis.pid"
        home.mkdir(parents=True, exist_ok=True)
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            "daemonize yes",
            f"pidfile {self.pidfile}",
            f"dir {home}",
            f"logfile {home / 'redis.log'}",
            "save 3600 1",
            "appendonly no",
            "repl-diskless-sync-delay 0",
            "shutdown-timeout 2",
        ]
        if replica_of is not None:
            lines.append(f"replicaof 127.0.0.1 {replica_of}")
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def start_command(self) -> list[str]:
        return [require("redis-server"), str(self.conf)]

    def start(self) -> None:
        subprocess.run(self.start_command, check=True, capture_output=True, timeout=10)
        wait_for(f"redis on {self.port} answers PING", lambda: self.cli("PING") == "PONG")

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [require("redis-cli"), "-p", str(self.port), *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return done.stdout.strip()

    def info(self, section: str) -> dict[str, str]:
        lines = self.cli("INFO", section).splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line and not line.startswith("#"))

    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.pidfile.read_text().strip())
        return None

    def stop(self) -> None:
        if (pid := self.pid()) is not None:
            procs.terminate([pid], timeout=5.0)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.home / "redis.log").read_text()[-2000:]
        return ""


def linked(primary: RedisServer, replica: RedisServer) -> bool:
    """The replica's link is up and its primary lists it online."""
    up = replica.info("replication").get("master_link_status") == "up"
    return up and "state=online" in primary.info("replication").get("slave0", "")


# --- PostgreSQL -----------------------------------------------------------------------------------------


def postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise RuntimeError(f"PostgreSQL's server programs are not installed: {INSTALL_HINT}")
    return found[-1].parent


class PostgresServer:
    """A PostgreSQL server of its own (initdb + pg_ctl) in a temporary directory. PostgreSQL refuses to
    run as root: as root, the server runs as the `postgres` user that Debian's package creates."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.bin = postgres_bin()
        self.root = Path(tempfile.mkdtemp(prefix="taskerman-pg-"))
        self.owner: pwd.struct_passwd | None = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self.data = self.root / "data"
        self.chown(self.root)

    def chown(self, path: Path) -> None:
        if self.owner is not None:
            for p in [path, *path.rglob("*")]:
                os.chown(p, self.owner.pw_uid, self.owner.pw_gid, follow_symlinks=False)

    def as_owner(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if self.owner is not None else argv

    def initdb(self) -> None:
        argv = [str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"]
        argv += ["--no-sync", "-E", "UTF8", "--locale=C"]
        subprocess.run(self.as_owner(argv), check=True, capture_output=True, timeout=120)

    def start(self, data: Path | None = None, port: int | None = None) -> None:
        options = f"-p {port or self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        argv = [str(self.bin / "pg_ctl"), "-D", str(data or self.data), "-l", str(self.root / "log")]
        argv += ["-w", "-t", "60", "-o", options, "start"]
        done = subprocess.run(self.as_owner(argv), check=False, capture_output=True, text=True, timeout=90)
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {done.stdout}{done.stderr}\n{self.log_tail()}")

    def stop(self, data: Path | None = None) -> None:
        argv = [str(self.bin / "pg_ctl"), "-D", str(data or self.data), "-m", "fast", "-w", "stop"]
        subprocess.run(self.as_owner(argv), capture_output=True, timeout=60, check=False)

    def psql(self, database: str, sql: str, port: int | None = None) -> str:
        argv = [str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(port or self.port), "-U", "postgres"]
        argv += ["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", database, "-c", sql]
        return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout.strip()

    def restore(self, dump: Path, database: str) -> None:
        """pg_restore `dump` into a new, empty `database`."""
        self.psql("postgres", f"DROP DATABASE IF EXISTS {database}")
        self.psql("postgres", f"CREATE DATABASE {database}")
        argv = [str(self.bin / "pg_restore"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        subprocess.run([*argv, "-d", database, str(dump)], check=True, capture_output=True, timeout=120)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "log").read_text()[-2000:]
        return ""

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
