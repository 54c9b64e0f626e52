"""The `cassandra` pack: `cassandra:restart`, `cassandra:repair` and `cassandra:snapshot`, through the
`nodetool` that the node's `[packs.cassandra]` names (with its connection options in `nodetool_args`).

The ring's health comes from `nodetool status`: every node is listed with two letters, Up/Down and
Normal/Leaving/Joining/Moving. A restart or repair starts only when every node is `UN` (with a node
already down, restarting another can take a token range below quorum, a repair would fail anyway, and
neither belongs in the middle of a topology change). They are done when this node is `UN` and no node
is down.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Annotated, Any

import msgspec

from taskcore.core.actions import Action, ActionContext
from taskcore.core.errors import ActionFailed, InvalidTask
from taskcore.packs.common import Argv, CommandFailed, CommandResult, allowed_name, pack_config, run_command

log = logging.getLogger(__name__)

PACK = "cassandra"
POLL = 1.0
STATUS_LINE = re.compile(r"^([UD])([NLJM])\s+(\S+)\s")

Seconds = Annotated[float, msgspec.Meta(gt=0, le=86400)]


class CassandraConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`[packs.cassandra]`: the node operator's settings for this node's Cassandra."""

    address: str  # this node's address as `nodetool status` lists it
    nodetool: str = "nodetool"
    nodetool_args: list[str] = []  # put before every command, e.g. ["-h", "127.0.0.1", "-p", "7199"]
    # cassandra:restart runs stop_command then start_command (both must return once done)
    stop_command: Argv | None = None
    start_command: Argv | None = None
    keyspaces: list[str] = []  # what a repair or snapshot task may name (empty: whole-node runs only)
    nodetool_timeout: Annotated[float, msgspec.Meta(gt=0, le=600)] = 60.0
    drain_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 600.0
    command_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 300.0
    repair_timeout: Seconds = 86400.0


class RestartArgs(msgspec.Struct, forbid_unknown_fields=True):
    """`cassandra:restart`: how long post_check waits for the node to be UN with no node down."""

    up_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 600.0


class KeyspaceArgs(msgspec.Struct, forbid_unknown_fields=True):
    """`cassandra:repair` and `cassandra:snapshot`: one of the node's `keyspaces`, or all of them."""

    keyspace: str | None = None


def parse_status(output: str) -> dict[str, str]:
    """`nodetool status` as {address: "UN" | "DN" | "UJ" | ...} over every datacenter."""
    return {m[3]: m[1] + m[2] for line in output.splitlines() if (m := STATUS_LINE.match(line))}


def ring_problem(ring: dict[str, str], local: str, *, settled: bool = True) -> str | None:
    """Why the ring is not healthy, or None. This node must be listed and UN; with `settled`, every node
    must be UN (none down, joining, leaving or moving), else only no node may be down."""
    if local not in ring:
        return f"this node's address {local} is not in nodetool status ({len(ring)} nodes listed)"
    if ring[local] != "UN":
        return f"this node ({local}) is {ring[local]}"
    bad = sorted(f"{a} {s}" for a, s in ring.items() if (s != "UN" if settled else s.startswith("D")))
    if not bad:
        return None
    return f"not every node is UN: {', '.join(bad)}" if settled else f"nodes down: {', '.join(bad)}"


class Nodetool:
    """The node's configured `nodetool`, with its connection options."""

    def __init__(self, conf: CassandraConfig) -> None:
        self.conf = conf

    async def run(self, step: str, *args: str, time_limit: float | None = None) -> CommandResult:
        argv = [self.conf.nodetool, *self.conf.nodetool_args, *args]
        try:
            return await run_command(argv, time_limit or self.conf.nodetool_timeout)
        except CommandFailed as e:
            raise ActionFailed(
                step, f"nodetool {' '.join(args)}: {e.problem}: {e.output.strip()[-500:]}"
            ) from e

    async def ring(self, step: str) -> dict[str, str]:
        ring = parse_status((await self.run(step, "status")).output)
        if not ring:
            raise ActionFailed(step, "nodetool status listed no nodes")
        return ring

    async def require_healthy(self, step: str, what: str, *, settled: bool = True) -> None:
        if (problem := ring_problem(await self.ring(step), self.conf.address, settled=settled)) is not None:
            raise ActionFailed(step, f"refusing to {what}: {problem}")


def keyspace_args(args: KeyspaceArgs) -> list[str]:
    return [args.keyspace] if args.keyspace is not None else []


def check_keyspace(args: Any, config: Any) -> None:
    if args.keyspace is not None:
        allowed_name(args.keyspace, dict.fromkeys(config.keyspaces), "keyspace", "keyspace", PACK)


# --- cassandra:restart --------------------------------------------------------------------------------


