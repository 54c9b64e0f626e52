"""The commands on tasks: `submit`, `publish`, `status`, `watch`, `tasks`, `cancel`, `pause`,
`resume`, `events`, `trace`."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import get_args

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from rich.console import Console

from taskcore.bus import audit, submission
from taskcore.bus import jetstream as bus
from taskcore.bus.submission import SubmitReply
from taskcore.bus.tracking import PauseRecord, StopRecord
from taskcore.cli import common, render
from taskcore.cli.command import ServerCommand, Subparsers
from taskcore.cli.common import EXIT_FAILED, EXIT_INVALID, EXIT_OK
from taskcore.core import subjects
from taskcore.core.actions import ActionRegistry
from taskcore.core.errors import InvalidTask
from taskcore.core.model import TASK_FINISHED, Task, TaskStateName, decode_task
from taskcore.core.settings import Settings
from taskcore.obs import tracing
from taskcore.packs.canary import Ping

STATES = list(get_args(TaskStateName))


class Submit(ServerCommand):
    """`taskerman submit ACTION --cluster C ...`: through a scheduler's API when one answers, else
    straight onto the TASKS stream."""

    name = "submit"

    def add_parser(self, subparsers: Subparsers) -> None:
        s = subparsers.add_parser(
            self.name,
            help="submit a task",
            **common.examples(
                "taskerman submit demo:restart --cluster demo:web --limit 2 --wait",
                "taskerman submit demo:restart --cluster demo:web --limit 10% --canary 1 --deadline 6h",
                "taskerman submit demo:restart --cluster demo:web --node node-1 --arg health_timeout=30",
                "taskerman submit demo:restart --cluster demo:web --dry-run   # the plan, nothing runs",
            ),
        )
        common.add_task_options(s)
        s.add_argument("--wait", action="store_true", help="show progress; exit 0 on success, 1 on failure")
        s.add_argument("--json", action="store_true", help=common.JSON_HELP)
        s.add_argument(
            "--dry-run", action="store_true", help="show the plan (`taskerman plan`); submit nothing"
        )

    async def exec(self, args: argparse.Namespace, settings: Settings) -> int:
        if args.dry_run:
            return await common.preview(args, settings)
        try:
            task = common.build_task(args, ActionRegistry.installed())
        except InvalidTask as e:
            print(f"taskerman submit: invalid task: {e}", file=sys.stderr)
            return EXIT_INVALID
        nc, js, status = await common.connect_jetstream(settings)
        try:
            if (refused := await _routable(nc, task)) is not None:
                return refused
            with tracing.tracer(__name__).start_as_current_span(
                "submit", attributes={"task_id": task.task_id}
            ):
                reply = await submit_via_api(nc, task) or await submission.submit(
                    js, status, task, by=common.user()
                )
            if reply.retryable:
                print(f"taskerman submit: {reply.error}", file=sys.stderr)
                return EXIT_FAILED
            if reply.error:
                print(f"taskerman submit: invalid task: {reply.error}", file=sys.stderr)
                return EXIT_INVALID
            if reply.duplicate and not args.json:
                print(f"task {task.task_id} was already submitted; not submitting it again", file=sys.stderr)
            if args.wait and args.json:  # one JSON document: the outcome, as `status --json`
                code = await render.watch(status, task.task_id, quiet=True)
                print(msgspec.json.encode(await status.view(task.task_id)).decode())
                return code
            print(msgspec.json.encode({"task_id": task.task_id}).decode() if args.json else task.task_id)
            if args.wait:
                return await render.watch(status, task.task_id)
            return EXIT_OK
        finally:
            await bus.close(nc)


async def _routable(nc: NATS, task: Task) -> int | None:
    """Ask a router first whether it can route the task, so that an unknown cluster, discovery or
    routing plugin or a topology its nodes lack is an error now (exit 2), not a dead letter later;
    nodes no runner serves are a warning. None: submit it (no router answering is no objection:
    it will be checked when it is routed)."""
    reply = await common.plan_via(nc, task, wait=CHECK_TIMEOUT)
    if reply is None:
        return None
    if reply.plan is None:
        where = f"{reply.field}: " if reply.field else ""
        print(f"taskerman submit: the router cannot route this task: {where}{reply.error}", file=sys.stderr)
        return EXIT_INVALID  # the router would dead-letter it as it is (discovery included)
    if unserved := reply.plan.unserved:
        shown = ", ".join(unserved[:10]) + (" …" if len(unserved) > 10 else "")
        print(
            f"warning: {len(unserved)} node(s) have no runner and will be recorded unserved: {shown}",
            file=sys.stderr,
        )
    return None


CHECK_TIMEOUT = 5.0  # seconds a router may take to check a task before it is submitted anyway


async def submit_via_api(nc: NATS, task: Task) -> SubmitReply | None:
    """Submit through a scheduler's `taskerman.api.submit`; None when no scheduler answers."""
    try:
        msg = await nc.request(
            subjects.SUBMIT_SUBJECT, msgspec.json.encode(task), timeout=10, headers=tracing.inject_headers()
        )
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return None
    return msgspec.json.decode(msg.data, type=SubmitReply)


