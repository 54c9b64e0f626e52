"""The `redis` pack: `redis:restart` (replica-aware) and `redis:backup` (BGSAVE, then a checksummed copy).

The node's operator names everything in `[packs.redis]`: the port, the commands that stop and start the
server, the backup directory. A task only picks timeouts.

"The only healthy primary": Redis replication has no quorum, so a primary is the only live copy of its
data unless at least `min_healthy_replicas` replicas are connected to it with `state=online` and a lag
of at most `max_replica_lag` seconds. `redis:restart` refuses such a primary (and a primary with
persistence off, which would come back empty for its replicas to copy). It refuses a replica whose link
to its primary is down, too: that replica may be the healthy copy now. A replica with its link up may
restart: the primary keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec

from taskcore.core.actions import Action, ActionContext
from taskcore.core.errors import ActionFailed, InvalidTask, TaskermanError
from taskcore.packs.backups import backup_name, copy_with_digest, prune_backups, require_dir, verify_checksum
from taskcore.packs.common import Argv, CommandFailed, missing_program, pack_config, run_command

log = logging.getLogger(__name__)

PACK = "redis"
POLL = 0.2
IO_TIMEOUT = 5.0
RDB_MAGIC = re.compile(rb"REDIS\d{4}")


class RedisConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[packs.redis]`: the node operator's settings for this node's Redis server."""

    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    host: str = "127.0.0.1"
    password: str | None = None
    # redis:restart runs stop_command (default: the SHUTDOWN command), then start_command; both must
    # return once done (`systemctl start redis-server`, or redis-server with `daemonize yes`)
    start_command: Argv | None = None
    stop_command: Argv | None = None
    command_timeout: Annotated[float, msgspec.Meta(gt=0, le=600)] = 60.0
    min_healthy_replicas: Annotated[int, msgspec.Meta(ge=1)] = 1
    max_replica_lag: Annotated[int, msgspec.Meta(ge=0)] = 10
    # redis:backup copies the dump (default: CONFIG GET dir + dbfilename) into backup_dir, keeps the
    # newest `keep` copies of this node (0: all) and verifies each with `check_rdb` ("": checksum only)
    backup_dir: str = ""
    keep: Annotated[int, msgspec.Meta(ge=0)] = 0
    rdb_path: str = ""
    check_rdb: str = "redis-check-rdb"


class RestartArgs(msgspec.Struct, forbid_unknown_fields=True):
    """`redis:restart`: how long post_check waits for PING and the replication link."""

    up_timeout: Annotated[float, msgspec.Meta(gt=0, le=1800)] = 60.0


class BackupArgs(msgspec.Struct, forbid_unknown_fields=True):
    """`redis:backup`: how long the BGSAVE may take."""

    save_timeout: Annotated[float, msgspec.Meta(gt=0, le=21600)] = 600.0


# --- a small RESP client ------------------------------------------------------------------------------


class RedisUnavailable(TaskermanError):
    """The server does not answer (refused, closed, timed out)."""


class RedisReplyError(TaskermanError):
    """The server answered a command with an error reply (`-LOADING …` while it loads its data)."""


Reply = str | int | bytes | list[Any] | None


class RedisConnection:
    """One connection speaking RESP2: enough for PING, INFO, CONFIG GET, BGSAVE, LASTSAVE, SHUTDOWN."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str) -> None:
        self.reader, self.writer, self.where = reader, writer, where

    async def call(self, *args: str) -> Reply:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        try:
            async with asyncio.timeout(IO_TIMEOUT):
                self.writer.write(b"".join(parts))
                await self.writer.drain()
                return await self._reply()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            raise RedisUnavailable(f"{self.where}: {args[0]} got no answer ({e!r})") from e

    async def _reply(self) -> Reply:
        line = await self.reader.readuntil(b"\r\n")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisReplyError(f"{self.where}: {rest.decode(errors='replace')}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else (await self.reader.readexactly(size + 2))[:-2]
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [await self._reply() for _ in range(count)]
        raise RedisUnavailable(f"{self.where}: not a RESP reply: {line[:40]!r}")

    async def info(self, section: str) -> dict[str, str]:
        """`INFO section` as a dict (comment lines dropped)."""
        reply = await self.call("INFO", section)
        text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
        fields: dict[str, str] = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        return fields

    async def config_get(self, name: str) -> str:
        reply = await self.call("CONFIG", "GET", name)
        if not isinstance(reply, list) or len(reply) != 2 or not isinstance(reply[1], bytes):
            raise RedisReplyError(f"{self.where}: CONFIG GET {name} answered {reply!r}")
        return reply[1].decode()

    async def lastsave(self) -> int:
        reply = await self.call("LASTSAVE")
        if not isinstance(reply, int):
            raise RedisReplyError(f"{self.where}: LASTSAVE answered {reply!r}")
        return reply


@contextlib.asynccontextmanager
async def connect(conf: RedisConfig) -> AsyncIterator[RedisConnection]:
    """A connection to the node's server, authenticated when the config has a password."""
    where = f"redis {conf.host}:{conf.port}"
    try:
        async with asyncio.timeout(IO_TIMEOUT):
            reader, writer = await asyncio.open_connection(conf.host, conf.port)
    except (OSError, TimeoutError) as e:
        raise RedisUnavailable(f"{where} does not answer ({e!r})") from e
    conn = RedisConnection(reader, writer, where)
    try:
        if conf.password is not None:
            await conn.call("AUTH", conf.password)
        yield conn
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def answers(conf: RedisConfig) -> bool:
    """Whether the server answers PING (a LOADING server does not count)."""
    try:
        async with connect(conf) as conn:
            await conn.call("PING")
    except (RedisUnavailable, RedisReplyError):
        return False
    return True


