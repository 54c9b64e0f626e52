"""The elasticsearch pack against a small HTTP server answering the Elasticsearch endpoints it uses
(tests/packs/fakes/elasticsearch.py): Elasticsearch cannot run here, so these tests check the rolling-
restart procedure's sequence of calls and its failure handling."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

from taskcore.core.errors import ActionFailed, InvalidTask
from taskcore.packs import elasticsearch
from taskcore.packs.elasticsearch import ElasticsearchRestart
from taskerman_dev.launchers import free_port
from tests.packs.datastores import FAKES, action_context, run_steps
from tests.packs.fakes.elasticsearch import FakeElasticsearch

NODE = "es-2"
ALLOCATION = "cluster.routing.allocation.enable"


@pytest.fixture
def es(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeElasticsearch]:
    monkeypatch.setattr(elasticsearch, "POLL", 0.05)
    with FakeElasticsearch(["es-1", NODE, "es-3"]) as fake:
        yield fake


def table(es: FakeElasticsearch, **extra: Any) -> dict[str, Any]:
    """The node's `[packs.elasticsearch]`: the fake's restart stands in for `systemctl restart`."""
    restart = [sys.executable, str(FAKES / "elasticsearch.py"), "restart", es.url, NODE]
    return {"url": es.url, "node_name": NODE, "restart_command": restart, **extra}


def settings_calls(es: FakeElasticsearch) -> list[Any]:
    return [c.body["persistent"][ALLOCATION] for c in es.state.calls if c.path == "/_cluster/settings"]


def steps(es: FakeElasticsearch) -> list[str]:
    """The calls in order, with repeated polls collapsed into one."""
    out: list[str] = []
    for call in es.state.calls:
        name = str(call)
        if call.path == "/_cluster/settings":
            name += f" {call.body['persistent'][ALLOCATION]}"
        if not out or out[-1] != name:
            out.append(name)
    return out


async def test_rolling_restart_follows_the_procedure(es: FakeElasticsearch) -> None:
    ctx = action_context(ElasticsearchRestart, table(es), {"rejoin_timeout": 10, "health_timeout": 10})
    action = ElasticsearchRestart()

    await run_steps(action, ctx)

    assert steps(es) == [
        "GET /_cluster/health",  # pre_check: green
        "GET /_cat/nodes",  # ... and lists the node (its pid is noted)
        "PUT /_cluster/settings primaries",  # replicas are not reallocated while the node is away
        "POST /_flush",
        "POST /_fake/restart",  # restart_command
        "GET /_cat/nodes",  # until the node is back with a new pid
        "PUT /_cluster/settings None",  # allocation re-enabled
        "GET /_cluster/health",  # until green
    ]
    nodes_polls = [c for c in es.state.calls if c.path == "/_cat/nodes"]
    assert len(nodes_polls) > 2  # it was away for a while
    assert es.state.persistent == {}
    assert es.state.nodes[NODE].pid != 101
    assert es.health()["status"] == "green"


async def test_refuses_a_red_or_yellow_cluster(es: FakeElasticsearch) -> None:
    es.state.stuck_status = "red"
    with pytest.raises(ActionFailed, match=r"refusing to restart 'node-1': the cluster is red"):
        await ElasticsearchRestart().pre_check(action_context(ElasticsearchRestart, table(es)))
    es.state.stuck_status = "yellow"
    with pytest.raises(ActionFailed, match=r"the cluster is yellow"):
        await ElasticsearchRestart().pre_check(action_context(ElasticsearchRestart, table(es)))
    await ElasticsearchRestart().pre_check(
        action_context(ElasticsearchRestart, table(es, accept_yellow=True))
    )
    assert settings_calls(es) == []


async def test_refuses_a_node_the_cluster_does_not_list(es: FakeElasticsearch) -> None:
    ctx = action_context(ElasticsearchRestart, table(es, node_name="es-9"))
    with pytest.raises(ActionFailed, match=r"does not list node 'es-9'"):
        await ElasticsearchRestart().pre_check(ctx)


async def test_post_check_fails_when_the_cluster_stays_red(es: FakeElasticsearch) -> None:
    ctx = action_context(ElasticsearchRestart, table(es), {"health_timeout": 0.5})
    action = ElasticsearchRestart()
    await action.pre_check(ctx)
    await action.execute_action(ctx)
    es.state.stuck_status = "red"
    with pytest.raises(ActionFailed, match=r"the cluster is not green within 0.5s: red") as e:
        await action.post_check(ctx)
    assert e.value.step == "post_check"
    assert settings_calls(es) == ["primaries", None]


async def test_yellow_passes_only_when_the_node_accepts_it(es: FakeElasticsearch) -> None:
    for accept, passes in ((True, True), (False, False)):
        ctx = action_context(ElasticsearchRestart, table(es, accept_yellow=accept), {"health_timeout": 0.5})
        action = ElasticsearchRestart()
        es.state.stuck_status = None
        await action.pre_check(ctx)
        await action.execute_action(ctx)
        es.state.stuck_status = "yellow"
        if passes:
            await action.post_check(ctx)
        else:
            with pytest.raises(ActionFailed, match=r"not green within 0.5s: yellow"):
                await action.post_check(ctx)


async def test_node_that_never_rejoins_fails_and_reenables_allocation(es: FakeElasticsearch) -> None:
    es.state.rejoin_after = float("inf")
    ctx = action_context(ElasticsearchRestart, table(es), {"rejoin_timeout": 0.5})
    action = ElasticsearchRestart()
    await action.pre_check(ctx)
    await action.execute_action(ctx)
    with pytest.raises(ActionFailed, match=r"'es-2' did not rejoin within 0.5s .*allocation is re-enabled"):
        await action.post_check(ctx)
    assert settings_calls(es) == ["primaries", None]
    assert es.state.persistent == {}


async def test_failed_restart_command_reenables_allocation(es: FakeElasticsearch) -> None:
    ctx = action_context(ElasticsearchRestart, table(es, restart_command=["false"]))
    action = ElasticsearchRestart()
    await action.pre_check(ctx)
    with pytest.raises(ActionFailed, match=r"false exited with status 1") as e:
        await action.execute_action(ctx)
    assert e.value.step == "execute_action"
    assert settings_calls(es) == ["primaries", None]
    assert [str(c) for c in es.state.calls if c.method == "POST"] == ["POST /_flush"]


async def test_stop_and_start_commands(es: FakeElasticsearch) -> None:
    restart = table(es)["restart_command"]
    ctx = action_context(
        ElasticsearchRestart,
        {"url": es.url, "node_name": NODE, "stop_command": ["true"], "start_command": restart},
        {"rejoin_timeout": 10, "health_timeout": 10},
    )
    await run_steps(ElasticsearchRestart(), ctx)
    assert settings_calls(es) == ["primaries", None]


async def test_other_urls_answer_while_this_node_does_not(es: FakeElasticsearch) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    ctx = action_context(
        ElasticsearchRestart, table(es, url=down, other_urls=[es.url]), {"rejoin_timeout": 10}
    )
    await run_steps(ElasticsearchRestart(), ctx)
    assert settings_calls(es) == ["primaries", None]
    ctx = action_context(ElasticsearchRestart, table(es, url=down))
    with pytest.raises(ActionFailed, match=r"cannot check the cluster: GET /_cluster/health: no answer"):
        await ElasticsearchRestart().pre_check(ctx)


def test_node_config_decides_what_may_run(es: FakeElasticsearch) -> None:
    with pytest.raises(InvalidTask, match=r"restart_command, or stop_command and start_command"):
        action_context(ElasticsearchRestart, {"url": es.url, "node_name": NODE, "stop_command": ["true"]})
    with pytest.raises(InvalidTask, match=r"packs.elasticsearch"):
        action_context(ElasticsearchRestart, {"url": es.url, "restart_command": ["true"]})  # no node_name
    with pytest.raises(InvalidTask, match=r"url 'file:///etc/passwd' is not http"):
        action_context(ElasticsearchRestart, table(es, other_urls=["file:///etc/passwd"]))
    with pytest.raises(InvalidTask, match=r"unknown field"):
        action_context(ElasticsearchRestart, table(es), {"url": "http://elsewhere:9200"})