class Publish(ServerCommand):
    """`taskerman publish [FILE|-]`: a task's raw JSON onto `tasks.global`, as `nats pub
    tasks.global '<json>'` does, for machines without the `nats` CLI. The bytes go out unchanged;
    what the router would only dead-letter is refused here first, so a typo costs an error message,
    not a dead letter: JSON that does not parse or breaks the wire contract exits 2 and nothing is
    published. Whether the action is installed is the router's to say (this host may not have the
    packs the runners have). A task without `task_id` gets one as its `Nats-Msg-Id`, which the
    router takes for its id, so the id printed is the one `status` knows."""

    name = "publish"

    def add_parser(self, subparsers: Subparsers) -> None:
        p = subparsers.add_parser(
            self.name,
            help="publish a task's raw JSON (from a file or stdin) to tasks.global",
            description="Publish a task as raw JSON to tasks.global, as `nats pub tasks.global '<json>'` "
            'does. Example: echo \'{"action": "test:sleep", "cluster_name": "demo:web"}\' '
            "| taskerman publish -",
        )
        p.add_argument(
            "file", nargs="?", default="-", metavar="FILE|-", help="the task's JSON; - (default) reads stdin"
        )
        p.add_argument("--wait", action="store_true", help="show progress; exit 0 on success, 1 otherwise")
        p.add_argument("--json", action="store_true", help='print {"task_id": ...}')

    async def exec(self, args: argparse.Namespace, settings: Settings) -> int:
        source = "stdin" if args.file == "-" else repr(args.file)
        try:
            data = await asyncio.to_thread(_read_input, args.file)
        except OSError as e:
            print(f"taskerman publish: cannot read {source}: {e.strerror or e}", file=sys.stderr)
            return EXIT_INVALID
        if not data.strip():
            print(f"taskerman publish: no task in {source}: expected one JSON object", file=sys.stderr)
            return EXIT_INVALID
        try:
            task = decode_task(data)
        except InvalidTask as e:
            print(f"taskerman publish: invalid task in {source}: {e}; nothing published", file=sys.stderr)
            return EXIT_INVALID
        task_id = task.task_id or uuid.uuid4().hex[:16]
        nc, js, status = await common.connect_jetstream(settings)
        try:
            with tracing.tracer(__name__).start_as_current_span("publish", attributes={"task_id": task_id}):
                ack = await bus.publish(js, subjects.GLOBAL, data, msg_id=task_id)
            if ack.duplicate and not args.json:
                print(f"task {task_id} was already published; not publishing it again", file=sys.stderr)
            print(msgspec.json.encode({"task_id": task_id}).decode() if args.json else task_id)
            if args.wait:
                return await render.watch(status, task_id, quiet=args.json)
            return EXIT_OK
        finally:
            await bus.close(nc)


def _read_input(file: str) -> bytes:
    """The bytes of FILE, or of stdin for `-`."""
    return sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()


class Status(ServerCommand):
    """`taskerman status TASK_ID`: a task's state, plan and nodes."""

    name = "status"

    def add_parser(self, subparsers: Subparsers) -> None:
        st = subparsers.add_parser(
            self.name,
            help="a task's state and its nodes",
            **common.examples("taskerman status 7f3a…", "taskerman status 7f3a… --json | jq .nodes"),
        )
        st.add_argument("task_id", help=common.TASK_ID_HELP)
        st.add_argument("--json", action="store_true", help=common.JSON_HELP)

    async def exec(self, args: argparse.Namespace, settings: Settings) -> int:
        nc, _js, status = await common.connect_jetstream(settings)
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
        head = f"task {view.task_id}  {view.action} on {view.cluster_name}  limit {render.limit_text(view)}"
        print(f"{head}  state {view.state}")
        owner = f"  owner {view.owner}" if view.owner else ""
        print(f"  created {render.when(view.created_at)}{owner}")
        if view.paused:
            p = view.paused
            why = f": {p.reason}" if p.reason else ""
            print(
                f"  paused by {p.by} {render.ago(p.at, time.time())}{why}; `taskerman resume {view.task_id}`"
            )
        if view.error:
            print(f"  error: {view.error}")
        if view.plan:
            print(f"  plan ({f'one {view.topology} at a time' if view.topology else 'ideal waves'}):")
            print("\n".join(render.wave_lines(view.plan, view.topology, indent="    ")))
        for node, rec in sorted(view.nodes.items()):
            took = f"{rec.finished_at - rec.started_at:.1f}s" if rec.started_at and rec.finished_at else "-"
            err = f"  {rec.error}" if rec.error else ""
            started = f" started {render.when(rec.started_at)}" if rec.started_at else ""
            print(f"  {node:<24} {rec.state:<10} attempts={rec.attempts}{started} took={took}{err}")
            if (w := rec.waiting_for) is not None and rec.state not in render.FINISHED_NODE:
                print(f"    waiting {max(time.time() - w.since, 0.0):.0f}s for: {render.wait_text(w)}")
        return EXIT_OK


