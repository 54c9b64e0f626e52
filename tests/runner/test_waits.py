"""The words a waiting node's record carries (pure): what holds it back, who holds the lease it
queues for, and the command that would release it."""

from __future__ import annotations

from taskcore.bus.tracking import PauseRecord
from taskcore.coord.clusters import BreakerState, down_holder, down_node
from taskcore.coord.leases import holder_parts, shared_holder
from taskcore.coord.semaphore import HolderNode
from taskcore.core.model import Task, Waiting, WorkItem
from taskcore.core.subjects import encode_token
from taskcore.core.windows import Closed
from taskerman_dev.actions import TestBackup
from taskerman_runner import waits
from taskerman_runner.lease_plan import leases_for
from taskerman_runner.waits import MAX_NAMES


def held(holder: str, owner: str = "uid", since: float = 0.0) -> HolderNode:
    return HolderNode(owner=owner, holder=f"{holder}#abc123", znode=f"{owner}~abc123", token=1, since=since)


def test_an_open_breaker_says_since_when_why_and_how_to_reset_it() -> None:
    state = BreakerState(state="open", opened_at=0.0, reason="t1 on n1: boom")
    w = waits.breaker("demo:web", state, "open")
    assert w.reason == "breaker open since 1970-01-01T00:00:00Z (reason t1 on n1: boom)"
    assert w.release == "taskerman breaker reset demo:web"
    assert waits.breaker("a b", state, "open").release == "taskerman breaker reset 'a b'"  # shell-quoted


def test_a_half_open_breaker_names_its_probe_and_a_long_reason_is_clipped() -> None:
    state = BreakerState(state="open", opened_at=0.0, reason="x" * 500, probe="t1/n2")
    w = waits.breaker("c", state, "half-open")
    assert w.reason.startswith(
        "breaker half-open since 1970-01-01T00:00:00Z: probe t1/n2 is trying (reason x"
    )
    assert len(w.reason) < 300
    assert w.reason.endswith("…)")


def test_a_paused_task_says_by_whom_and_how_to_resume_it() -> None:
    w = waits.paused("t 1", PauseRecord(by="alice", reason="look at the graphs"))
    assert w == Waiting(reason="paused by alice (look at the graphs)", release="taskerman resume 't 1'")
    assert waits.paused("t1", None).reason == "paused"


def test_a_full_budget_names_the_tasks_and_nodes_holding_it_longest_held_first() -> None:
    holders = [
        held(shared_holder("t2", "n3"), "u3", since=3.0),
        held(shared_holder("t1", "n1"), "u1", since=1.0),
        held(shared_holder("t1", "n2"), "u2", since=2.0),
    ]
    w = waits.lease("budget", 3, holders)
    assert w == Waiting(reason="budget 3/3 held by t1 on n1, n2; t2 on n3")


def test_a_budget_slot_a_down_node_takes_says_so() -> None:
    holders = [held(shared_holder("t1", "n1"), "n1", since=1.0), held(down_holder("n3"), "n3", since=2.0)]
    assert waits.lease("budget", 2, holders).reason == "budget 2/2 held by t1 on n1; n3 down"
    assert down_node(f"{down_holder('n 3')}#abc") == "n 3"
    assert down_node(f"{shared_holder('t1', 'n1')}#abc") is None


def test_a_canary_and_a_closed_cluster_in_words() -> None:
    assert waits.canary(["n1", "n2"]) == Waiting(reason="canary: n1, n2 to succeed first")
    frozen = waits.closed("db main", Closed(until=0.0, reason="release week", frozen=True))
    assert frozen.reason == "cluster frozen until 1970-01-01T00:00:00Z (release week)"
    assert frozen.release == "taskerman cluster unfreeze 'db main'"
    window = waits.closed("db", Closed(until=0.0, reason="Mon 02:00-03:00 UTC", frozen=False))
    assert window.reason == "outside maintenance window until 1970-01-01T00:00:00Z (Mon 02:00-03:00 UTC)"


def test_a_lease_with_room_left_says_the_node_queues_behind_earlier_waiters() -> None:
    w = waits.lease("budget", 2, [held(shared_holder("t1", "n1"))])
    assert w.reason == "budget 1/2 held by t1 on n1, behind earlier waiters"
    assert waits.lease("budget", 2, []).reason == "budget: behind earlier waiters"
    assert waits.lease("task", 2, []).reason == "task slot: behind earlier waiters"


def test_each_kind_of_lease_in_words() -> None:
    task_slot = [held(f"n{i}", f"u{i}") for i in range(3)]
    assert waits.lease("task", 3, task_slot).reason == "task slot: 3/3 held by n0, n1, n2"
    zone = [held("n1", encode_token("eu-1b")), held("n2", encode_token("eu-1b"))]
    assert waits.lease("topology:zone", 1, zone).reason == "zone eu-1b acting"
    group = [held(shared_holder("backup-7", "n1"), encode_token("backup-7"))]
    assert waits.lease("exclusion:io", 1, group).reason == "exclusion group io held by backup-7"
    clusters = [held(shared_holder("t", "a1"), encode_token("redis:a"))]
    assert (
        waits.lease("global:test:sleep", 1, clusters).reason == "global lease for test:sleep held by redis:a"
    )


def test_many_holders_are_counted_not_listed() -> None:
    holders = [held(shared_holder("t1", f"n{i:02d}"), f"u{i}", since=i) for i in range(12)]
    w = waits.lease("budget", 12, holders)
    assert w.reason == f"budget 12/12 held by t1 on n00, n01, n02, n03, n04 and {12 - MAX_NAMES} more"


def test_only_new_words_are_a_change() -> None:
    w = Waiting(reason="paused", release="taskerman resume t", since=1.0)
    assert waits.changed(None, w)
    assert not waits.changed(w, Waiting(reason="paused", release="taskerman resume t", since=9.0))
    assert waits.changed(w, Waiting(reason="budget 2/2 held by t on n1"))


def test_holder_ids_name_the_task_for_shared_leases_only() -> None:
    assert holder_parts(f"{shared_holder('my task/1', 'web-1')}#ab12") == ("my task/1", "web-1")
    assert holder_parts("web-1#ab12") == (None, "web-1")
    assert holder_parts("rack=/web-1#ab12") == (None, "rack=/web-1")  # not a token: a node's own name
    task = Task(action="test:backup", cluster_name="c1", task_id="t1", limit=2)
    item = WorkItem(task=task, node="n1", routed_at=0.0)
    leases = leases_for(item, TestBackup, 3, zk=None, cluster="c1", node="n1")  # type: ignore[arg-type]
    by_name = {lease.name: lease.holder for lease in leases.leases}  # type: ignore[attr-defined]
    assert by_name == {"task": "n1", "exclusion:io": "t1/n1", "budget": "t1/n1"}
