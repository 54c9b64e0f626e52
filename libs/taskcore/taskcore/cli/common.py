"""What the `taskerman` commands share: exit codes, connections that fail within seconds (the
services reconnect forever; a command must instead name the server it could not reach), the user
name actions are recorded under, and the task flags of `submit` and `plan` with their parsing."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import sys
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus import audit
from taskcore.bus import jetstream as bus
from taskcore.bus.tracking import StatusStore
from taskcore.cli import render
from taskcore.coord.session import ZkSession
from taskcore.core import subjects
from taskcore.core.actions import ActionRegistry
from taskcore.core.errors import CredentialsError, InvalidTask, TaskermanError
from taskcore.core.model import PlanReply, Task, WorkqueueArgs, check_task, invalid_from, with_task_id
from taskcore.core.settings import Settings
from taskcore.obs import tracing

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
EXIT_INTERRUPTED = 130
CONNECT_TIMEOUT = 15.0  # ZooKeeper (a session waits out an election) and provisioning
NATS_CONNECT_TIMEOUT = 5.0  # a NATS client moves on to the next server at once
SERVER_HINT = (
    "Is it running, and are TASKERMAN_NATS_URL and TASKERMAN_ZK_HOSTS right? (`taskerman dev up` "
    "starts a local stack; `taskerman dev status` shows where it listens)"
)
PLAN_TIMEOUT = 20.0  # discovery may ask DNS or a cloud API


class Unreachable(TaskermanError):
    """A server a command needs did not answer in time."""


def user() -> str:
    """Who the audit trail records for an operator's command: `cli:<login>`."""
    return audit.actor(f"cli:{getpass.getuser()}")


# --- connections -----------------------------------------------------------------------------------------


async def connect_nats(settings: Settings, name: str = "taskerman-cli") -> NATS:
    """A NATS connection, or Unreachable after NATS_CONNECT_TIMEOUT."""
    try:
        return await asyncio.wait_for(bus.connect(settings, name), NATS_CONNECT_TIMEOUT)
    except CredentialsError:
        raise
    except Exception as e:
        why = "no answer" if isinstance(e, TimeoutError) else repr(e)
        raise Unreachable(
            f"NATS at {settings.nats_url} is unreachable ({why} in {NATS_CONNECT_TIMEOUT:g}s). {SERVER_HINT}"
        ) from e


async def connect_jetstream(settings: Settings) -> tuple[NATS, JetStreamContext, StatusStore]:
    """A NATS connection with the streams provisioned and the status bucket; Unreachable otherwise."""
    nc = await connect_nats(settings)
    js = nc.jetstream()
    try:
        await bus.provision(js, settings, within=CONNECT_TIMEOUT)
        return nc, js, StatusStore(await bus.status_bucket(js))
    except bus.UNAVAILABLE as e:
        await bus.close(nc)
        raise Unreachable(f"JetStream at {settings.nats_url} is unavailable: {e!r}") from e


@contextlib.asynccontextmanager
async def connect_zookeeper(settings: Settings) -> AsyncIterator[ZkSession]:
    """A ZooKeeper session, or Unreachable after CONNECT_TIMEOUT."""
    session = ZkSession.from_settings(settings)
    try:
        await asyncio.wait_for(session.__aenter__(), CONNECT_TIMEOUT)
    except TimeoutError as e:
        await session.__aexit__(None, None, None)
        raise Unreachable(
            f"ZooKeeper at {settings.zk_hosts} did not answer in {CONNECT_TIMEOUT:g}s. {SERVER_HINT}"
        ) from e
    try:
        yield session
    finally:
        await session.__aexit__(None, None, None)


# the help of arguments many commands share
JSON_HELP = "print JSON instead of the table (for scripts)"
TASK_ID_HELP = "the task's id, as `submit` printed it (`taskerman tasks` lists them)"
CLUSTER_HELP = "the cluster's name, e.g. demo:web"
SCHEDULE_HELP = "the schedule's name (`schedules list`)"


def examples(*lines: str) -> dict[str, Any]:
    """`add_parser` keywords that end a command's --help with examples, printed as written."""
    text = "examples:\n" + "\n".join(f"  {line}" for line in lines)
    return {"epilog": text, "formatter_class": argparse.RawDescriptionHelpFormatter}


# --- the task flags (`submit`, `plan`) ---------------------------------------------------------------------


def add_task_options(p: argparse.ArgumentParser) -> None:
    """The options that describe a task."""
    p.add_argument("action", help="installed action, <pack>:<name>")
    p.add_argument("--cluster", required=True, help=CLUSTER_HELP)
    p.add_argument(
        "--limit",
        type=share,
        default=1,
        help="at most this many nodes act at once (m): a number, or a percentage of the task's nodes "
        "(e.g. 25%%: rounded down, at least 1)",
    )
    p.add_argument(
        "--max-failures",
        type=share,
        help="the task stops once more nodes than this are dead: a number, or a percentage of its "
        "nodes (e.g. 10%%); default 0",
    )
    p.add_argument("--node", action="append", default=[], help="target node (skips discovery); repeatable")
    p.add_argument("--arg", action="append", default=[], help="action argument key=value; repeatable")
    p.add_argument("--retries", type=int, help="retries per node before dead-lettering")
    p.add_argument(
        "--owner", default="", help="who the task is for, recorded with it (status, events, tasks)"
    )
    p.add_argument(
        "--task-id",
        help="a stable id (default: a new one): the same task submitted again with it is a duplicate, "
        "a different task with it is refused",
    )
    p.add_argument("--discovery", help="discovery plugin (default: static)")
    p.add_argument("--routing", help="routing plugin (default: name, or zone with --topology)")
    p.add_argument("--topology", choices=["zone", "rack"], help="one zone (or rack) at a time")
    p.add_argument(
        "--canary",
        type=int,
        help="the first K nodes of the plan run alone and must all succeed before the rest start",
    )
    p.add_argument(
        "--deadline",
        help="a node that has not started this long after routing gives up (expired); e.g. 90s, 30m, 6h, 2d",
    )