class Watch(ServerCommand):
    """`taskerman watch TASK_ID`: live progress; exits with the task's outcome."""

    name = "watch"

    def add_parser(self, subparsers: Subparsers) -> None:
        w = subparsers.add_parser(self.name, help="live progress of a task; exits with its outcome")
        w.add_argument("task_id", help=common.TASK_ID_HELP)

    async def exec(self, args: argparse.Namespace, settings: Settings) -> int:
        nc, _js, status = await common.connect_jetstream(settings)
        try:
            if await status.get_task(args.task_id) is None:
                print(f"taskerman watch: unknown task {args.task_id!r}", file=sys.stderr)
                return EXIT_FAILED
            return await render.watch(status, args.task_id)
        finally:
            await bus.close(nc)


CANARY_ACTION = Ping.name  # the heartbeat canary's action


class Tasks(ServerCommand):
    """`taskerman tasks`: recent tasks, newest first."""

    name = "tasks"

    def add_parser(self, subparsers: Subparsers) -> None:
        tl = subparsers.add_parser(self.name, help="recent tasks, newest first")
        tl.add_argument("--state", choices=STATES, help="only tasks in this state")
        tl.add_argument("--cluster", help="only tasks of this cluster")
        tl.add_argument(
            "--rows",
            type=int,
            default=50,
            help="at most this many rows (default 50); --limit is the m of a task",
        )
        tl.add_argument("--limit", dest="rows", type=int, help=argparse.SUPPRESS)  # the earlier spelling
        tl.add_argument(
            "--canary", action="store_true", help=f"show the heartbeat canary's {CANARY_ACTION} tasks too"
        )
        tl.add_argument("--json", action="store_true", help=common.JSON_HELP)

    async def exec(self, args: argparse.Namespace, settings: Settings) -> int:
        nc, _js, status = await common.connect_jetstream(settings)
        try:
            records = sorted(await status.tasks(), key=lambda r: r.created_at, reverse=True)
            if args.cluster:
                records = [r for r in records if r.task and r.task.cluster_name == args.cluster]
            if not args.canary:  # one every few seconds: they would fill the list
                records = [r for r in records if r.task and r.task.action != CANARY_ACTION]
            found = []
            for rec in records:
                view = await status.view(rec.task.task_id) if rec.task else None
                if view is not None and (not args.state or view.state == args.state):
                    found.append(view)
                if len(found) >= args.rows:
                    break
        finally:
            await bus.close(nc)
        if args.json:
            print(msgspec.json.encode(found).decode())
        else:
            Console().print(render.tasks_table(found))
        return EXIT_OK


class Cancel(ServerCommand):
    """`taskerman cancel TASK_ID`: nodes not yet started will not run."""

    name = "cancel"

    def add_parser(self, subparsers: Subparsers) -> None:
        c = subparsers.add_parser(
            self.name,
            help="stop a task: nodes not yet started will not run",
            **common.examples('taskerman cancel 7f3a… --reason "wrong cluster"'),
        )
        c.add_argument("task_id", help=common.TASK_ID_HELP)
        c.add_argument("--reason", default="", help="recorded with the stop and in the audit trail")

    async def exec(self, args: argparse.Namespace, settings: Settings) -> int:
        nc, js, status = await common.connect_jetstream(settings)
        try:
            if await status.get_task(args.task_id) is None:
                print(f"taskerman cancel: unknown task {args.task_id!r}", file=sys.stderr)
                return EXIT_FAILED
            rec = StopRecord(reason="cancelled", detail=args.reason or "", by=common.user(), at=time.time())
            if await status.stop(args.task_id, rec):
                await audit.Audit(js, rec.by).record("cancelled", task_id=args.task_id, detail=rec.detail)
                print(f"task {args.task_id} cancelled: nodes not yet started will not run")
            else:
                prior = await status.stopped(args.task_id)
                print(f"task {args.task_id} was already stopped ({prior.reason if prior else '?'})")
            return EXIT_OK
        finally:
            await bus.close(nc)


