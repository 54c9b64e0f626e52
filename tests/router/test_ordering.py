"""Routing plugins, topology ordering and waves: pure."""

from __future__ import annotations

import msgspec
import pytest

from taskcore.core.actions import Action
from taskcore.core.model import NodeInfo, Task, Wave
from taskcore.plugins import Routing
from taskerman_router.planner import Resolution, plan_leases
from taskerman_router.routing import (
    ByName,
    ByTopology,
    RoutingError,
    SeedsLast,
    load_routings,
    order_nodes,
    routes,
    routing_name,
    waves,
)

PLUGINS: dict[str, Routing] = {"name": ByName(), "zone": ByTopology(), "seeds_last": SeedsLast()}


def _task(topology: str | None = None, routing: str = "", limit: int = 2, **fields: object) -> Task:
    params: dict[str, object] = {"routing": routing}
    if topology:
        params["topology"] = topology
    base: dict[str, object] = {"action": "test:sleep", "cluster_name": "c", "limit": limit, "task_id": "t"}
    base.update(fields)
    return msgspec.convert({**base, "taskerman_params": params}, Task)


def _n(name: str, **attrs: str) -> NodeInfo:
    return NodeInfo(name=name, attributes=attrs)


FLEET = [
    _n("c-2", zone="eu-1b", rack="r2"),
    _n("a-1", zone="eu-1c", rack="r1", seed="true"),
    _n("b-1", zone="eu-1a", rack="r2"),
    _n("a-2", zone="eu-1b", rack="r1"),
    _n("c-1", zone="eu-1a", rack="r1", seed="true"),
    _n("b-2", zone="eu-1c", rack="r2"),
]


def names(nodes: list[NodeInfo]) -> list[str]:
    return [n.name for n in nodes]


def test_installed_plugins_include_the_builtins() -> None:
    installed = load_routings()
    assert {"name", "zone", "seeds_last"} <= set(installed)
    assert isinstance(installed["seeds_last"], SeedsLast)


def test_default_is_a_stable_order_by_name() -> None:
    assert routing_name(_task()) == "name"
    assert names(order_nodes(_task(), FLEET, PLUGINS)) == ["a-1", "a-2", "b-1", "b-2", "c-1", "c-2"]
    assert order_nodes(_task(), FLEET, PLUGINS) == order_nodes(_task(), FLEET[::-1], PLUGINS)


def test_zone_topology_orders_by_zone_then_name() -> None:
    task = _task(topology="zone")
    assert routing_name(task) == "zone"
    assert names(order_nodes(task, FLEET, PLUGINS)) == ["b-1", "c-1", "a-2", "c-2", "a-1", "b-2"]


def test_rack_topology_orders_by_rack() -> None:
    ordered = order_nodes(_task(topology="rack"), FLEET, PLUGINS)
    assert names(ordered) == ["a-1", "a-2", "c-1", "b-1", "b-2", "c-2"]


def test_seeds_last() -> None:
    ordered = order_nodes(_task(routing="seeds_last"), FLEET, PLUGINS)
    assert names(ordered) == ["a-2", "b-1", "b-2", "c-2", "a-1", "c-1"]


def test_a_chosen_plugin_orders_within_each_zone() -> None:
    ordered = order_nodes(_task(topology="zone", routing="seeds_last"), FLEET, PLUGINS)
    assert names(ordered) == ["b-1", "c-1", "a-2", "c-2", "b-2", "a-1"]  # seeds last in each zone


def test_duplicates_from_discovery_keep_the_first() -> None:
    nodes = [_n("x", zone="1"), _n("y"), _n("x", zone="2")]
    assert order_nodes(_task(), nodes, PLUGINS) == [_n("x", zone="1"), _n("y")]


def test_unknown_plugin_names_the_installed_ones() -> None:
    with pytest.raises(RoutingError) as e:
        order_nodes(_task(routing="leader_last"), FLEET, PLUGINS)
    assert e.value.field == "taskerman_params.routing"
    assert "unknown routing plugin 'leader_last' (installed: name, seeds_last, zone)" in str(e.value)


def test_topology_needs_the_attribute_on_every_node() -> None:
    nodes = [*FLEET, _n("lost"), _n("x-9", rack="r1")]
    with pytest.raises(RoutingError) as e:
        order_nodes(_task(topology="zone"), nodes, PLUGINS, source="static")
    assert e.value.field == "taskerman_params.topology"
    assert "2 of 8 from static have none: 'lost', 'x-9'" in str(e.value)
    with pytest.raises(RoutingError, match="explicit nodes carry no attributes"):
        order_nodes(_task(topology="rack"), [_n("a")], PLUGINS, source="explicit")


class _Filter:
    def order(self, task: Task, nodes: list[NodeInfo]) -> list[NodeInfo]:
        return [n for n in nodes if n.attributes.get("rack") == "r1"]


