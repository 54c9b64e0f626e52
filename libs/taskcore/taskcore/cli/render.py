"""Operator views: live progress of a task (a rich progress bar on a terminal, plain lines
otherwise) with what its waiting nodes wait for, the list of recent tasks, traces as waterfalls,
and plans with their waves."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections import Counter

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from taskcore.bus.tracking import StatusStore, TaskView
from taskcore.core.model import CANARY_GROUP, TASK_FINISHED, Plan, Waiting, Wave
from taskcore.obs.tracing import SpanRecord

FINAL_OK = {"succeeded"}
BAD_NODE = {"failed", "dead"}  # the node states `outcome` lists with their errors
FINISHED_NODE = {"succeeded", "failed", "dead", "skipped", "cancelled", "expired", "unserved"}
STATE_STYLE = {
    "succeeded": "green",
    "running": "cyan",
    "failed": "red",
    "dead": "red",
    "cancelled": "yellow",
    "paused": "yellow",
    "pending": "white",
}
MAX_WAIT_LINES = 10  # distinct reasons `watch` shows; `status` lists every node
MAX_WAIT_NODES = 5  # nodes named per reason


def limit_text(view: TaskView) -> str:
    """`2`, `2 (25%)` once a percentage is resolved, `25%` before."""
    if view.limit_asked is None:
        return str(view.limit)
    return f"{view.limit} ({view.limit_asked})" if view.limit else view.limit_asked


def counts_text(view: TaskView) -> str:
    counts = Counter(rec.state for rec in view.nodes.values())
    return " ".join(f"{k}={v}" for k, v in sorted(counts.items()))


def progress_line(view: TaskView) -> str:
    """One plain line of progress (for logs, pipes and CI)."""
    if not view.nodes:
        return f"[{view.state:>9}] waiting for the router"
    done = sum(1 for rec in view.nodes.values() if rec.state == "succeeded")
    line = f"[{view.state:>9}] {done}/{len(view.nodes)} nodes succeeded  {counts_text(view)}"
    return line + paused_note(view)


def paused_note(view: TaskView) -> str:
    """What a paused task waits for, and the command that lets it go on."""
    if view.state != "paused" or view.paused is None:
        return ""
    return f"  paused by {view.paused.by}: `taskerman resume {view.task_id}` lets it go on"


def wait_text(w: Waiting) -> str:
    """`breaker open since … (reason …); `taskerman breaker reset demo:web` releases it`."""
    return f"{w.reason}; `{w.release}` releases it" if w.release else w.reason


def waiting_lines(view: TaskView, indent: str = "  ") -> list[str]:
    """What the task's waiting nodes wait for, one line per reason with the nodes it holds back:
    as many lines as reasons (at most MAX_WAIT_LINES), however many nodes wait."""
    by_reason: dict[tuple[str, str], list[str]] = {}
    for node, rec in sorted(view.nodes.items()):
        w = rec.waiting_for
        if w is not None and rec.state not in FINISHED_NODE:
            by_reason.setdefault((w.reason, w.release), []).append(node)
    lines = []
    for (reason, release), nodes in list(by_reason.items())[:MAX_WAIT_LINES]:
        shown = ", ".join(nodes[:MAX_WAIT_NODES])
        if len(nodes) > MAX_WAIT_NODES:
            shown += f" and {len(nodes) - MAX_WAIT_NODES} more"
        text = wait_text(Waiting(reason=reason, release=release))
        lines.append(f"{indent}waiting: {len(nodes)} node(s) ({shown}): {text}")
    if (more := len(by_reason) - MAX_WAIT_LINES) > 0:
        lines.append(f"{indent}waiting: {more} more reason(s); `taskerman status {view.task_id}` lists them")
    return lines


def outcome(view: TaskView, console: Console) -> int:
    """Print why a finished task failed; 0 on success, 1 otherwise."""
    if view.state in FINAL_OK:
        return 0
    for node, rec in sorted(view.nodes.items()):
        if rec.state in BAD_NODE:
            console.print(f"  {node}: {rec.state}: {rec.error}", markup=False, highlight=False)
    if view.error:
        console.print(f"  task: {view.error}", markup=False, highlight=False)
    return 1


async def watch(status: StatusStore, task_id: str, quiet: bool = False, poll: float = 0.5) -> int:
    """Show progress until the task ends; 0 on success, 1 on failure or dead letter. Interrupted
    (Ctrl-C), it says that the task goes on without us, and how to follow or stop it."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
    watching = asyncio.create_task(_watch(status, task_id, quiet, poll))
    ctrl_c = asyncio.create_task(interrupted.wait())
    try:
        await asyncio.wait({watching, ctrl_c}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ctrl_c.cancel()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGINT)
        if not watching.done():
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
    if watching.cancelled() or not watching.done():
        print(
            f"\ninterrupted: task {task_id} keeps running; `taskerman watch {task_id}` follows it again, "
            f"`taskerman cancel {task_id}` stops it",
            file=sys.stderr,
        )
        raise KeyboardInterrupt
    return watching.result()


