"""The `taskerman` command: submit, status, dlq, dev."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from rich.console import Console

from taskcore.bus import audit, deadletter, submission
from taskcore.bus import jetstream as bus
from taskcore.bus.submission import SubmitReply
from taskcore.bus.tracking import StatusStore, StopRecord
from taskcore.cli import connect
from taskcore.cli import ops as cli_ops
from taskcore.cli import plan as cli_plan
from taskcore.cli import render as views
from taskcore.cli import schedules as cli_sched
from taskcore.core import subjects
from taskcore.core.actions import ActionRegistry
from taskcore.core.errors import InvalidTask, TaskermanError
from taskcore.core.model import Task, WorkqueueArgs, check_task, invalid_from, with_task_id
from taskcore.core.settings import Settings
from taskcore.obs import tracing

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
SERVER_VARS = ("TASKERMAN_NATS_URL", "TASKERMAN_ZK_HOSTS")  # unset: the running `dev up` stack's servers
COMMAND_MODULES = (cli_ops, cli_plan, cli_sched)  # each: add_parsers(sub) and COMMANDS


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
    """The task the submit flags describe, fully validated (exit 2 material otherwise)."""
    action_args = dict(parse_arg(a) for a in args.arg)
    params: dict[str, Any] = {"action_args": action_args}
    for option in ("topology", "routing"):
        if value := getattr(args, option, None):
            params[option] = value
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


async def _connect(settings: Settings) -> tuple[NATS, JetStreamContext, StatusStore]:
    nc = await connect.nats(settings)
    js = nc.jetstream()
    try:
        await bus.provision(js, settings, within=connect.CONNECT_TIMEOUT)
        return nc, js, StatusStore(await bus.status_bucket(js))
    except bus.UNAVAILABLE as e:
        await bus.close(nc)
        raise connect.Unreachable(f"JetStream at {settings.nats_url} is unavailable: {e!r}") from e


async def submit(args: argparse.Namespace, settings: Settings) -> int:
    if args.dry_run:
        return await cli_plan.plan_cmd(args, settings)
    try:
        task = build_task(args, ActionRegistry.installed())
    except InvalidTask as e:
        print(f"taskerman submit: invalid task: {e}", file=sys.stderr)
        return EXIT_INVALID
    nc, js, status = await _connect(settings)
    try:
        with tracing.tracer(__name__).start_as_current_span("submit", attributes={"task_id": task.task_id}):
            reply = await _submit_via_api(nc, task) or await submission.submit(
                js, status, task, by=audit.actor(f"cli:{getpass.getuser()}")
            )
        if reply.error:
            print(f"taskerman submit: invalid task: {reply.error}", file=sys.stderr)
            return EXIT_INVALID
        if reply.duplicate and not args.json:
            print(f"task {task.task_id} was already submitted; not submitting it again", file=sys.stderr)
        print(msgspec.json.encode({"task_id": task.task_id}).decode() if args.json else task.task_id)
        if args.wait:
            return await views.watch(status, task.task_id, quiet=args.json)
        return EXIT_OK
    finally:
        await bus.close(nc)


async def _submit_via_api(nc: NATS, task: Task) -> SubmitReply | None:
    """Submit through a scheduler's `taskerman.api.submit`; None when no scheduler answers."""
    try:
        msg = await nc.request(
            subjects.SUBMIT_SUBJECT, msgspec.json.encode(task), timeout=10, headers=tracing.inject_headers()
        )
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return None
    return msgspec.json.decode(msg.data, type=SubmitReply)