class Pause(ServerCommand):
    """`taskerman pause TASK_ID`: nodes running finish; nothing new starts until `resume`."""

    name = "pause"

    def add_parser(self, subparsers: Subparsers) -> None:
        p = subparsers.add_parser(
            self.name, help="pause a task: running nodes finish, nothing new starts until resume"
        )
        p.add_argument("task_id", help=common.TASK_ID_HELP)
        p.add_argument("--reason", default="", help="recorded with the pause and in the audit trail")

    async def exec(self, args: argparse.Namespace, settings: Settings) -> int:
        nc, js, status = await common.connect_jetstream(settings)
        try:
            view = await status.view(args.task_id)
            if view is None:
                print(f"taskerman pause: unknown task {args.task_id!r}", file=sys.stderr)
                return EXIT_FAILED
            if view.state in TASK_FINISHED:
                print(f"taskerman pause: task {args.task_id} has ended ({view.state})", file=sys.stderr)
                return EXIT_FAILED
            rec = PauseRecord(by=common.user(), at=time.time(), reason=args.reason or "")
            if not await status.pause(args.task_id, rec):
                prior = await status.paused(args.task_id)
                print(f"task {args.task_id} was already paused (by {prior.by if prior else '?'})")
                return EXIT_OK
            await audit.Audit(js, rec.by).record("paused", task_id=args.task_id, detail=rec.reason)
            print(
                f"task {args.task_id} paused: running nodes finish, nothing new starts; "
                f"`taskerman resume {args.task_id}` lets it go on"
            )
            return EXIT_OK
        finally:
            await bus.close(nc)


class Resume(ServerCommand):
    """`taskerman resume TASK_ID`: a paused task's waiting nodes queue again, in plan order."""

    name = "resume"

    def add_parser(self, subparsers: Subparsers) -> None:
        p = subparsers.add_parser(self.name, help="resume a paused task")
        p.add_argument("task_id", help=common.TASK_ID_HELP)

    async def exec(self, args: argparse.Namespace, settings: Settings) -> int:
        nc, js, status = await common.connect_jetstream(settings)
        try:
            if await status.get_task(args.task_id) is None:
                print(f"taskerman resume: unknown task {args.task_id!r}", file=sys.stderr)
                return EXIT_FAILED
            lifted = await status.resume(args.task_id)
            if lifted is None:
                print(f"task {args.task_id} is not paused")
                return EXIT_OK
            paused_for = max(time.time() - lifted.at, 0.0)
            detail = f"paused by {lifted.by} for {paused_for:.0f}s"
            await audit.Audit(js, common.user()).record("resumed", task_id=args.task_id, detail=detail)
            print(f"task {args.task_id} resumed ({detail})")
            return EXIT_OK
        finally:
            await bus.close(nc)


class Events(ServerCommand):
    """`taskerman events TASK_ID`: the task's audit trail, in order."""

    name = "events"

    def add_parser(self, subparsers: Subparsers) -> None:
        ev = subparsers.add_parser(self.name, help="a task's audit trail, in order")
        ev.add_argument("task_id", help=common.TASK_ID_HELP)
        ev.add_argument("--json", action="store_true", help=common.JSON_HELP)

    async def exec(self, args: argparse.Namespace, settings: Settings) -> int:
        nc, js, _status = await common.connect_jetstream(settings)
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
            where = e.node or "-"
            print(f"{render.when(e.at, ms=True)}  {e.kind:<18} {where:<16} {e.detail}  [{e.by}]")
        return EXIT_OK


class Trace(ServerCommand):
    """`taskerman trace TASK_ID`: the task's traces from the local span file (no server needed)."""

    name = "trace"

    def add_parser(self, subparsers: Subparsers) -> None:
        tr = subparsers.add_parser(
            self.name, help="a task's traces as a waterfall (from the local span file)"
        )
        tr.add_argument("task_id", help=common.TASK_ID_HELP)
        tr.add_argument("--spans", type=Path, help="a spans.jsonl file (default: $TASKERMAN_HOME/traces/)")
        tr.add_argument("--json", action="store_true", help=common.JSON_HELP)

    def run(self, args: argparse.Namespace, settings: Settings) -> int:
        """Without an event loop: it only reads a file."""
        home = args.spans.parent.parent if args.spans else settings.home
        traces = render.task_traces(tracing.read_spans(home), args.task_id)
        if not traces:
            where = home / tracing.SPAN_FILE
            print(f"taskerman trace: no spans for task {args.task_id!r} in {where}", file=sys.stderr)
            return EXIT_FAILED
        if args.json:
            print(msgspec.json.encode(traces).decode())
            return EXIT_OK
        for trace_id, spans in sorted(traces.items(), key=lambda kv: min(s.start for s in kv[1])):
            print(f"trace {trace_id}  ({len(spans)} spans)")
            for line in render.waterfall(spans):
                print(f"  {line}")
        return EXIT_OK

    async def exec(self, args: argparse.Namespace, settings: Settings) -> int:
        return self.run(args, settings)