def share(text: str) -> int | str:
    """`--limit` / `--max-failures`: a whole number, or a percentage kept as text ("25%") for the
    router to resolve; its range is checked with the task (`percent.check`)."""
    if text.strip().endswith("%"):
        return text.strip()
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number or a percentage of the task's nodes such as 25%, got {text!r}"
        ) from None


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, option: str) -> float:
    """`90`, `90s`, `30m`, `6h`, `2d` → seconds (> 0)."""
    raw = text.strip().lower()
    unit = DURATION_UNITS.get(raw[-1:], 0)
    number = raw[:-1] if unit else raw
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise InvalidTask(f"expected a duration such as 90s, 30m, 6h or 2d, got {text!r}", field=option)
    return seconds


def parse_arg(text: str) -> tuple[str, Any]:
    """`k=v`: v as JSON when it parses (numbers, true/false, lists), else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise InvalidTask(f"expected key=value, got {text!r}", field="--arg")
    try:
        return key, msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return key, raw


def build_task(args: argparse.Namespace, registry: ActionRegistry) -> Task:
    """The task the task flags describe, fully validated (exit 2 material otherwise)."""
    action_args = dict(parse_arg(a) for a in args.arg)
    params: dict[str, Any] = {"action_args": action_args}
    for option in ("topology", "routing"):
        if value := getattr(args, option, None):
            params[option] = value
    if deadline := getattr(args, "deadline", None):
        params["deadline_s"] = parse_duration(deadline, "--deadline")
    if canary := getattr(args, "canary", None):
        params["canary"] = canary
    if (max_failures := getattr(args, "max_failures", None)) is not None:
        params["max_failures"] = max_failures
    if args.retries is not None:
        params["workqueue_args"] = msgspec.structs.asdict(WorkqueueArgs(retry_count=args.retries))
    raw = {
        "action": args.action,
        "cluster_name": args.cluster,
        "limit": args.limit,
        "owner": args.owner,
        "task_id": args.task_id or "",
        "nodes": args.node,
        "taskerman_params": params,
    }
    if discovery := getattr(args, "discovery", None):
        raw["discovery"] = discovery
    try:
        task = msgspec.convert(raw, Task)
    except msgspec.ValidationError as e:
        raise invalid_from(e) from e
    check_task(task)
    registry.resolve(task)
    return with_task_id(task)


# --- the plan preview (`plan`, `submit --dry-run`) ---------------------------------------------------------


async def request_plan(settings: Settings, task: Task) -> PlanReply | None:
    """A router's plan of `task` (`taskerman.api.plan`); None when no router answers."""
    nc = await connect_nats(settings)
    try:
        return await plan_via(nc, task)
    finally:
        await bus.close(nc)


async def plan_via(nc: NATS, task: Task, wait: float = PLAN_TIMEOUT) -> PlanReply | None:
    """`request_plan` on a connection of the caller's."""
    try:
        msg = await nc.request(
            subjects.PLAN_SUBJECT,
            msgspec.json.encode(task),
            timeout=wait,
            headers=tracing.inject_headers(),
        )
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return None
    return msgspec.json.decode(msg.data, type=PlanReply)


async def preview(args: argparse.Namespace, settings: Settings) -> int:
    """Print which nodes the flags' task would reach, in which order and waves, under which leases,
    without running anything (`taskerman plan …` and `taskerman submit … --dry-run`)."""
    try:
        task = build_task(args, ActionRegistry.installed())
    except InvalidTask as e:
        print(f"taskerman plan: invalid task: {e}", file=sys.stderr)
        return EXIT_INVALID
    try:
        reply = await request_plan(settings, task)
    except Unreachable as e:
        print(f"taskerman plan: {e}", file=sys.stderr)
        return EXIT_FAILED
    if reply is None:
        print(
            f"taskerman plan: no router answered on {subjects.PLAN_SUBJECT} within {PLAN_TIMEOUT:.0f}s "
            "(is taskerman-router running, and a version that serves plans?)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if reply.plan is None:
        where = f"{reply.field}: " if reply.field else ""
        print(f"taskerman plan: cannot route the task: {where}{reply.error}", file=sys.stderr)
        return EXIT_INVALID if reply.field else EXIT_FAILED
    if args.json:
        print(msgspec.json.encode(reply.plan).decode())
    else:
        print("\n".join(render.plan_text(reply.plan)))
    return EXIT_OK