async def status_cmd(args: argparse.Namespace, settings: Settings) -> int:
    nc, _js, status = await _connect(settings)
    try:
        view = await status.view(args.task_id)
    finally:
        await bus.close(nc)
    if view is None:
        print(f"taskerman status: unknown task {args.task_id!r}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(msgspec.json.encode(view).decode())
        return EXIT_OK
    print(
        f"task {view.task_id}  {view.action} on {view.cluster_name}  limit {view.limit}  state {view.state}"
    )
    if view.error:
        print(f"  error: {view.error}")
    if view.plan:
        print(f"  plan ({f'one {view.topology} at a time' if view.topology else 'ideal waves'}):")
        print("\n".join(cli_plan.wave_lines(view.plan, view.topology, indent="    ")))
    for node, rec in sorted(view.nodes.items()):
        took = f"{rec.finished_at - rec.started_at:.1f}s" if rec.started_at and rec.finished_at else "-"
        err = f"  {rec.error}" if rec.error else ""
        print(f"  {node:<24} {rec.state:<10} attempts={rec.attempts} took={took}{err}")
    return EXIT_OK


async def dlq_cmd(args: argparse.Namespace, settings: Settings) -> int:
    nc, js, status = await _connect(settings)
    try:
        return await _dlq(args, js, status)
    finally:
        await bus.close(nc)


async def _dlq(args: argparse.Namespace, js: JetStreamContext, status: StatusStore) -> int:
    if args.dlq_cmd == "list":
        rows = [
            {
                "id": seq,
                "task_id": d.task_id,
                "cluster": d.cluster,
                "node": d.node,
                "reason": d.reason,
                "deliveries": d.deliveries,
                "trace_id": d.trace_id,
                "dead_at": d.dead_at,
            }
            for seq, d in await deadletter.entries(js)
        ]
        if args.json:
            print(msgspec.json.encode(rows).decode())
        else:
            for r in rows:
                node = r["node"] or "-"
                print(f"{r['id']:>6}  {r['task_id']:<20} {node:<16} x{r['deliveries']}  {r['reason']}")
            print(f"{len(rows)} dead letter(s)")
        return EXIT_OK
    if args.dlq_cmd == "show":
        letter = await deadletter.get(js, args.id)
        if letter is None:
            print(f"taskerman dlq: no dead letter {args.id}", file=sys.stderr)
            return EXIT_FAILED
        print(msgspec.json.format(msgspec.json.encode(letter)).decode())
        return EXIT_OK
    if args.dlq_cmd == "replay":
        ids = [seq for seq, _ in await deadletter.entries(js)] if args.all else [args.id]
        if not args.all and args.id is None:
            print("taskerman dlq replay: give an ID or --all", file=sys.stderr)
            return EXIT_INVALID
        failed = 0
        for seq in ids:
            try:
                letter = await deadletter.replay(js, status, seq)
            except deadletter.TruncatedPayload as e:
                print(f"taskerman dlq replay: {e}", file=sys.stderr)
                failed += 1
                continue
            if letter is None:
                print(f"no dead letter {seq}", file=sys.stderr)
                failed += 1
            else:
                await audit.Audit(js, _user()).record(
                    "replayed",
                    task_id=letter.task_id,
                    cluster=letter.cluster,
                    node=letter.node,
                    detail=f"dead letter {seq} ({letter.reason})",
                )
                print(f"replayed {seq} (task {letter.task_id}, node {letter.node or '-'})")
        return EXIT_FAILED if failed else EXIT_OK
    # purge
    if not args.yes:
        if not sys.stdin.isatty():
            print("taskerman dlq purge: refusing without --yes (no terminal to confirm on)", file=sys.stderr)
            return EXIT_INVALID
        answer = await asyncio.to_thread(input, "Remove every dead letter? [y/N] ")
        if answer.strip().lower() != "y":
            print("nothing removed")
            return EXIT_OK
    print(f"purged {await deadletter.purge(js)} dead letter(s)")
    return EXIT_OK


async def watch_cmd(args: argparse.Namespace, settings: Settings) -> int:
    nc, _js, status = await _connect(settings)
    try:
        if await status.get_task(args.task_id) is None:
            print(f"taskerman watch: unknown task {args.task_id!r}", file=sys.stderr)
            return EXIT_FAILED
        return await views.watch(status, args.task_id)
    finally:
        await bus.close(nc)


async def tasks_cmd(args: argparse.Namespace, settings: Settings) -> int:
    nc, _js, status = await _connect(settings)
    try:
        records = sorted(await status.tasks(), key=lambda r: r.created_at, reverse=True)
        if args.cluster:
            records = [r for r in records if r.task and r.task.cluster_name == args.cluster]
        found = []
        for rec in records:
            view = await status.view(rec.task.task_id) if rec.task else None
            if view is not None and (not args.state or view.state == args.state):
                found.append(view)
            if len(found) >= args.limit:
                break
    finally:
        await bus.close(nc)
    if args.json:
        print(msgspec.json.encode(found).decode())
    else:
        Console().print(views.tasks_table(found))
    return EXIT_OK


def trace_cmd(args: argparse.Namespace, settings: Settings) -> int:
    """Render a task's traces from the local span file (or a file given with --spans)."""
    home = args.spans.parent.parent if args.spans else settings.home
    traces = views.task_traces(tracing.read_spans(home), args.task_id)
    if not traces:
        where = home / tracing.SPAN_FILE
        print(f"taskerman trace: no spans for task {args.task_id!r} in {where}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(msgspec.json.encode(traces).decode())
        return EXIT_OK
    for trace_id, spans in sorted(traces.items(), key=lambda kv: min(s.start for s in kv[1])):
        print(f"trace {trace_id}  ({len(spans)} spans)")
        for line in views.waterfall(spans):
            print(f"  {line}")
    return EXIT_OK


def _user() -> str:
    return audit.actor(f"cli:{getpass.getuser()}")


async def cancel_cmd(args: argparse.Namespace, settings: Settings) -> int:
    nc, js, status = await _connect(settings)
    try:
        if await status.get_task(args.task_id) is None:
            print(f"taskerman cancel: unknown task {args.task_id!r}", file=sys.stderr)
            return EXIT_FAILED
        rec = StopRecord(reason="cancelled", detail=args.reason or "", by=_user(), at=time.time())
        if await status.stop(args.task_id, rec):
            await audit.Audit(js, rec.by).record("cancelled", task_id=args.task_id, detail=rec.detail)
            print(f"task {args.task_id} cancelled: nodes not yet started will not run")
        else:
            prior = await status.stopped(args.task_id)
            print(f"task {args.task_id} was already stopped ({prior.reason if prior else '?'})")
        return EXIT_OK
    finally:
        await bus.close(nc)


async def events_cmd(args: argparse.Namespace, settings: Settings) -> int:
    nc, js, _status = await _connect(settings)
    try:
        events = await audit.task_events(js, args.task_id)
    finally:
        await bus.close(nc)
    if args.json:
        print(msgspec.json.encode(events).decode())
        return EXIT_OK
    if not events:
        print(f"no events for task {args.task_id!r}", file=sys.stderr)
        return EXIT_FAILED
    for e in events:
        when = time.strftime("%H:%M:%S", time.localtime(e.at)) + f".{int(e.at % 1 * 1000):03d}"
        where = e.node or "-"
        print(f"{when}  {e.kind:<18} {where:<16} {e.detail}  [{e.by}]")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="taskerman", description="Safe rolling maintenance for datastore fleets."
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("submit", help="submit a task")
    cli_plan.add_task_options(s)
    s.add_argument("--wait", action="store_true", help="show progress; exit 0 on success, 1 on failure")
    s.add_argument("--json", action="store_true")
    s.add_argument("--dry-run", action="store_true", help="show the plan (`taskerman plan`); submit nothing")

    st = sub.add_parser("status", help="a task's state and its nodes")
    st.add_argument("task_id")
    st.add_argument("--json", action="store_true")

    w = sub.add_parser("watch", help="live progress of a task; exits with its outcome")
    w.add_argument("task_id")

    tl = sub.add_parser("tasks", help="recent tasks, newest first")
    tl.add_argument("--state", choices=["pending", "routed", "running", "succeeded", "failed", "dead"])
    tl.add_argument("--cluster")
    tl.add_argument("--limit", type=int, default=50)
    tl.add_argument("--json", action="store_true")

    tr = sub.add_parser("trace", help="a task's traces as a waterfall (from the local span file)")
    tr.add_argument("task_id")
    tr.add_argument("--spans", type=Path, help="a spans.jsonl file (default: $TASKERMAN_HOME/traces/)")
    tr.add_argument("--json", action="store_true")

    c = sub.add_parser("cancel", help="stop a task: nodes not yet started will not run")
    c.add_argument("task_id")
    c.add_argument("--reason", default="")

    ev = sub.add_parser("events", help="a task's audit trail, in order")
    ev.add_argument("task_id")
    ev.add_argument("--json", action="store_true")

    d = sub.add_parser("dlq", help="the dead-letter queue")
    dsub = d.add_subparsers(dest="dlq_cmd", required=True)
    dl = dsub.add_parser("list")
    dl.add_argument("--json", action="store_true")
    dsub.add_parser("show").add_argument("id", type=int)
    dr = dsub.add_parser("replay")
    dr.add_argument("id", type=int, nargs="?")
    dr.add_argument("--all", action="store_true")
    dsub.add_parser("purge").add_argument("--yes", action="store_true")

    for module in COMMAND_MODULES:
        module.add_parsers(sub)

    dev = sub.add_parser("dev", help="the local stack")
    devsub = dev.add_subparsers(dest="dev_cmd", required=True)
    dup = devsub.add_parser("up")
    dup.add_argument("--runners", type=int, default=4)
    dup.add_argument(
        "--cluster-mode",
        action="store_true",
        help="3 clustered nats-servers and a 3-server ZooKeeper ensemble, streams at 3 replicas",
    )
    devsub.add_parser("down")
    devsub.add_parser("status").add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    if args.cmd != "dev" and not all(var in os.environ for var in SERVER_VARS):
        from taskerman_dev import devstack  # noqa: PLC0415 - only without the variables

        settings = devstack.with_stack_servers(settings, os.environ)
    commands: dict[str, Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]] = {
        "submit": submit,
        "status": status_cmd,
        "dlq": dlq_cmd,
        "cancel": cancel_cmd,
        "watch": watch_cmd,
        "tasks": tasks_cmd,
        "events": events_cmd,
        **{name: cmd for module in COMMAND_MODULES for name, cmd in module.COMMANDS.items()},
    }
    tracing.setup("taskerman-cli", settings.home)
    try:
        if args.cmd == "dev":
            return dev_cmd(args, settings)
        if args.cmd == "trace":
            return trace_cmd(args, settings)
        return asyncio.run(commands[args.cmd](args, settings))
    except TaskermanError as e:
        print(f"taskerman: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    finally:
        tracing.shutdown()


def dev_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from taskerman_dev import devstack  # noqa: PLC0415 - only the dev commands need the launchers

    if args.dev_cmd == "up":
        return devstack.up(settings, runners=args.runners, cluster_mode=args.cluster_mode)
    if args.dev_cmd == "down":
        return devstack.down(settings)
    return devstack.status(settings, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
