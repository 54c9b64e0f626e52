"""The chaos checker's properties on hand-made histories: each finds what it must and nothing else."""

from __future__ import annotations

from taskerman_dev.chaos import checker
from taskerman_dev.chaos.checker import Final, Interval, Passed, SessionEnded, Submitted

CLUSTER = "chaos-a"


def run(
    task: str,
    node: str,
    start: float,
    end: float,
    *,
    token: int = 1,
    attempt: int = 1,
    failed: bool = False,
    pid: int = 1,
    **tokens: int,
) -> Interval:
    return Interval(
        task_id=task,
        cluster=CLUSTER,
        node=node,
        start=start,
        end=end,
        token=token,
        attempt=attempt,
        failed=failed,
        pid=pid,
        tokens={k.replace("_", ":"): v for k, v in tokens.items()},
    )


def task(task_id: str, nodes: tuple[str, ...], limit: int = 1, groups: tuple[str, ...] = ()) -> Submitted:
    return Submitted(task_id=task_id, cluster=CLUSTER, nodes=nodes, limit=limit, groups=groups)


def test_a_clean_history_passes() -> None:
    t = task("t1", ("n1", "n2"))
    runs = [run("t1", "n1", 0, 1, token=10), run("t1", "n2", 1, 2, token=11)]
    passed = [Passed(task_id="t1", node="n1", at=1.1), Passed(task_id="t1", node="n2", at=2.1)]
    finals = {("t1", "n1"): Final(state="succeeded"), ("t1", "n2"): Final(state="succeeded")}
    report = checker.check([t], runs, passed, finals, {CLUSTER: 1})
    assert report.ok, report.lines()
    assert (report.tasks, report.items, report.executions) == (1, 2, 2)


def test_lost_is_an_item_without_a_final_record_or_a_reason() -> None:
    t = task("t1", ("n1", "n2", "n3"))
    finals = {
        ("t1", "n1"): Final(state="dead", reason="told to fail"),  # a dead letter with its reason
        ("t1", "n2"): Final(state="dead"),  # dead without a reason: lost
    }
    assert checker.lost([t], finals) == ["t1 n2: ended dead ''", "t1 n3: no record"]


def test_a_run_after_the_nodes_success_is_a_duplicate() -> None:
    runs = [run("t1", "n1", 0, 1), run("t1", "n1", 5, 6, attempt=2)]
    found = checker.duplicates(runs, [Passed(task_id="t1", node="n1", at=1.1)])
    [one] = found
    assert "attempt 2" in one
    # a retry after a failure (no passed post_check before it) is not
    assert checker.duplicates(runs, [Passed(task_id="t1", node="n1", at=6.1)]) == []


def test_a_failed_node_in_backoff_still_counts_as_acting() -> None:
    t = task("t1", ("n1", "n2"), limit=1)
    # n1 fails at 1, retries at 3; n2 acts during n1's backoff: two nodes down under limit 1
    runs = [run("t1", "n1", 0, 1, failed=True), run("t1", "n1", 3, 4, attempt=2), run("t1", "n2", 1.5, 2.5)]
    [found] = checker.over_limit({"t1": t}, runs, {})
    assert found.startswith("task t1: 2 acting")
    # an attempt that did not fail (interrupted, handed back) leaves nothing broken behind it
    handed_back = [run("t1", "n1", 0, 1), run("t1", "n1", 3, 4, attempt=2), run("t1", "n2", 1.5, 2.5)]
    assert checker.over_limit({"t1": t}, handed_back, {}) == []
    # its runner was killed in the backoff (the retry ran elsewhere): the node is still down, its
    # markers hold its place; the slot given up is over the limit, and the backoff is counted apart
    crashed = [
        run("t1", "n1", 0, 1, failed=True),
        run("t1", "n1", 3, 4, attempt=2, pid=2),
        run("t1", "n2", 1.5, 2.5),
    ]
    killed = SessionEnded(kind="runner-kill", pid=1, start=1.2, end=float("inf"))
    report = checker.check([t], crashed, [], {}, {}, sessions_ended=[killed])
    assert (len(report.over_limit), report.backoffs_cut) == (1, 1)
    elsewhere = SessionEnded(kind="runner-kill", pid=3, start=1.2, end=float("inf"))
    assert checker.check([t], crashed, [], {}, {}, sessions_ended=[elsewhere]).backoffs_cut == 0


def test_budget_and_exclusion_across_tasks() -> None:
    a, b = task("a", ("n1",), groups=("io",)), task("b", ("n2",), groups=("io",))
    runs = [run("a", "n1", 0, 2), run("b", "n2", 1, 3)]
    found = checker.over_limit({"a": a, "b": b}, runs, {CLUSTER: 1})
    assert found == [
        f"cluster {CLUSTER}: 2 acting at 1.000, budget 1",
        f"exclusion io of {CLUSTER}: 2 tasks acting at 1.000",
    ]
    back_to_back = [run("a", "n1", 0, 1), run("b", "n2", 1, 2)]  # an end at t closes before a start at t
    assert checker.over_limit({"a": a, "b": b}, back_to_back, {CLUSTER: 1}) == []
    # one node down in one task (failed, in its backoff) and acting in another: one budget slot
    c, d = task("c", ("n1", "n2"), limit=2), task("d", ("n1",))
    same_node = [run("c", "n1", 0, 1, failed=True), run("c", "n1", 5, 6, attempt=2), run("d", "n1", 2, 3)]
    assert checker.over_limit({"c": c, "d": d}, same_node, {CLUSTER: 1}) == []
    other_node = [*same_node, run("c", "n2", 2.5, 3.5)]
    [found] = checker.over_limit({"c": c, "d": d}, other_node, {CLUSTER: 1})
    assert found == f"cluster {CLUSTER}: 2 acting at 2.500, budget 1"


def test_tokens_must_grow_across_owners_not_within_one() -> None:
    t = task("t1", ("n1", "n2"), limit=1)
    grown = [
        run("t1", "n1", 0, 1, token=5),
        run("t1", "n1", 2, 3, token=5, attempt=2),
        run("t1", "n2", 4, 5, token=9),
    ]
    assert checker.token_regressions({"t1": t}, grown) == []
    regressed = [run("t1", "n1", 0, 1, token=9), run("t1", "n2", 2, 3, token=5)]
    [found] = checker.token_regressions({"t1": t}, regressed)
    assert found == "task t1: n2 got token 5 at 2.000 after n1's 9"


def test_exclusion_tokens_are_per_owning_task() -> None:
    a = task("a", ("n1", "n2"), limit=2, groups=("io",))
    b = task("b", ("n3",), groups=("io",))
    tasks = {"a": a, "b": b}
    # two nodes of task a join one hold, in any token order; task b comes after with a greater one
    runs = [
        run("a", "n1", 0, 1, exclusion_io=12),
        run("a", "n2", 0.5, 1, exclusion_io=11),
        run("b", "n3", 2, 3, exclusion_io=20),
    ]
    assert checker.token_regressions(tasks, runs) == []
    stale = [*runs[:2], run("b", "n3", 2, 3, exclusion_io=10)]
    [found] = checker.token_regressions(tasks, stale)
    assert found == f"exclusion io of {CLUSTER}: b got token 10 at 2.000 after a's 12"
