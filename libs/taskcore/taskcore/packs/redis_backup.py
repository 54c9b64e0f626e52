"""`redis:backup`: BGSAVE, then a checksummed, verified copy of the dump (the `redis` pack; its
settings and client are in redis_client.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from pathlib import Path
from typing import Annotated, Any

import msgspec

from taskcore.core.actions import Action, ActionContext
from taskcore.core.errors import ActionFailed, InvalidTask
from taskcore.packs.backups import backup_name, copy_with_digest, prune_backups, require_dir, verify_checksum
from taskcore.packs.common import in_thread, missing_program, pack_config
from taskcore.packs.redis_client import (
    PACK,
    POLL,
    RedisConfig,
    RedisConnection,
    RedisReplyError,
    RedisUnavailable,
    connect,
    run,
)

log = logging.getLogger(__name__)

RDB_MAGIC = re.compile(rb"REDIS\d{4}")


class BackupArgs(msgspec.Struct, forbid_unknown_fields=True):
    """`redis:backup`: how long the BGSAVE may take."""

    save_timeout: Annotated[float, msgspec.Meta(gt=0, le=21600)] = 600.0


class RedisBackup(Action):
    """BGSAVE and wait until a save forked after the request completes (`rdb_saves` past its count,
    `rdb_bgsave_in_progress:0`, last status ok); copy the dump into `backup_dir` as
    `redis-<node>-<UTC time>.rdb`, with a `.sha256` beside it (`sha256sum -c` reads it). post_check
    re-reads the copy against its checksum, runs `check_rdb` on it and only then prunes this node's
    copies beyond `keep`."""

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
        await in_thread(check_room, dump, used, Path(conf.backup_dir))

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
        digest = await in_thread(copy_with_digest, dump, target)
        self.backup = target
        log.info("redis:backup node=%s copied %s to %s sha256=%s", ctx.node, dump, target, digest)

    async def post_check(self, ctx: ActionContext) -> None:
        conf = pack_config(ctx, RedisConfig, "post_check")
        if self.backup is None:
            raise ActionFailed("post_check", "no backup was written")
        await in_thread(verify_copy, self.backup)
        if conf.check_rdb:
            await run([conf.check_rdb, str(self.backup)], 3600.0, "post_check", "check_rdb")
        if conf.keep:
            label = f"{PACK}-{ctx.node}"
            await in_thread(prune_backups, Path(conf.backup_dir), label, ".rdb", conf.keep)


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
    """BGSAVE and wait for it: a save forked after the request (INFO's `rdb_saves` counts the forks)
    has finished, with status ok. No clock is compared: LASTSAVE counts whole seconds and is set at
    startup too, so a save in the second of the one before cannot be told from it."""
    while True:
        info = await wait_for_no_save(conn, until)
        ctx.checkpoint()
        try:  # SCHEDULE: wait for a running AOF rewrite instead of failing
            await conn.call("BGSAVE", "SCHEDULE")
            break
        except RedisReplyError as e:  # a save forked between the two requests: wait for it, ask again
            if "in progress" not in str(e):
                raise
    forked = int(info.get("rdb_saves", "0"))
    while True:
        info = await conn.info("persistence")
        if int(info.get("rdb_saves", "0")) > forked and info.get("rdb_bgsave_in_progress") == "0":
            if (status := info.get("rdb_last_bgsave_status")) != "ok":
                raise ActionFailed("execute_action", f"BGSAVE failed: rdb_last_bgsave_status={status}")
            return
        if time.monotonic() > until:
            raise ActionFailed("execute_action", "BGSAVE did not complete in time")
        await asyncio.sleep(POLL)


async def wait_for_no_save(conn: RedisConnection, until: float) -> dict[str, str]:
    """INFO persistence once no RDB save (someone else's) is in progress."""
    while (info := await conn.info("persistence")).get("rdb_bgsave_in_progress") == "1":
        if time.monotonic() > until:
            raise ActionFailed("execute_action", "a BGSAVE already in progress did not finish in time")
        await asyncio.sleep(POLL)
    return info
