"""The chaos run's independent checker. It trusts only what the actions recorded themselves (the
witness file: each execute_action's interval with its fencing tokens, and each passed post_check)
and what the submitter was acked, plus the final record of each node (to tell a dead letter's
reason from a node that was lost). It never asks the services what they think they did.

The properties, each a figure of the report:
- lost: an acked task-node item that did not end succeeded, or in a final state with its reason
  (dead: a dead letter; skipped, cancelled, expired, unserved), counted by state;
- duplicates: an execute_action that started after the node had already passed its post_check
  for that task (a success is final);
- over-limit: more nodes of a task acting at one instant than its limit, more distinct nodes of
  a cluster than its budget (the budget counts nodes, as a PodDisruptionBudget does: a node down
  in one task that acts in another takes one slot, the runner's budget owner being the node), or
  more than one task holding an exclusion group of a cluster. A node is acting during
  each attempt and, after an attempt whose action failed, until its next attempt starts: a failed
  node in backoff is still down, so it still counts, also when the nemesis ended that runner
  process' ZooKeeper session in the backoff (killed it, froze it or cut it off from ZooKeeper for
  long enough, by its own record of what it did: such backoffs are counted, `backoffs_cut`, the
  cases where only the node's down markers held its place);
- token regressions: under a lease of limit 1 (a task's own slot with limit 1, an exclusion group)
  a later grant to another holder with a token not greater than the earlier one's."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Mapping

import msgspec

FINAL_OK = "succeeded"
ENDED_WITH_REASON = frozenset({"dead", "skipped", "cancelled", "expired", "unserved"})


class Interval(msgspec.Struct, frozen=True, kw_only=True):
    """One execute_action, as the action wrote it to the witness file."""

    task_id: str
    cluster: str
    node: str
    start: float
    end: float
    token: int
    attempt: int
    tokens: dict[str, int] = {}
    failed: bool = False  # the action failed: the node stays broken until its next attempt
    pid: int = 0  # the runner process that ran it


class Passed(msgspec.Struct, frozen=True, kw_only=True):
    """A post_check that passed (the node's success, as the action saw it)."""

    task_id: str
    node: str
    at: float


class SessionEnded(msgspec.Struct, frozen=True, kw_only=True):
    """A fault the nemesis injected that ends (or makes the runner give up) a runner process'
    ZooKeeper session: that process, and when."""

    kind: str
    pid: int
    start: float
    end: float


class Submitted(msgspec.Struct, frozen=True, kw_only=True):
    """A task the submitter was acked for."""

    task_id: str
    cluster: str
    nodes: tuple[str, ...]
    limit: int
    groups: tuple[str, ...] = ()


class Final(msgspec.Struct, frozen=True, kw_only=True):
    """A node's final record: its state and its reason (the error, or the dead letter's)."""

    state: str
    reason: str = ""


class Report(msgspec.Struct, kw_only=True):
    tasks: int = 0
    items: int = 0
    executions: int = 0
    outcomes: dict[str, int] = {}
    lost: list[str] = []
    duplicates: list[str] = []
    over_limit: list[str] = []
    token_regressions: list[str] = []
    backoffs_cut: int = 0  # backoffs of failed nodes whose runner's session a fault ended (still counted)
    faults: dict[str, int] = {}

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.over_limit or self.token_regressions)

    def lines(self) -> list[str]:
        out = [
            f"tasks acked {self.tasks}, task x node items {self.items}, executions {self.executions}",
            "items ended: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())),
            "faults injected: " + (", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "none"),
        ]
        for name, found in (
            ("lost", self.lost),
            ("duplicate executions", self.duplicates),
            ("over-limit", self.over_limit),
            ("token regressions", self.token_regressions),
        ):
            out.append(f"{name}: {len(found)}" + "".join(f"\n  {f}" for f in found[:20]))
        cut = self.backoffs_cut
        out.append(f"backoffs of failed nodes whose runner's session the nemesis ended: {cut} (counted)")
        out.append("PASS" if self.ok else "FAIL")
        return out


def check(
    submitted: Iterable[Submitted],
    intervals: Iterable[Interval],
    passed: Iterable[Passed],
    finals: Mapping[tuple[str, str], Final],
    budgets: Mapping[str, int],
    *,
    sessions_ended: Iterable[SessionEnded] = (),
) -> Report:
    tasks = {t.task_id: t for t in submitted}
    runs = [i for i in intervals if i.task_id in tasks]
    report = Report(tasks=len(tasks), items=sum(len(t.nodes) for t in tasks.values()), executions=len(runs))
    report.lost = lost(tasks.values(), finals)
    for t in tasks.values():
        for node in t.nodes:
            state = f.state if (f := finals.get((t.task_id, node))) else "none"
            report.outcomes[state] = report.outcomes.get(state, 0) + 1
    report.duplicates = duplicates(runs, passed)
    ended = list(sessions_ended)
    report.over_limit = over_limit(tasks, runs, budgets)
    report.backoffs_cut = sum(1 for r, nxt in backoffs(runs) if session_ended(r, nxt, ended))
    report.token_regressions = token_regressions(tasks, runs)
    return report


def lost(tasks: Iterable[Submitted], finals: Mapping[tuple[str, str], Final]) -> list[str]:
    out = []
    for t in tasks:
        for node in t.nodes:
            f = finals.get((t.task_id, node))
            if f is None:
                out.append(f"{t.task_id} {node}: no record")
            elif f.state != FINAL_OK and not (f.state in ENDED_WITH_REASON and f.reason):
                out.append(f"{t.task_id} {node}: ended {f.state} {f.reason!r}")
    return out


def duplicates(runs: Iterable[Interval], passed: Iterable[Passed]) -> list[str]:
    first_pass: dict[tuple[str, str], float] = {}
    for p in passed:
        key = (p.task_id, p.node)
        first_pass[key] = min(p.at, first_pass.get(key, p.at))
    return [
        f"{r.task_id} {r.node}: attempt {r.attempt} started {r.start - first_pass[(r.task_id, r.node)]:.2f}s "
        "after its success"
        for r in runs
        if (r.task_id, r.node) in first_pass and r.start > first_pass[(r.task_id, r.node)]
    ]


def backoffs(runs: Iterable[Interval]) -> list[tuple[Interval, Interval]]:
    """Each failed attempt with the node's next attempt."""
    return [
        (r, nxt)
        for mine in attempts_by_item(runs).values()
        for r, nxt in itertools.pairwise(mine)
        if r.failed
    ]


def session_ended(r: Interval, nxt: Interval, ended: Iterable[SessionEnded]) -> bool:
    """Whether the nemesis ended the session of the process that ran `r` between `r` and `nxt`."""
    return any(f.pid == r.pid and f.start < nxt.start and f.end > r.end for f in ended)


def acting_windows(runs: Iterable[Interval]) -> list[tuple[str, str, float, float]]:
    """(task, node, start, end) of each attempt, and of each backoff after a failed attempt (to
    the next attempt's start; a failed last attempt is dead-lettered: its node ends there)."""
    out = [(r.task_id, r.node, r.start, r.end) for r in runs]
    out += [(r.task_id, r.node, r.end, nxt.start) for r, nxt in backoffs(runs)]
    return out


def attempts_by_item(runs: Iterable[Interval]) -> dict[tuple[str, str], list[Interval]]:
    """(task, node) → its attempts in start order."""
    out: dict[tuple[str, str], list[Interval]] = defaultdict(list)
    for r in runs:
        out[(r.task_id, r.node)].append(r)
    for mine in out.values():
        mine.sort(key=lambda r: r.start)
    return out


def peak(windows: Iterable[tuple[float, float, str]]) -> tuple[int, float]:
    """Most distinct labels open at one instant, and when (an end at t closes before a start at t)."""
    events = sorted([(s, 1, label) for s, _, label in windows] + [(e, -1, label) for _, e, label in windows])
    open_: dict[str, int] = defaultdict(int)
    best, when = 0, 0.0
    for t, delta, label in events:
        open_[label] += delta
        if open_[label] == 0:
            del open_[label]
        if len(open_) > best:
            best, when = len(open_), t
    return best, when


def over_limit(
    tasks: Mapping[str, Submitted],
    runs: list[Interval],
    budgets: Mapping[str, int],
) -> list[str]:
    out = []
    by_task: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    by_cluster: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    by_group: dict[tuple[str, str], list[tuple[float, float, str]]] = defaultdict(list)
    for task_id, node, s, e in acting_windows(runs):
        t = tasks[task_id]
        by_task[task_id].append((s, e, node))
        by_cluster[t.cluster].append((s, e, node))  # a budget counts nodes: one node in two tasks is one
        for g in t.groups:
            by_group[(t.cluster, g)].append((s, e, task_id))
    for task_id, windows in by_task.items():
        n, at = peak(windows)
        if n > tasks[task_id].limit:
            out.append(f"task {task_id}: {n} acting at {at:.3f}, limit {tasks[task_id].limit}")
    for cluster, windows in by_cluster.items():
        budget = budgets.get(cluster)
        n, at = peak(windows)
        if budget is not None and n > budget:
            out.append(f"cluster {cluster}: {n} acting at {at:.3f}, budget {budget}")
    for (cluster, group), windows in by_group.items():
        n, at = peak(windows)
        if n > 1:
            out.append(f"exclusion {group} of {cluster}: {n} tasks acting at {at:.3f}")
    return out


def token_regressions(tasks: Mapping[str, Submitted], runs: list[Interval]) -> list[str]:
    """Under each lease of limit 1, a grant to an owner carries a token greater than every token of
    the other owners granted before it (an owner's own retries and, for an exclusion group, the
    other nodes of the owning task, join its hold)."""
    leases: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    for r in runs:
        t = tasks[r.task_id]
        if t.limit == 1:
            leases[f"task {r.task_id}"].append((r.start, r.token, r.node))
        for g in t.groups:
            token = r.tokens.get(f"exclusion:{g}")
            if token is not None:
                leases[f"exclusion {g} of {t.cluster}"].append((r.start, token, r.task_id))
    out = []
    for lease, grants in leases.items():
        best: dict[str, int] = {}  # owner → its highest token so far
        for start, token, owner in sorted(grants):
            earlier = [(t, o) for o, t in best.items() if o != owner and t >= token]
            if earlier:
                t1, o1 = max(earlier)
                out.append(f"{lease}: {owner} got token {token} at {start:.3f} after {o1}'s {t1}")
            best[owner] = max(token, best.get(owner, 0))
    return out
