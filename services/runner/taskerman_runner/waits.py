"""What a node that has not started waits for, in words, with the command that would end the wait
where there is one: pure descriptions of what the attempt saw (the breaker's state, the holders
of the lease it queues for, the task's pause, a frozen cluster or one outside its windows). The
attempt keeps the latest in the node's record (`waiting_for`) and writes it only when the words
change, so a wait of days costs one write per change of reason, not one per look.

The descriptions name lease kinds as lease_plan.py names the leases (`task`, `topology:<attribute>`,
`exclusion:<group>`, `global:<action>`, `budget`)."""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterable, Sequence

from taskcore.bus.tracking import PauseRecord
from taskcore.coord.clusters import BreakerState, BreakerStateName, down_node
from taskcore.coord.fleet import znode_name
from taskcore.coord.leases import holder_parts
from taskcore.coord.semaphore import HolderNode
from taskcore.core.model import Waiting
from taskcore.core.windows import Closed

MAX_NAMES = 5  # holders named in a reason; the rest are counted (a budget may have hundreds)
MAX_DETAIL_CHARS = 160  # of a breaker's or a pause's own reason (an error message may be long)
BEHIND = "behind earlier waiters"


def utc(t: float) -> str:
    """`2024-05-01T10:00:00Z`: the runner writes the words once for every reader, whatever their zone."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def names(items: Iterable[str]) -> str:
    """`a, b, c`; past MAX_NAMES, `a, b, c, d, e and 3 more`."""
    unique = list(dict.fromkeys(items))
    shown = ", ".join(unique[:MAX_NAMES])
    rest = len(unique) - MAX_NAMES
    return f"{shown} and {rest} more" if rest > 0 else shown


def clipped(text: str) -> str:
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 1] + "…"


def breaker(cluster: str, state: BreakerState, seen: BreakerStateName) -> Waiting:
    """An open breaker (or a half-open one whose one probe is someone else)."""
    since = f" since {utc(state.opened_at)}" if state.opened_at is not None else ""
    why = f" (reason {clipped(state.reason)})" if state.reason else ""
    if seen == "half-open":
        probe = f": probe {state.probe} is trying" if state.probe else ""
        reason = f"breaker half-open{since}{probe}{why}"
    else:
        reason = f"breaker open{since}{why}"
    return Waiting(reason=reason, release=f"taskerman breaker reset {shlex.quote(cluster)}")


def closed(cluster: str, shut: Closed) -> Waiting:
    """The cluster is frozen, or outside every maintenance window."""
    c = shlex.quote(cluster)
    if shut.frozen:
        why = f" ({clipped(shut.reason)})" if shut.reason else ""
        return Waiting(
            reason=f"cluster frozen until {utc(shut.until)}{why}", release=f"taskerman cluster unfreeze {c}"
        )
    return Waiting(
        reason=f"outside maintenance window until {utc(shut.until)} ({shut.reason})",
        release=f"taskerman cluster window {c} --clear",
    )


def canary(pending: Sequence[str]) -> Waiting:
    """The task's canary wave has not all succeeded yet: the rest of the task waits for it."""
    return Waiting(reason=f"canary: {names(pending)} to succeed first")


def paused(task_id: str, pause: PauseRecord | None) -> Waiting:
    """The task is paused: its waiting nodes queue for nothing until it is resumed."""
    by = f" by {pause.by}" if pause and pause.by else ""
    why = f" ({clipped(pause.reason)})" if pause and pause.reason else ""
    return Waiting(reason=f"paused{by}{why}", release=f"taskerman resume {shlex.quote(task_id)}")


def lease(name: str, limit: int, holders: Sequence[HolderNode]) -> Waiting:
    """The lease `name` (of `limit` owners) was not granted at once; `holders` hold it now. With
    fewer owners than the limit, the node queues behind earlier waiters."""
    kind, _, what = name.partition(":")
    holders = sorted(holders, key=lambda h: h.since)  # the longest-held first
    owners = list(dict.fromkeys(h.owner for h in holders))
    full = len(owners) >= limit
    behind = "" if full else f", {BEHIND}"
    nodes = [holder_parts(h.holder)[1] for h in holders]
    if not holders:
        label = {"task": "task slot", "budget": "budget"}.get(kind, name)
        return Waiting(reason=f"{label}: {BEHIND}")
    if kind == "task":
        reason = f"task slot: {len(owners)}/{limit} held by {names(nodes)}{behind}"
    elif kind == "topology":
        reason = f"{what} {names(znode_name(o) for o in owners)} acting{behind}"
    elif kind == "exclusion":
        reason = f"exclusion group {what} held by {names(znode_name(o) for o in owners)}{behind}"
    elif kind == "global":
        reason = f"global lease for {what} held by {names(znode_name(o) for o in owners)}{behind}"
    elif kind == "budget":
        reason = f"budget {len(owners)}/{limit} held by {_by_task(holders)}{behind}"
    else:
        reason = f"lease {name} held by {names(nodes)}{behind}"
    return Waiting(reason=reason)


def _by_task(holders: Sequence[HolderNode]) -> str:
    """`t1 on n1, n2; t2 on n3`: the holders of a shared lease, by task (first holders first)."""
    by_task: dict[str | None, list[str]] = {}
    down: list[str] = []  # nodes whose health probe fails: they hold a slot (runner health.py)
    for h in holders:
        if down_node_name := down_node(h.holder):
            down.append(down_node_name)
            continue
        task, node = holder_parts(h.holder)
        by_task.setdefault(task, []).append(node)
    parts = [f"{task} on {names(nodes)}" if task else names(nodes) for task, nodes in by_task.items()]
    if down:
        parts.append(f"{names(down)} down")
    shown = "; ".join(parts[:MAX_NAMES])
    rest = len(parts) - MAX_NAMES
    return f"{shown}; and {rest} more task(s)" if rest > 0 else shown


def changed(before: Waiting | None, now: Waiting) -> bool:
    """Whether the words differ from those recorded (`since` aside: it is when they began)."""
    return before is None or (before.reason, before.release) != (now.reason, now.release)
