"""The `postgres` pack: `postgres:backup`, a verified backup with PostgreSQL's own tools.

Two methods, each allowed only when the node's `[packs.postgres]` lists it in `methods`:
- `dump`: `pg_dump --format=custom` of one of the configured `databases` into
  `postgres-<node>-<database>-<UTC time>.dump` with a `.sha256` beside it; verified by the checksum and
  by `pg_restore --list` reading the whole archive's table of contents.
- `basebackup`: `pg_basebackup` (plain format, WAL streamed in, SHA256 manifest) of the whole server into
  the directory `postgres-<node>-<UTC time>.base`; verified by `pg_verifybackup`, which checks every file
  against the manifest and that the WAL needed to restore it is there.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from taskcore.core.actions import Action, ActionContext
from taskcore.core.errors import ActionFailed, InvalidTask
from taskcore.packs.backups import (
    backup_name,
    prune_backups,
    require_dir,
    sha256_file,
    verify_checksum,
    write_checksum,
)
from taskcore.packs.common import (
    CommandFailed,
    CommandResult,
    allowed_name,
    in_thread,
    pack_config,
    run_command,
)

log = logging.getLogger(__name__)

PACK = "postgres"
DEBIAN_BIN_DIRS = "/usr/lib/postgresql/*/bin"
PROBE_TIMEOUT = 30.0

Method = Literal["dump", "basebackup"]
PROGRAMS: dict[Method, tuple[str, ...]] = {
    "dump": ("pg_isready", "psql", "pg_dump", "pg_restore"),
    "basebackup": ("pg_isready", "psql", "pg_basebackup", "pg_verifybackup"),
}


class PostgresConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[packs.postgres]`: the node operator's settings for this node's PostgreSQL server."""

    backup_dir: str
    host: str = "127.0.0.1"  # or the directory of its Unix socket
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 5432
    user: str = "postgres"
    passfile: str = ""  # a .pgpass file, handed to the tools as PGPASSFILE
    databases: tuple[str, ...] = ()  # what `dump` may back up
    methods: tuple[Method, ...] = ("dump",)  # what a task may ask for
    bin_dir: str = ""  # default: the newest /usr/lib/postgresql/*/bin, else PATH
    keep: Annotated[int, msgspec.Meta(ge=0)] = 0  # newest backups kept per node and database (0: all)
    command_timeout: Annotated[float, msgspec.Meta(gt=0, le=21600)] = 7200.0


class BackupArgs(msgspec.Struct, forbid_unknown_fields=True):
    """`postgres:backup`: the method, and for `dump` the database (may be left out when the node
    allows only one)."""

    method: Method = "dump"
    database: str | None = None


def chosen_database(args: BackupArgs, config: PostgresConfig) -> str | None:
    """The database a dump backs up: the one named (if the config allows it), else the only one."""
    if args.method == "basebackup":
        if args.database is not None:
            raise InvalidTask(
                "a basebackup copies the whole server: leave out database", "taskerman_params.action_args"
            )
        return None
    if args.database is None:
        if len(config.databases) != 1:
            known = ", ".join(config.databases) or "none"
            raise InvalidTask(
                f"name the database to dump (this node allows: {known})",
                "taskerman_params.action_args.database",
            )
        return config.databases[0]
    allowed_name(args.database, dict.fromkeys(config.databases), "database", "database", PACK)
    return args.database


def bin_dir(config: PostgresConfig) -> Path | None:
    """Where the client programs are: `bin_dir`, else the newest Debian server package's, else PATH."""
    if config.bin_dir:
        return Path(config.bin_dir)
    found = sorted(Path("/").glob(DEBIAN_BIN_DIRS.lstrip("/")), key=lambda p: _major(p.parent.name))
    return found[-1] if found else None


def _major(name: str) -> int:
    return int(name) if name.isdigit() else -1


