"""The `redis` pack's shared part: the node operator's `[packs.redis]` settings, a small RESP client
for the node's server, and running the commands the settings name.

The pack is `redis:restart` (redis_restart.py: replica-aware) and `redis:backup` (redis_backup.py:
BGSAVE, then a checksummed copy). The node's operator names everything in `[packs.redis]`: the port,
the commands that stop and start the server, the backup directory. A task only picks timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

import msgspec

from taskcore.core.errors import ActionFailed, TaskermanError
from taskcore.packs.common import Argv, CommandFailed, run_command

PACK = "redis"
POLL = 0.2
IO_TIMEOUT = 5.0


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


# --- a small RESP client ------------------------------------------------------------------------------


class RedisUnavailable(TaskermanError):
    """The server does not answer (refused, closed, timed out)."""


class RedisReplyError(TaskermanError):
    """The server answered a command with an error reply (`-LOADING …` while it loads its data)."""


Reply = str | int | bytes | list[Any] | None


class RedisConnection:
    """One connection speaking RESP2: enough for PING, INFO, CONFIG GET, BGSAVE, SHUTDOWN."""

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


async def run(argv: Sequence[str], time_limit: float, step: str, what: str) -> None:
    """Run one of the node config's commands; ActionFailed naming it when it fails."""
    try:
        await run_command(argv, time_limit)
    except CommandFailed as e:
        raise ActionFailed(step, f"{what}: {e}") from e
