"""What `status` and `watch` print for waiting nodes (pure): the reason with the command that
releases it, one line per reason however many nodes wait."""

from __future__ import annotations

from taskcore.bus.tracking import TaskView
from taskcore.cli import render
from taskcore.core.model import NodeRecord, Waiting

BREAKER = Waiting(
    reason="breaker open since 2024-05-01T10:00:00Z (reason boom)", release="taskerman breaker reset c1"
)
BUDGET = Waiting(reason="budget 2/2 held by t0 on a, b")


def view(nodes: dict[str, NodeRecord]) -> TaskView:
    return TaskView(
        task_id="t1", state="routed", action="test:sleep", cluster_name="c1", limit=2, nodes=nodes
    )


def test_a_wait_with_a_release_names_the_command() -> None:
    assert render.wait_text(BREAKER) == f"{BREAKER.reason}; `taskerman breaker reset c1` releases it"
    assert render.wait_text(BUDGET) == BUDGET.reason


def test_waiting_nodes_are_grouped_by_reason_and_finished_or_running_ones_left_out() -> None:
    nodes = {
        "n3": NodeRecord(waiting_for=BREAKER),
        "n1": NodeRecord(waiting_for=BREAKER),
        "n2": NodeRecord(state="retrying", waiting_for=BUDGET),
        "n4": NodeRecord(state="running"),
        "n5": NodeRecord(state="succeeded"),
        "n6": NodeRecord(state="skipped", waiting_for=BUDGET),  # an old note on a finished node
    }
    assert render.waiting_lines(view(nodes)) == [
        f"  waiting: 2 node(s) (n1, n3): {render.wait_text(BREAKER)}",
        f"  waiting: 1 node(s) (n2): {BUDGET.reason}",
    ]


def test_a_thousand_waiting_nodes_make_one_line_per_reason_and_no_more_than_the_cap() -> None:
    nodes = {f"n{i:04d}": NodeRecord(waiting_for=BREAKER) for i in range(1000)}
    [line] = render.waiting_lines(view(nodes))
    assert line.startswith("  waiting: 1000 node(s) (n0000, n0001, n0002, n0003, n0004 and 995 more): ")
    many = {f"n{i}": NodeRecord(waiting_for=Waiting(reason=f"budget held by t{i}")) for i in range(30)}
    lines = render.waiting_lines(view(many))
    assert len(lines) == render.MAX_WAIT_LINES + 1
    assert lines[-1] == "  waiting: 20 more reason(s); `taskerman status t1` lists them"


def test_nothing_waits_nothing_is_shown() -> None:
    assert render.waiting_lines(view({"n1": NodeRecord()})) == []
    assert render.waiting_lines(view({})) == []