class CassandraRestart(Action):
    """`nodetool drain` (flush memtables, stop accepting writes), stop_command, start_command; then
    post_check waits until this node is UN and no node is down."""

    name = "cassandra:restart"
    version = "1.0"
    Args = RestartArgs
    Config = CassandraConfig
    timeout = 3 * 3600.0  # per step: a drain and two commands of up to an hour each

    @classmethod
    def check_args(cls, args: Any, config: Any) -> None:
        if config.stop_command is None or config.start_command is None:
            raise InvalidTask(
                "cassandra:restart needs stop_command and start_command in the node's [packs.cassandra]",
                "packs.cassandra",
            )

    async def pre_check(self, ctx: ActionContext) -> None:
        """Every node, this one included, is UN."""
        conf = pack_config(ctx, CassandraConfig, "pre_check")
        self.check_args(ctx.args, conf)
        await Nodetool(conf).require_healthy("pre_check", f"restart {ctx.node!r}")

    async def execute_action(self, ctx: ActionContext) -> None:
        conf = pack_config(ctx, CassandraConfig, "execute_action")
        self.check_args(ctx.args, conf)
        assert conf.stop_command is not None
        assert conf.start_command is not None
        ctx.checkpoint()
        await Nodetool(conf).run("execute_action", "drain", time_limit=conf.drain_timeout)
        for what, argv in (("stop_command", conf.stop_command), ("start_command", conf.start_command)):
            ctx.checkpoint()
            try:
                await run_command(argv, conf.command_timeout)
            except CommandFailed as e:
                raise ActionFailed("execute_action", f"{what}: {e}") from e
        log.info("cassandra:restart node=%s drained, stopped and started", ctx.node)

    async def post_check(self, ctx: ActionContext) -> None:
        """Within `up_timeout`: this node is UN again and no node is down (while the node boots,
        nodetool cannot connect: that counts as not yet). Another node joining, leaving or moving
        does not hold it up: pre_check refuses to start during such changes, not post_check."""
        conf = pack_config(ctx, CassandraConfig, "post_check")
        args: RestartArgs = ctx.args
        nodetool = Nodetool(conf)
        until = time.monotonic() + args.up_timeout
        while True:
            try:
                problem = ring_problem(await nodetool.ring("post_check"), conf.address, settled=False)
            except ActionFailed as e:
                problem = e.reason
            if problem is None:
                return
            if time.monotonic() > until:
                raise ActionFailed(
                    "post_check", f"{ctx.node!r} not back within {args.up_timeout:g}s: {problem}"
                )
            await asyncio.sleep(POLL)


# --- cassandra:repair ---------------------------------------------------------------------------------


class CassandraRepair(Action):
    """`nodetool repair -pr [keyspace]`: repairs the token ranges this node is primary for, so that
    running it on every node of the ring (one at a time) repairs each range once."""

    name = "cassandra:repair"
    version = "1.0"
    Args = KeyspaceArgs
    Config = CassandraConfig
    exclusion_groups = ("repair",)
    timeout = 86400.0 + 600.0  # per step: repair_timeout and a margin

    @classmethod
    def check_args(cls, args: Any, config: Any) -> None:
        check_keyspace(args, config)

    async def pre_check(self, ctx: ActionContext) -> None:
        """Every node is UN: a repair needs every replica."""
        conf = pack_config(ctx, CassandraConfig, "pre_check")
        await Nodetool(conf).require_healthy("pre_check", f"repair {ctx.node!r}")

    async def execute_action(self, ctx: ActionContext) -> None:
        conf = pack_config(ctx, CassandraConfig, "execute_action")
        args: KeyspaceArgs = ctx.args
        self.check_args(args, conf)
        ctx.checkpoint()
        result = await Nodetool(conf).run(
            "execute_action", "repair", "-pr", *keyspace_args(args), time_limit=conf.repair_timeout
        )
        log.info("cassandra:repair node=%s: %s", ctx.node, result.output.strip().splitlines()[-1:])

    async def post_check(self, ctx: ActionContext) -> None:
        """This node is UN and no node is down."""
        conf = pack_config(ctx, CassandraConfig, "post_check")
        await Nodetool(conf).require_healthy("post_check", f"call {ctx.node!r} repaired", settled=False)


# --- cassandra:snapshot -------------------------------------------------------------------------------


def snapshot_tag(task_id: str) -> str:
    """`taskerman-<task id>`: the same on every retry of a task, so a retry finds its own snapshot."""
    return "taskerman-" + re.sub(r"[^A-Za-z0-9_-]", "_", task_id)


class CassandraSnapshot(Action):
    """`nodetool snapshot -t taskerman-<task id> [keyspace]`: hard links of this node's SSTables under
    each table's `snapshots/<tag>` directory, a consistent local backup for shipping elsewhere.
    post_check finds the tag in `nodetool listsnapshots`."""

    name = "cassandra:snapshot"
    version = "1.0"
    Args = KeyspaceArgs
    Config = CassandraConfig
    exclusion_groups = ("backup",)
    timeout = 3600.0 + 600.0

    @classmethod
    def check_args(cls, args: Any, config: Any) -> None:
        check_keyspace(args, config)

    async def pre_check(self, ctx: ActionContext) -> None:
        """This node is UN (a snapshot flushes its memtables first)."""
        conf = pack_config(ctx, CassandraConfig, "pre_check")
        state = (await Nodetool(conf).ring("pre_check")).get(conf.address)
        if state != "UN":
            raise ActionFailed(
                "pre_check", f"{ctx.node!r} ({conf.address}) is {state or 'not listed'}, not UN"
            )

    async def execute_action(self, ctx: ActionContext) -> None:
        conf = pack_config(ctx, CassandraConfig, "execute_action")
        args: KeyspaceArgs = ctx.args
        self.check_args(args, conf)
        tag = snapshot_tag(ctx.task.task_id)
        ctx.checkpoint()
        try:
            await Nodetool(conf).run(
                "execute_action", "snapshot", "-t", tag, *keyspace_args(args), time_limit=conf.command_timeout
            )
        except ActionFailed as e:
            if "already exists" not in e.reason:
                raise
            log.info("cassandra:snapshot node=%s: snapshot %s exists (an earlier attempt)", ctx.node, tag)

    async def post_check(self, ctx: ActionContext) -> None:
        conf = pack_config(ctx, CassandraConfig, "post_check")
        tag = snapshot_tag(ctx.task.task_id)
        listing = (await Nodetool(conf).run("post_check", "listsnapshots")).output
        if not any(line.split()[:1] == [tag] for line in listing.splitlines()):
            raise ActionFailed("post_check", f"nodetool listsnapshots does not list {tag}")