async def _watch(status: StatusStore, task_id: str, quiet: bool, poll: float) -> int:
    console = Console(file=sys.stdout, quiet=quiet, soft_wrap=True)
    if console.is_terminal:
        return await _watch_live(status, task_id, console, poll)
    last = ""
    while True:
        view = await status.view(task_id)
        if view is not None:
            line = "\n".join([progress_line(view), *waiting_lines(view)])
            if line != last:
                console.print(line, markup=False, highlight=False)
                last = line
            if view.state in TASK_FINISHED:
                return outcome(view, console)
        await asyncio.sleep(poll)


async def _watch_live(status: StatusStore, task_id: str, console: Console, poll: float) -> int:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(task_id, total=None, counts="waiting for the router")
        shown: list[str] = []
        while True:
            view = await status.view(task_id)
            if view is not None and (waits := waiting_lines(view)) != shown:
                for line in waits:  # printed above the bar, each time the reasons change
                    progress.console.print(line, markup=False, highlight=False)
                shown = waits
            if view is not None and view.nodes:
                finished = sum(1 for rec in view.nodes.values() if rec.state in FINISHED_NODE)
                progress.update(
                    bar,
                    total=len(view.nodes),
                    completed=finished,
                    description=f"{task_id} [{STATE_STYLE.get(view.state, 'white')}]{view.state}",
                    counts=counts_text(view) + paused_note(view),
                )
            if view is not None and view.state in TASK_FINISHED:
                break
            await asyncio.sleep(poll)
    return outcome(view, console)


def tasks_table(views: list[TaskView]) -> Table:
    table = Table("task", "state", "action", "cluster", "limit", "nodes", "owner", "created")
    for v in views:
        style = STATE_STYLE.get(v.state, "white")
        created = when(v.created_at) if v.created_at else "-"
        table.add_row(
            v.task_id,
            f"[{style}]{v.state}",
            v.action,
            v.cluster_name,
            limit_text(v),
            counts_text(v) or "-",
            v.owner or "-",
            created,
        )
    return table


def waterfall(spans: list[SpanRecord], width: int = 40) -> list[str]:
    """A trace as text: one line per span, indented under its parent, with a bar placed on the
    trace's time line and the span's duration."""
    if not spans:
        return []
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list[SpanRecord]] = {}
    roots: list[SpanRecord] = []
    for s in sorted(spans, key=lambda s: s.start):
        if s.parent_id and s.parent_id in by_id:
            children.setdefault(s.parent_id, []).append(s)
        else:
            roots.append(s)
    t0 = min(s.start for s in spans)
    total = max(max(s.end for s in spans) - t0, 1e-6)
    lines: list[str] = []

    def walk(s: SpanRecord, depth: int) -> None:
        lo = int((s.start - t0) / total * width)
        hi = max(int((s.end - t0) / total * width), lo + 1)
        bar = " " * lo + "█" * (hi - lo) + " " * (width - hi)
        where = s.attributes.get("node", "")
        label = ("  " * depth + s.name + (f" [{where}]" if where else ""))[:44]
        flag = " ERROR" if s.status == "ERROR" else ""
        lines.append(f"{label:<44} |{bar}| {(s.end - s.start) * 1000:8.1f} ms  {s.service}{flag}")
        for c in children.get(s.span_id, []):
            walk(c, depth + 1)

    for r in roots:
        walk(r, 0)
    return lines