# --- replication ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replica:
    """One `slaveN:ip=…,port=…,state=online,offset=…,lag=0` line of a primary's INFO replication."""

    address: str
    state: str
    lag: int


def replicas_of(info: dict[str, str]) -> list[Replica]:
    found = []
    for key, value in info.items():
        if re.fullmatch(r"slave\d+", key):
            attrs = dict(part.partition("=")[::2] for part in value.split(","))
            lag = attrs.get("lag", "")
            found.append(
                Replica(
                    f"{attrs.get('ip')}:{attrs.get('port')}",
                    attrs.get("state", "?"),
                    int(lag) if lag.isdigit() else 1 << 30,
                )
            )
    return found


def healthy_replicas(info: dict[str, str], max_lag: int) -> list[Replica]:
    return [r for r in replicas_of(info) if r.state == "online" and r.lag <= max_lag]


def restart_refusal(info: dict[str, str], conf: RedisConfig, persistent: bool) -> str | None:
    """Why restarting the node that INFO replication describes is unsafe, or None when it is safe."""
    role = info.get("role")
    if role == "slave":
        primary = f"{info.get('master_host')}:{info.get('master_port')}"
        link = info.get("master_link_status")
        if link != "up":
            return f"this replica's link to its primary {primary} is {link}: it may be the healthy copy"
        if info.get("master_sync_in_progress") == "1":
            return f"this replica is still syncing from its primary {primary}"
        return None
    if role != "master":
        return f"INFO replication reports an unknown role {role!r}"
    healthy = healthy_replicas(info, conf.max_replica_lag)
    if len(healthy) < conf.min_healthy_replicas:
        listed = ", ".join(f"{r.address} state={r.state} lag={r.lag}" for r in replicas_of(info)) or "none"
        return (
            f"this node is the only healthy primary: {len(healthy)} healthy replica(s) (online, lag <= "
            f"{conf.max_replica_lag}s) where {conf.min_healthy_replicas} are needed; replicas: {listed}"
        )
    if not persistent:
        return (
            "this primary has persistence off (no save points, no AOF): it would restart empty and its "
            "replicas would copy the empty dataset"
        )
    return None


def replication_missing(info: dict[str, str], conf: RedisConfig, replicas_before: int) -> str:
    """What is still missing for a restarted node's replication to be back ("" when nothing is)."""
    if info.get("role") == "slave":
        link = info.get("master_link_status")
        primary = f"{info.get('master_host')}:{info.get('master_port')}"
        return "" if link == "up" else f"its link to the primary {primary} is {link}"
    healthy = len(healthy_replicas(info, conf.max_replica_lag))
    return "" if healthy >= replicas_before else f"{healthy} of {replicas_before} replica(s) back online"


async def persistence_on(conn: RedisConnection) -> bool:
    """Whether the server saves its data: RDB save points or the AOF."""
    return bool((await conn.config_get("save")).strip()) or await conn.config_get("appendonly") == "yes"


async def run(argv: Sequence[str], time_limit: float, step: str, what: str) -> None:
    """Run one of the node config's commands; ActionFailed naming it when it fails."""
    try:
        await run_command(argv, time_limit)
    except CommandFailed as e:
        raise ActionFailed(step, f"{what}: {e}") from e


# --- redis:restart ------------------------------------------------------------------------------------


