"""`redis:restart`: restart the node's Redis server, replica-aware (the `redis` pack; its settings
and client are in redis_client.py).

"The only healthy primary": Redis replication has no quorum, so a primary is the only live copy of its
data unless at least `min_healthy_replicas` replicas are connected to it with `state=online` and a lag
of at most `max_replica_lag` seconds. `redis:restart` refuses such a primary (and a primary with
persistence off, which would come back empty for its replicas to copy). It refuses a replica whose link
to its primary is down, too: that replica may be the healthy copy now. A replica with its link up may
restart: the primary keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from taskcore.core.actions import Action, ActionContext
from taskcore.core.errors import ActionFailed, InvalidTask
from taskcore.packs.common import pack_config
from taskcore.packs.redis_client import (
    POLL,
    RedisConfig,
    RedisConnection,
    RedisReplyError,
    RedisUnavailable,
    answers,
    connect,
    run,
)

log = logging.getLogger(__name__)


class RestartArgs(msgspec.Struct, forbid_unknown_fields=True):
    """`redis:restart`: how long post_check waits for PING and the replication link."""

    up_timeout: Annotated[float, msgspec.Meta(gt=0, le=1800)] = 60.0


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