def task_traces(spans: list[SpanRecord], task_id: str) -> dict[str, list[SpanRecord]]:
    """The spans of every trace that touched the task (a replay starts a trace of its own)."""
    ids = {s.trace_id for s in spans if s.attributes.get("task_id") == task_id}
    out: dict[str, list[SpanRecord]] = {}
    for s in spans:
        if s.trace_id in ids:
            out.setdefault(s.trace_id, []).append(s)
    return out


# --- plans ----------------------------------------------------------------------------------------------


def _attrs(attributes: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(attributes.items())) or "-"


def wave_lines(waves: tuple[Wave, ...], topology: str | None, indent: str = "  ") -> list[str]:
    """One line per wave: `wave 2  zone eu-1b  (2)  a, b`; a canary wave says what it is."""
    width = max((len(w.group) for w in waves), default=0)
    out = []
    for i, w in enumerate(waves, 1):
        if w.group == CANARY_GROUP:
            label = "canary: must all succeed before the rest start  "
        else:
            label = f"{topology} {w.group:<{width}}  " if topology else ""
        out.append(f"{indent}wave {i:<3} {label}({len(w.nodes)})  {', '.join(w.nodes)}")
    return out


def _limits_lines(plan: Plan) -> list[str]:
    """The limit and max_failures when a percentage or a failure allowance makes them worth a
    line: `limit 2 = 25% of 8 node(s) (rounded down, at least 1)`."""
    params, nodes = plan.task.taskerman_params, len(plan.nodes)

    def share(name: str, value: object) -> str:
        asked = plan.asked.get(name)
        return f"{name} {value} = {asked} of {nodes} node(s) (rounded down, at least 1)" if asked else ""

    out = []
    if line := share("limit", plan.task.limit):
        out.append(line)
    failures = params.max_failures
    if failures or "max_failures" in plan.asked:
        line = share("max_failures", failures) or f"max_failures {failures}"
        out.append(f"{line}: the task stops once more than {failures} node(s) are dead")
    return out


def plan_text(plan: Plan) -> list[str]:
    """The plan, readably."""
    task, topology = plan.task, plan.task.taskerman_params.topology
    source = "explicit targets" if plan.discovery == "explicit" else f"discovery {plan.discovery!r}"
    lines = [
        f"plan for {task.action} on {task.cluster_name}  (task {task.task_id}; nothing was submitted)",
        f"{len(plan.nodes)} node(s) from {source}, ordered by routing {plan.routing!r}"
        + (f", topology {topology!r}: one {topology} at a time" if topology else ""),
    ]
    lines += _limits_lines(plan)
    lines.append("order:")
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
    if plan.unserved:
        shown = ", ".join(plan.unserved[:10]) + (" …" if len(plan.unserved) > 10 else "")
        lines.append(
            f"warning: {len(plan.unserved)} node(s) have no runner and would be recorded unserved, "
            f"with no work item: {shown} (check the names, or start taskerman-runner there)"
        )
    return lines


def ago(t: float, now: float) -> str:
    """`3.2s ago` (never negative: clocks differ a little between hosts)."""
    return f"{max(now - t, 0.0):.1f}s ago"


def when(t: float, ms: bool = False) -> str:
    """The one way the CLI shows a time: local, with its zone (`2026-12-24 18:00:00 CET`; with
    `ms`, `18:00:00.250`). `TZ=UTC taskerman …` shows UTC."""
    frac = f".{int(t % 1 * 1000):03d}" if ms else ""
    local = time.localtime(t)
    return time.strftime("%Y-%m-%d %H:%M:%S", local) + frac + time.strftime(" %Z", local)