class _Inventing:
    def order(self, task: Task, nodes: list[NodeInfo]) -> list[NodeInfo]:
        return [*nodes, _n("stranger")]


class _Twice:
    def order(self, task: Task, nodes: list[NodeInfo]) -> list[NodeInfo]:
        return nodes + nodes[:1]


class _Broken:
    def order(self, task: Task, nodes: list[NodeInfo]) -> list[NodeInfo]:
        raise KeyError("leader")


def test_a_plugin_may_filter() -> None:
    plugins: dict[str, Routing] = {"r1": _Filter()}
    assert names(order_nodes(_task(routing="r1"), FLEET, plugins)) == ["a-1", "a-2", "c-1"]


@pytest.mark.parametrize(
    ("plugin", "needle"),
    [
        (_Inventing(), "returned 'stranger', which it was not given"),
        (_Twice(), "(or twice)"),
        (_Broken(), "routing plugin 'p' failed: KeyError('leader')"),
        (_Filter(), "left none of the 1 node(s)"),
    ],
)
def test_misbehaving_plugins_are_routing_errors(plugin: Routing, needle: str) -> None:
    nodes = [_n("only", rack="r9")] if isinstance(plugin, _Filter) else FLEET
    with pytest.raises(RoutingError) as e:
        order_nodes(_task(routing="p"), nodes, {"p": plugin})
    assert needle in str(e.value)


def test_waves_without_topology_are_chunks_of_the_concurrency() -> None:
    ordered = order_nodes(_task(), FLEET, PLUGINS)
    assert waves(_task(), ordered, 2) == (
        Wave(nodes=("a-1", "a-2")),
        Wave(nodes=("b-1", "b-2")),
        Wave(nodes=("c-1", "c-2")),
    )
    four = (Wave(nodes=("a-1", "a-2", "b-1", "b-2")), Wave(nodes=("c-1", "c-2")))
    assert waves(_task(), ordered, 4) == four
    assert waves(_task(), ordered[:1], 3) == (Wave(nodes=("a-1",)),)


def test_waves_with_topology_are_one_per_zone() -> None:
    task = _task(topology="zone", limit=1)
    ordered = order_nodes(task, FLEET, PLUGINS)
    assert waves(task, ordered, 1) == (
        Wave(nodes=("b-1", "c-1"), group="eu-1a"),
        Wave(nodes=("a-2", "c-2"), group="eu-1b"),
        Wave(nodes=("a-1", "b-2"), group="eu-1c"),
    )


def test_a_canary_is_a_wave_of_its_own_and_every_item_names_it() -> None:
    task = _task(limit=3)
    task = msgspec.structs.replace(
        task, taskerman_params=msgspec.structs.replace(task.taskerman_params, canary=2)
    )
    ordered = order_nodes(task, FLEET, PLUGINS)
    assert waves(task, ordered, 3) == (
        Wave(nodes=("a-1", "a-2"), group="canary"),
        Wave(nodes=("b-1", "b-2", "c-1")),
        Wave(nodes=("c-2",)),
    )
    assert all(r.item.canary == ("a-1", "a-2") for r in routes(task, ordered, now=1.0))
    assert routes(_task(), ordered, now=1.0)[0].item.canary == ()  # none: not in the item at all
    assert b"canary" not in msgspec.json.encode(routes(_task(), ordered, now=1.0)[0].item)


def test_routes_keep_the_order_and_carry_attributes() -> None:
    task = _task(topology="zone")
    ordered = order_nodes(task, FLEET, PLUGINS)
    out = routes(task, ordered, now=5.0)
    assert [r.node for r in out] == names(ordered)
    assert out[0].item.attributes == {"zone": "eu-1a", "rack": "r2"}
    assert out[0].msg_id == "t:b-1"


class _Backup(Action):
    name = "test:backup"
    exclusion_groups = ("io", "disk", "io")
    global_limit = 3


def test_plan_leases_in_the_runners_order() -> None:
    task = _task(topology="zone", limit=2, action="test:backup")
    ordered = tuple(order_nodes(task, FLEET, PLUGINS))
    res = Resolution(
        task=task,
        discovery="static",
        routing="zone",
        nodes=ordered,
        waves=waves(task, ordered, 2),
        concurrency=2,
        budget=4,
    )
    leases = plan_leases(task, _Backup, res, known_budget=True)
    assert [(lease.name, lease.limit) for lease in leases] == [
        ("task", 2),
        ("topology", 1),
        ("exclusion", 1),
        ("exclusion", 1),
        ("global", 3),
        ("budget", 4),
    ]
    assert "group 'disk'" in leases[2].detail
    assert "one zone at a time, 3 zone(s)" in leases[1].detail
    plain = plan_leases(_task(), Action, msgspec.structs.replace(res, budget=None), known_budget=True)
    assert [(lease.name, lease.limit) for lease in plain] == [("task", 2), ("budget", None)]
