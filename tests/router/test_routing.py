"""Pure routing: stable task ids, explicit targets, one route per node with idempotent message ids."""

from __future__ import annotations

import msgspec
import pytest

from taskcore.core.model import NodeInfo, PlannedNode, Task, WorkItem
from taskcore.core.subjects import encode_token, node_subject, parse_node_subject
from taskerman_router.routing import ByName, Route, derive_task_id, explicit_nodes, order_nodes, routes


def plan(task: Task, nodes: list[str], now: float) -> list[Route]:
    """Routes in the default order (by name), the way the router builds them."""
    infos = [NodeInfo(name=n) for n in nodes]
    ordered = order_nodes(task, infos, {"name": ByName()}) if infos else []
    return routes(task, [PlannedNode(name=n.name, attributes=n.attributes) for n in ordered], now)


def _task(**fields: object) -> Task:
    base: dict[str, object] = {"action": "test:sleep", "cluster_name": "cassandra:geo counter"}
    base.update(fields)
    return Task(**base)  # type: ignore[arg-type]


def test_derive_task_id_is_stable() -> None:
    assert derive_task_id(None, 42, 1700000000.25) == derive_task_id(None, 42, 1700000000.25)
    assert derive_task_id("", 42, 1700000000.25) == derive_task_id(None, 42, 1700000000.25)


def test_derive_task_id_shape() -> None:
    task_id = derive_task_id(None, 1, 1.0)
    assert task_id.startswith("auto-")
    assert len(task_id) == len("auto-") + 16
    int(task_id.removeprefix("auto-"), 16)  # hex


def test_derive_task_id_prefers_the_msg_id() -> None:
    assert derive_task_id("nightly-2024-06-01", 42, 1.0) == "nightly-2024-06-01"
    assert derive_task_id("nightly-2024-06-01", 43, 2.0) == "nightly-2024-06-01"


def test_derive_task_id_differs_across_seqs_and_times() -> None:
    ids = {derive_task_id(None, seq, 1700000000.0) for seq in range(1, 200)}
    assert len(ids) == 199
    assert derive_task_id(None, 7, 1.0) != derive_task_id(None, 7, 2.0)


def test_destnode_wins_over_nodes() -> None:
    task = _task(destnode="node-9", nodes=("node-1", "node-2"))
    assert explicit_nodes(task) == ["node-9"]


def test_nodes_are_deduplicated_in_order() -> None:
    task = _task(nodes=("node-2", "node-1", "node-2", "node-3", "node-1"))
    assert explicit_nodes(task) == ["node-2", "node-1", "node-3"]


def test_no_explicit_nodes_means_discovery() -> None:
    assert explicit_nodes(_task()) is None
    assert explicit_nodes(_task(nodes=(), destnode="")) is None


def test_plan_one_route_per_node_sorted() -> None:
    task = _task(task_id="abcd-ef123", limit=2)
    nodes = ["node-3", "10.0.0.1:9042", "node-1", "ñ node.2"]
    routes = plan(task, nodes, now=1700000000.5)
    assert [r.node for r in routes] == sorted(nodes)
    assert len(routes) == 4
    for position, route in enumerate(routes):
        assert isinstance(route, Route)
        assert route.subject == node_subject("cassandra:geo counter", route.node)
        assert parse_node_subject(route.subject) == ("cassandra:geo counter", route.node)
        assert route.msg_id == f"abcd-ef123:{encode_token(route.node)}"
        expected = WorkItem(task=task, node=route.node, routed_at=1700000000.5, position=position)
        assert route.item == expected


def test_a_work_item_carries_its_own_node_not_the_task_list() -> None:
    names = [f"n{i:05d}" for i in range(2000)]
    task = _task(task_id="big", nodes=tuple(names))
    routes = plan(task, names, now=0.0)
    sizes = {len(msgspec.json.encode(r.item)) for r in routes}
    assert max(sizes) < 400  # independent of the 2,000 nodes
    assert all(r.item.task.nodes == () for r in routes)


def test_plan_subjects_and_msg_ids_are_distinct() -> None:
    task = _task(task_id="t1")
    routes = plan(task, ["a.b", "a b", "a:b", "a_b"], now=0.0)
    assert len({r.subject for r in routes}) == 4
    assert len({r.msg_id for r in routes}) == 4


def test_plan_exact_values() -> None:
    task = _task(cluster_name="demo:web", task_id="T")
    (route,) = plan(task, ["node-1"], now=3.0)
    assert route.subject == "tasks.cluster.demo=3Aweb.node-1"
    assert route.msg_id == "T:node-1"


def test_plan_of_no_nodes_is_empty() -> None:
    assert plan(_task(task_id="t"), [], now=0.0) == []


def test_plan_is_deterministic() -> None:
    task = _task(task_id="t")
    assert plan(task, ["b", "a", "c"], 1.0) == plan(task, ["c", "b", "a"], 1.0)


@pytest.mark.parametrize("nodes", [["n1"], ["n1", "n2", "n3"]])
def test_plan_items_carry_the_task(nodes: list[str]) -> None:
    task = _task(task_id="t", limit=len(nodes))
    for route in plan(task, nodes, 9.0):
        assert route.item.task == task
        assert route.item.task.limit == len(nodes)