class RedisRestart(Action):
    """Restarts the node's Redis server with the configured commands and waits until it serves again:
    PING answers (not LOADING) from a new process (run_id), and its replication is back — a replica's
    link to its primary is up; a primary has as many healthy replicas as before."""

    name = "redis:restart"
    version = "1.0"
    Args = RestartArgs
    Config = RedisConfig
    timeout = 3600.0

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.replicas_before = 0

    @classmethod
    def check_args(cls, args: Any, config: Any) -> None:
        if config.start_command is None:
            raise InvalidTask("redis:restart needs start_command in the node's [packs.redis]", "packs.redis")

    async def pre_check(self, ctx: ActionContext) -> None:
        """Refuse the only healthy primary (see the module doc), a primary without persistence, and
        a replica without a link to its primary."""
        conf = pack_config(ctx, RedisConfig, "pre_check")
        self.check_args(ctx.args, conf)
        try:
            async with connect(conf) as conn:
                info = await conn.info("replication")
                persistent = info.get("role") != "master" or await persistence_on(conn)
                self.run_id = (await conn.info("server")).get("run_id")
        except (RedisUnavailable, RedisReplyError) as e:
            raise ActionFailed("pre_check", f"cannot check {ctx.node!r}: {e}") from e
        if (reason := restart_refusal(info, conf, persistent)) is not None:
            raise ActionFailed("pre_check", f"refusing to restart {ctx.node!r}: {reason}")
        self.replicas_before = len(healthy_replicas(info, conf.max_replica_lag))
        log.info(
            "redis:restart pre_check passed node=%s role=%s healthy_replicas=%d",
            ctx.node,
            info.get("role"),
            self.replicas_before,
        )

    async def execute_action(self, ctx: ActionContext) -> None:
        """stop_command (or SHUTDOWN), wait until it no longer answers, then start_command."""
        conf = pack_config(ctx, RedisConfig, "execute_action")
        self.check_args(ctx.args, conf)
        assert conf.start_command is not None
        ctx.checkpoint()
        if conf.stop_command:
            await run(conf.stop_command, conf.command_timeout, "execute_action", "stop_command")
        else:
            await shutdown(conf)
        until = time.monotonic() + conf.command_timeout
        while await answers(conf):
            if time.monotonic() > until:
                raise ActionFailed(
                    "execute_action",
                    f"{ctx.node!r} still answers {conf.command_timeout:g}s after it was stopped",
                )
            await asyncio.sleep(POLL)
        ctx.checkpoint()
        await run(conf.start_command, conf.command_timeout, "execute_action", "start_command")

    async def post_check(self, ctx: ActionContext) -> None:
        """Within `up_timeout`: PING answers from a new process, and its replication is back."""
        conf = pack_config(ctx, RedisConfig, "post_check")
        args: RestartArgs = ctx.args
        until = time.monotonic() + args.up_timeout
        while True:
            try:
                async with connect(conf) as conn:
                    await conn.call("PING")
                    run_id = (await conn.info("server")).get("run_id")
                    if run_id == self.run_id:
                        raise ActionFailed(
                            "post_check",
                            f"{ctx.node!r} answers from the same process "
                            f"(run_id {run_id}): it was not restarted",
                        )
                    missing = replication_missing(await conn.info("replication"), conf, self.replicas_before)
            except (RedisUnavailable, RedisReplyError) as e:  # refused, or -LOADING while it loads
                missing = str(e)
            if not missing:
                return
            if time.monotonic() > until:
                raise ActionFailed(
                    "post_check", f"{ctx.node!r} not back within {args.up_timeout:g}s: {missing}"
                )
            await asyncio.sleep(POLL)


async def shutdown(conf: RedisConfig) -> None:
    """SHUTDOWN: the server saves (when it has persistence) and exits, closing the connection."""
    try:
        async with connect(conf) as conn:
            await conn.call("SHUTDOWN")
    except RedisUnavailable:
        return  # what success looks like: the server closed the connection as it exited
    except RedisReplyError as e:
        raise ActionFailed("execute_action", f"SHUTDOWN refused: {e}") from e


# --- redis:backup -------------------------------------------------------------------------------------