class PostgresBackup(Action):
    """A `pg_dump` or `pg_basebackup` into `backup_dir`, verified after (see the module doc).

    pre_check: the programs are installed, the server accepts connections (`pg_isready`), the role may
    replicate (basebackup), and the backup directory has room for the database's current size."""

    name = "postgres:backup"
    version = "1.0"
    Args = BackupArgs
    Config = PostgresConfig
    exclusion_groups = ("backup",)
    timeout = 43200.0

    def __init__(self) -> None:
        self.backup: Path | None = None
        self.database: str | None = None

    @classmethod
    def check_args(cls, args: Any, config: Any) -> None:
        if args.method not in config.methods:
            raise InvalidTask(
                f"method {args.method!r} is not allowed on this node (methods: {', '.join(config.methods)})",
                "taskerman_params.action_args.method",
            )
        chosen_database(args, config)
        if not Path(config.backup_dir).is_absolute():
            raise InvalidTask("[packs.postgres] backup_dir must be an absolute path", "packs.postgres")

    async def pre_check(self, ctx: ActionContext) -> None:
        conf = pack_config(ctx, PostgresConfig, "pre_check")
        args: BackupArgs = ctx.args
        self.check_args(args, conf)
        tools = Tools(conf)
        for program in PROGRAMS[args.method]:
            tools.path(program, "pre_check")
        database = chosen_database(args, conf)
        ready = await tools.run(
            "pg_isready", ["-d", database or "postgres", "-t", "10"], PROBE_TIMEOUT, "pre_check", check=False
        )
        if ready.returncode != 0:
            raise ActionFailed(
                "pre_check", f"server {conf.host}:{conf.port} is not ready: {ready.output.strip()}"
            )
        if args.method == "dump":
            assert database is not None
            size = await tools.query(database, "SELECT pg_database_size(current_database())", "pre_check")
        else:
            may = await tools.query(
                "postgres",
                "SELECT (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)"
                " AND current_setting('max_wal_senders')::int > 0",
                "pre_check",
            )
            if may != "t":
                raise ActionFailed(
                    "pre_check",
                    f"role {conf.user!r} may not take a base backup "
                    "(it needs REPLICATION, and the server max_wal_senders > 0)",
                )
            size = await tools.query(
                "postgres", "SELECT sum(pg_database_size(oid)) FROM pg_database", "pre_check"
            )
        if not size.isdigit():
            raise ActionFailed("pre_check", f"could not read the size to back up (psql answered {size!r})")
        await in_thread(require_dir, Path(conf.backup_dir), int(size), "pre_check")

    async def execute_action(self, ctx: ActionContext) -> None:
        conf = pack_config(ctx, PostgresConfig, "execute_action")
        args: BackupArgs = ctx.args
        self.check_args(args, conf)
        self.database = chosen_database(args, conf)
        tools = Tools(conf)
        directory = Path(conf.backup_dir)
        ctx.checkpoint()
        if self.database is not None:
            target = directory / backup_name(f"{PACK}-{ctx.node}-{self.database}", ".dump")
            tmp = target.with_name(f".{target.name}.tmp")
            try:
                await tools.run(
                    "pg_dump",
                    ["--format=custom", "--no-password", f"--file={tmp}", "-d", self.database],
                    conf.command_timeout,
                    "execute_action",
                )
                await in_thread(_finish_dump, tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        else:
            target = directory / backup_name(f"{PACK}-{ctx.node}", ".base")
            tmp = target.with_name(f".{target.name}.tmp")
            try:
                await tools.run(
                    "pg_basebackup",
                    [
                        f"--pgdata={tmp}",
                        "--format=plain",
                        "--wal-method=stream",
                        "--checkpoint=fast",
                        "--manifest-checksums=SHA256",
                        "--no-password",
                    ],
                    conf.command_timeout,
                    "execute_action",
                )
                tmp.rename(target)
            finally:
                if tmp.exists():
                    await in_thread(shutil.rmtree, tmp, True)
        self.backup = target
        log.info("postgres:backup node=%s method=%s wrote %s", ctx.node, args.method, target)

    async def post_check(self, ctx: ActionContext) -> None:
        conf = pack_config(ctx, PostgresConfig, "post_check")
        if self.backup is None:
            raise ActionFailed("post_check", "no backup was written")
        tools = Tools(conf)
        if self.database is not None:
            await in_thread(verify_checksum, self.backup, "post_check")
            with tempfile.TemporaryDirectory(prefix="taskerman-pg-") as tmp:
                toc = Path(tmp) / "toc"  # a file: the listing can be long, command output is cut
                await tools.run(
                    "pg_restore",
                    ["--list", f"--file={toc}", str(self.backup)],
                    conf.command_timeout,
                    "post_check",
                )
                head = await in_thread(_head, toc)
            if not re.search(rf"^;\s+dbname: {re.escape(self.database)}$", head, re.MULTILINE):
                raise ActionFailed(
                    "post_check",
                    f"pg_restore --list of {self.backup} does not name database {self.database!r}: "
                    f"{head[:300]}",
                )
            label = f"{PACK}-{ctx.node}-{self.database}"
            suffix = ".dump"
        else:
            await tools.run("pg_verifybackup", [str(self.backup)], conf.command_timeout, "post_check")
            label, suffix = f"{PACK}-{ctx.node}", ".base"
        if conf.keep:
            await in_thread(prune_backups, Path(conf.backup_dir), label, suffix, conf.keep)


def _head(path: Path, size: int = 4096) -> str:
    with path.open("rb") as f:
        return f.read(size).decode(errors="replace")


def _finish_dump(tmp: Path, target: Path) -> None:
    """Move a finished dump to its name and write its checksum."""
    if target.exists():
        raise ActionFailed("execute_action", f"{target} already exists")
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.rename(target)
    write_checksum(target, sha256_file(target))


class Tools:
    """PostgreSQL's client programs, connected to the node's server as its config says."""

    def __init__(self, conf: PostgresConfig) -> None:
        self.conf = conf
        self.bin = bin_dir(conf)

    def path(self, program: str, step: str) -> str:
        if self.bin is not None and (self.bin / program).is_file():
            return str(self.bin / program)
        found = shutil.which(program)
        if found is None:
            where = f"in {self.bin} or " if self.bin else ""
            raise ActionFailed(step, f"{program} is not installed ({where}on PATH)")
        return found

    def env(self) -> Mapping[str, str]:
        env = dict(os.environ)
        env.update(
            PGHOST=self.conf.host,
            PGPORT=str(self.conf.port),
            PGUSER=self.conf.user,
            PGCONNECT_TIMEOUT="10",
            PGAPPNAME="taskerman",
        )
        if self.conf.passfile:
            env["PGPASSFILE"] = self.conf.passfile
        return env

    async def run(
        self, program: str, argv: Sequence[str], time_limit: float, step: str, check: bool = True
    ) -> CommandResult:
        try:
            return await run_command(
                [self.path(program, step), *argv], time_limit, env=self.env(), check=check
            )
        except CommandFailed as e:
            raise ActionFailed(step, str(e)) from e

    async def query(self, database: str, sql: str, step: str) -> str:
        """One value from `psql -XAtc`."""
        result = await self.run(
            "psql",
            ["-X", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1", "-d", database, "-c", sql],
            PROBE_TIMEOUT,
            step,
        )
        lines = result.output.strip().splitlines()  # the value is the last line (warnings go before)
        return lines[-1].strip() if lines else ""
