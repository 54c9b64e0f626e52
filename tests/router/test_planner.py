"""The planner without servers: discovery answers checked, explicit targets, plan previews."""

from __future__ import annotations

import msgspec
import pytest

from taskcore.cli import render
from taskcore.core.actions import ActionRegistry
from taskcore.core.errors import DiscoveryError, InvalidTask
from taskcore.core.model import NodeInfo, Task, Wave
from taskcore.plugins import Discovery
from taskerman_router.planner import Planner
from taskerman_router.routing import ByName, ByTopology, RoutingError


class Fixed:
    """A discovery plugin that answers the same nodes for every cluster."""

    def __init__(self, nodes: list[NodeInfo]) -> None:
        self.answer = nodes

    async def nodes(self, cluster: str) -> list[NodeInfo]:
        return list(self.answer)


FLEET = [NodeInfo(name=f"n-{i}", attributes={"zone": f"z{i % 2}"}) for i in range(5, 0, -1)]


def _planner(**plugins: Discovery) -> Planner:
    return Planner(
        {"fixed": Fixed(FLEET), **plugins},
        {"name": ByName(), "zone": ByTopology()},
        ActionRegistry.installed(),
    )


def _task(**fields: object) -> Task:
    raw = {"action": "test:sleep", "cluster_name": "c", "discovery": "fixed", "task_id": "t", **fields}
    return msgspec.convert(raw, Task)


async def test_resolve_orders_and_cuts_waves() -> None:
    res = await _planner().resolve(_task(limit=2))
    assert res.discovery == "fixed"
    assert res.routing == "name"
    assert [n.name for n in res.nodes] == ["n-1", "n-2", "n-3", "n-4", "n-5"]
    assert res.waves == (Wave(nodes=("n-1", "n-2")), Wave(nodes=("n-3", "n-4")), Wave(nodes=("n-5",)))
    assert res.concurrency == 2
    assert res.budget is None  # no ZooKeeper: none known


async def test_percentages_resolve_against_the_nodes_found() -> None:
    res = await _planner().resolve(_task(limit="40%", taskerman_params={"max_failures": "10%"}))
    assert (res.task.limit, res.task.taskerman_params.max_failures) == (2, 1)  # of 5: 2.0 and 0.5 → 1
    assert res.concurrency == 2
    assert res.waves == (Wave(nodes=("n-1", "n-2")), Wave(nodes=("n-3", "n-4")), Wave(nodes=("n-5",)))


async def test_a_preview_shows_the_resolved_numbers_and_what_was_asked() -> None:
    plan = await _planner().preview(_task(limit="60%", taskerman_params={"max_failures": "20%"}))
    assert (plan.task.limit, plan.task.taskerman_params.max_failures) == (3, 1)
    assert plan.asked == {"limit": "60%", "max_failures": "20%"}
    assert plan.concurrency == 3
    assert plan.leases[0].limit == 3
    text = "\n".join(render.plan_text(plan))
    assert "limit 3 = 60% of 5 node(s) (rounded down, at least 1)" in text
    assert "max_failures 1 = 20% of 5 node(s)" in text
    assert "at most 3 of the task's 5 node(s) at once" in text


async def test_resolve_with_topology() -> None:
    res = await _planner().resolve(_task(taskerman_params={"topology": "zone"}))
    assert res.waves == (
        Wave(nodes=("n-2", "n-4"), group="z0"),
        Wave(nodes=("n-1", "n-3", "n-5"), group="z1"),
    )


async def test_explicit_targets_skip_discovery() -> None:
    res = await _planner().resolve(_task(nodes=["b", "a", "b"], discovery="nope"))
    assert res.discovery == "explicit"
    assert [n.name for n in res.nodes] == ["a", "b"]
    with pytest.raises(RoutingError, match="explicit nodes carry no attributes"):
        await _planner().resolve(_task(destnode="a", taskerman_params={"topology": "zone"}))


@pytest.mark.parametrize(
    ("answer", "needle"),
    [
        ([], "discovery 'bad' found no nodes for 'c'"),
        ([NodeInfo(name=" ")], "returned an invalid node"),
        ([NodeInfo(name="x" * 513)], "returned an invalid node"),
        ([NodeInfo(name="a", attributes={"zone": 1})], "returned an invalid node"),  # type: ignore[dict-item]
        (["a"], "returned an invalid node: 'a'"),
    ],
)
async def test_bad_discovery_answers(answer: list[NodeInfo], needle: str) -> None:
    with pytest.raises(DiscoveryError, match=needle):
        await _planner(bad=Fixed(answer)).resolve(_task(discovery="bad"))


async def test_unknown_discovery_plugin_is_an_invalid_task() -> None:
    with pytest.raises(InvalidTask) as e:
        await _planner().resolve(_task(discovery="consul"))
    assert e.value.field == "discovery"
    assert "unknown discovery plugin 'consul' (installed: fixed)" in str(e.value)


async def test_preview_lists_leases_without_zookeeper() -> None:
    plan = await _planner().preview(_task(action="test:backup", limit=3))
    assert [(lease.name, lease.limit) for lease in plan.leases] == [
        ("task", 3),
        ("exclusion", 1),
        ("budget", None),
    ]
    assert plan.leases[2].detail == "unknown (no ZooKeeper)"
    assert plan.breaker == ""
    with pytest.raises(InvalidTask, match="unknown action"):
        await _planner().preview(_task(action="nope:x"))
