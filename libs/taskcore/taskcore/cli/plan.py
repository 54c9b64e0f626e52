"""`taskerman plan` and `taskerman submit --dry-run`: ask a router (`taskerman.api.plan`) which
nodes a task would reach, in which order and waves, under which leases, without running anything."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
import nats.errors

from taskcore.bus import jetstream as bus
from taskcore.cli import connect
from taskcore.core import subjects
from taskcore.core.actions import ActionRegistry
from taskcore.core.errors import InvalidTask
from taskcore.core.model import Plan, PlanReply, Task, Wave
from taskcore.core.settings import Settings
from taskcore.obs import tracing

Command = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
PLAN_TIMEOUT = 20.0  # discovery may ask DNS or a cloud API


def add_task_options(p: argparse.ArgumentParser) -> None:
    """The options that describe a task (shared by `submit` and `plan`)."""
    p.add_argument("action", help="installed action, <pack>:<name>")
    p.add_argument("--cluster", required=True)
    p.add_argument("--limit", type=int, default=1, help="at most this many nodes act at once (m)")
    p.add_argument("--node", action="append", default=[], help="target node (skips discovery); repeatable")
    p.add_argument("--arg", action="append", default=[], help="action argument key=value; repeatable")
    p.add_argument("--retries", type=int, help="retries per node before dead-lettering")
    p.add_argument("--owner", default="")
    p.add_argument("--task-id")
    p.add_argument("--discovery", help="discovery plugin (default: static)")
    p.add_argument("--routing", help="routing plugin (default: name, or zone with --topology)")
    p.add_argument("--topology", choices=["zone", "rack"], help="one zone (or rack) at a time")


def add_parsers(sub: Any) -> None:
    """Add this module's sub-commands to the `taskerman` parser."""
    p = sub.add_parser("plan", help="preview a task's nodes, order, waves and leases; runs nothing")
    add_task_options(p)
    p.add_argument("--json", action="store_true")


def task_from_args(args: argparse.Namespace) -> Task:
    """The task the flags describe (cli.build_task)."""
    from taskcore.cli import main as cli  # noqa: PLC0415 - cli imports this module

    return cli.build_task(args, ActionRegistry.installed())


async def request_plan(settings: Settings, task: Task) -> PlanReply | None:
    """A router's plan of `task`; None when no router answers."""
    nc = await connect.nats(settings)
    try:
        msg = await nc.request(
            subjects.PLAN_SUBJECT,
            msgspec.json.encode(task),
            timeout=PLAN_TIMEOUT,
            headers=tracing.inject_headers(),
        )
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return None
    finally:
        await bus.close(nc)
    return msgspec.json.decode(msg.data, type=PlanReply)


async def plan_cmd(args: argparse.Namespace, settings: Settings) -> int:
    """`taskerman plan …` and `taskerman submit … --dry-run`."""
    try:
        task = task_from_args(args)
    except InvalidTask as e:
        print(f"taskerman plan: invalid task: {e}", file=sys.stderr)
        return EXIT_INVALID
    try:
        reply = await request_plan(settings, task)
    except connect.Unreachable as e:
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
        print("\n".join(plan_text(reply.plan)))
    return EXIT_OK


def _attrs(attributes: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(attributes.items())) or "-"


def wave_lines(waves: tuple[Wave, ...], topology: str | None, indent: str = "  ") -> list[str]:
    """One line per wave: `wave 2  zone eu-1b  (2)  a, b`."""
    width = max((len(w.group) for w in waves), default=0)
    out = []
    for i, w in enumerate(waves, 1):
        label = f"{topology} {w.group:<{width}}  " if topology else ""
        out.append(f"{indent}wave {i:<3} {label}({len(w.nodes)})  {', '.join(w.nodes)}")
    return out


def plan_text(plan: Plan) -> list[str]:
    """The plan, readably."""
    task, topology = plan.task, plan.task.taskerman_params.topology
    source = "explicit targets" if plan.discovery == "explicit" else f"discovery {plan.discovery!r}"
    lines = [
        f"plan for {task.action} on {task.cluster_name}  (task {task.task_id}; nothing was submitted)",
        f"{len(plan.nodes)} node(s) from {source}, ordered by routing {plan.routing!r}"
        + (f", topology {topology!r}: one {topology} at a time" if topology else ""),
        "order:",
    ]
    wave_of = {n: i for i, w in enumerate(plan.waves, 1) for n in w.nodes}
    width = max((len(n.name) for n in plan.nodes), default=4)
    for i, node in enumerate(plan.nodes, 1):
        wave = wave_of.get(node.name, "-")
        lines.append(f"  {i:>3}. {node.name:<{width}}  wave {wave:<3} {_attrs(node.attributes)}")
    if topology:
        lines.append(
            f"waves: one per {topology}, in this order; never two {topology}s at once; "
            f"within a wave at most {plan.concurrency} node(s) at once"
        )
    else:
        lines.append(
            f"waves: the ideal schedule, {plan.concurrency} node(s) at a time in this order "
            "(runners pull on their own: a node starts whenever a slot frees)"
        )
    lines += wave_lines(plan.waves, topology)
    lines.append("leases each node takes, in this order:")
    for lease in plan.leases:
        limit = "-" if lease.limit is None else str(lease.limit)
        lines.append(f"  {lease.name:<10} {limit:>3}  {lease.detail}")
    if plan.breaker:
        note = " (nothing starts until it is reset or cools down)" if plan.breaker == "open" else ""
        lines.append(f"breaker: {plan.breaker}{note}")
    return lines


COMMANDS: dict[str, Command] = {"plan": plan_cmd}