class RedisBackup(Action):
    """BGSAVE and wait until it completes (`rdb_bgsave_in_progress:0`, LASTSAVE advanced, last status
    ok); copy the dump into `backup_dir` as `redis-<node>-<UTC time>.rdb`, with a `.sha256` beside it
    (`sha256sum -c` reads it). post_check re-reads the copy against its checksum, runs `check_rdb` on
    it and only then prunes this node's copies beyond `keep`."""

    name = "redis:backup"
    version = "1.0"
    Args = BackupArgs
    Config = RedisConfig
    exclusion_groups = ("backup",)
    timeout = 43200.0

    def __init__(self) -> None:
        self.backup: Path | None = None

    @classmethod
    def check_args(cls, args: Any, config: Any) -> None:
        if not config.backup_dir or not Path(config.backup_dir).is_absolute():
            raise InvalidTask(
                "redis:backup needs backup_dir (an absolute path) in the node's [packs.redis]", "packs.redis"
            )
        if config.rdb_path and not Path(config.rdb_path).is_absolute():
            raise InvalidTask("[packs.redis] rdb_path must be an absolute path", "packs.redis")

    async def pre_check(self, ctx: ActionContext) -> None:
        """The server answers, the backup directory is writable with room for another dump, and the
        verifier (`check_rdb`) is installed."""
        conf = pack_config(ctx, RedisConfig, "pre_check")
        self.check_args(ctx.args, conf)
        if conf.check_rdb and (problem := missing_program([conf.check_rdb])):
            raise ActionFailed("pre_check", f"check_rdb: {problem}")
        try:
            async with connect(conf) as conn:
                dump = await dump_path(conn, conf)
                used = int((await conn.info("memory")).get("used_memory", "0"))
        except (RedisUnavailable, RedisReplyError) as e:
            raise ActionFailed("pre_check", f"cannot check {ctx.node!r}: {e}") from e
        await asyncio.to_thread(check_room, dump, used, Path(conf.backup_dir))

    async def execute_action(self, ctx: ActionContext) -> None:
        conf = pack_config(ctx, RedisConfig, "execute_action")
        self.check_args(ctx.args, conf)
        args: BackupArgs = ctx.args
        try:
            async with connect(conf) as conn:
                await bgsave(conn, time.monotonic() + args.save_timeout, ctx)
                dump = await dump_path(conn, conf)
        except (RedisUnavailable, RedisReplyError) as e:
            raise ActionFailed("execute_action", f"BGSAVE on {ctx.node!r}: {e}") from e
        ctx.checkpoint()
        target = Path(conf.backup_dir) / backup_name(f"{PACK}-{ctx.node}", ".rdb")
        digest = await asyncio.to_thread(copy_with_digest, dump, target)
        self.backup = target
        log.info("redis:backup node=%s copied %s to %s sha256=%s", ctx.node, dump, target, digest)

    async def post_check(self, ctx: ActionContext) -> None:
        conf = pack_config(ctx, RedisConfig, "post_check")
        if self.backup is None:
            raise ActionFailed("post_check", "no backup was written")
        await asyncio.to_thread(verify_copy, self.backup)
        if conf.check_rdb:
            await run([conf.check_rdb, str(self.backup)], 3600.0, "post_check", "check_rdb")
        if conf.keep:
            label = f"{PACK}-{ctx.node}"
            await asyncio.to_thread(prune_backups, Path(conf.backup_dir), label, ".rdb", conf.keep)


def check_room(dump: Path, used_memory: int, backup_dir: Path) -> None:
    """The runner can read the dump, and `backup_dir` has room for it (for the server's memory use
    when there is no dump yet)."""
    if dump.exists() and not os.access(dump, os.R_OK):
        raise ActionFailed("pre_check", f"the dump {dump} is not readable by the runner")
    require_dir(backup_dir, dump.stat().st_size if dump.exists() else used_memory, "pre_check")


def verify_copy(path: Path) -> None:
    """The copy matches its checksum file and starts like an RDB file."""
    verify_checksum(path, "post_check")
    with path.open("rb") as f:
        if not RDB_MAGIC.fullmatch(f.read(9)):
            raise ActionFailed("post_check", f"{path} does not start like an RDB file")


async def dump_path(conn: RedisConnection, conf: RedisConfig) -> Path:
    """The server's RDB file: `rdb_path` when configured, else CONFIG GET dir + dbfilename."""
    if conf.rdb_path:
        return Path(conf.rdb_path)
    return Path(await conn.config_get("dir")) / await conn.config_get("dbfilename")


async def bgsave(conn: RedisConnection, until: float, ctx: ActionContext) -> None:
    """BGSAVE and wait for it: no save in progress, LASTSAVE past the one before, last status ok."""
    while (await conn.info("persistence")).get("rdb_bgsave_in_progress") == "1":  # someone else's save
        if time.monotonic() > until:
            raise ActionFailed("execute_action", "a BGSAVE already in progress did not finish in time")
        await asyncio.sleep(POLL)
    before = await conn.lastsave()
    # LASTSAVE counts whole seconds: start in a later second than the last save, so ours advances it
    if (wait := before + 1 - time.time()) > 0:
        await asyncio.sleep(wait)
    ctx.checkpoint()
    await conn.call("BGSAVE", "SCHEDULE")  # SCHEDULE: wait for a running AOF rewrite instead of failing
    while True:
        info = await conn.info("persistence")
        if info.get("rdb_bgsave_in_progress") == "0" and await conn.lastsave() > before:
            if (status := info.get("rdb_last_bgsave_status")) != "ok":
                raise ActionFailed("execute_action", f"BGSAVE failed: rdb_last_bgsave_status={status}")
            return
        if time.monotonic() > until:
            raise ActionFailed("execute_action", "BGSAVE did not complete in time")
        await asyncio.sleep(POLL)
