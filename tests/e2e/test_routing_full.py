"""The router in full, through real router and runner processes on real NATS and ZooKeeper:
discovery plugins with attributes, routing plugins, zone topology, plan preview, two routers."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from taskcore.bus import deadletter
from taskcore.bus.tracking import StatusStore, TaskView
from taskcore.coord.runners import RunnerInfo, node_path, registered
from taskcore.coord.session import ZkSession
from taskcore.core import subjects
from taskcore.core.model import WorkItem, decode_work_item
from taskcore.core.settings import Settings

from .conftest import Stack, away, max_concurrency, publish_raw, task_json, wait_final

GEO = "cassandra:geo"
ZONES = {  # node: (zone, rack, seed)
    "cass-1": ("eu-1a", "r1", True),
    "cass-2": ("eu-1a", "r2", False),
    "cass-3": ("eu-1b", "r1", False),
    "cass-4": ("eu-1b", "r2", True),
    "cass-5": ("eu-1c", "r1", False),
    "cass-6": ("eu-1c", "r2", False),
}


def geo_inventory(extra: str = "") -> str:
    lines = []
    for node, (zone, rack, seed) in ZONES.items():
        lines += [f'[[clusters."{GEO}".node]]', f'name = "{node}"', f'zone = "{zone}"', f'rack = "{rack}"']
        lines += ["seed = true"] if seed else []
    return "\n".join(lines) + "\n" + extra


def start_router(stack: Stack, inventory: str, name: str = "inventory.toml") -> None:
    path = stack.tmp / name
    path.write_text(inventory)
    stack.spawn("taskerman-router", "--inventory", str(path))


async def wait_routed(status: StatusStore, task_id: str, within: float = 30) -> TaskView:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        view = await status.view(task_id)
        if view is not None and view.state != "pending":
            return view
        await asyncio.sleep(0.1)
    raise AssertionError(f"task {task_id} was not routed in {within}s")


async def work_items(js: JetStreamContext) -> list[WorkItem]:
    """Every item in the WORK stream (read by sequence: no consumer is created)."""
    info = await js.stream_info(subjects.WORK_STREAM)
    items = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            raw = await js.get_msg(subjects.WORK_STREAM, seq)
        except NotFoundError:
            continue
        items.append(decode_work_item(raw.data or b""))
    return items


def all_logs(stack: Stack) -> str:
    """Every process log in full (Stack.logs keeps only the tails)."""
    return "\n".join(p.read_text() for p in sorted(stack.tmp.glob("*.log")))


def sleep_task(task_id: str, cluster: str = GEO, seconds: float = 0.05, **fields: Any) -> bytes:
    params = fields.pop("taskerman_params", {})
    params.setdefault("action_args", {"seconds": seconds})
    return task_json(
        action="test:sleep", cluster_name=cluster, task_id=task_id, taskerman_params=params, **fields
    )


async def test_static_attributes_reach_the_work_items_and_the_plan_shows_in_status(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    start_router(stack, geo_inventory())
    await away(stack.settings, GEO, list(ZONES))  # no runner yet: the items wait in WORK
    await publish_raw(js[1], sleep_task("attrs-1", limit=2, taskerman_params={"topology": "zone"}))
    view = await wait_routed(status, "attrs-1")
    assert view.state == "routed", view
    # the task record says routed before the router has published every item: wait for all six
    deadline = time.monotonic() + 20
    items = {i.node: i for i in await work_items(js[1])}
    while len(items) < len(ZONES) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        items = {i.node: i for i in await work_items(js[1])}
    assert sorted(items) == sorted(ZONES)
    for node, (zone, rack, seed) in ZONES.items():
        expect = {"zone": zone, "rack": rack} | ({"seed": "true"} if seed else {})
        assert items[node].attributes == expect
    assert [(w.group, w.nodes) for w in view.plan] == [
        ("eu-1a", ("cass-1", "cass-2")),
        ("eu-1b", ("cass-3", "cass-4")),
        ("eu-1c", ("cass-5", "cass-6")),
    ]
    out = stack.cli("status", "attrs-1")
    assert out.returncode == 0, out.stderr
    print(out.stdout)
    assert "plan (one zone at a time):" in out.stdout
    assert re.search(r"wave 2 +zone eu-1b +\(2\) +cass-3, cass-4", out.stdout), out.stdout
    shown = json.loads(stack.cli("status", "attrs-1", "--json").stdout)
    assert shown["topology"] == "zone"
    assert shown["plan"][0] == {"nodes": ["cass-1", "cass-2"], "group": "eu-1a"}


async def test_registry_excludes_a_runner_that_stopped_heartbeating(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore, settings: Settings
) -> None:
    cluster = "redis:cache"
    stack.router()
    stack.runner(cluster, ["r-1", "r-2"])
    async with ZkSession.from_settings(settings) as zk:
        stale = RunnerInfo(
            cluster=cluster,
            node="r-3",
            pid=999999,
            version="0",
            actions=("test:sleep",),
            since=time.time() - 120,
            heartbeat=time.time() - 60,  # its runner stopped heartbeating a minute ago
        )
        path = node_path(cluster, "r-3")
        await zk.client.ensure_path(path.rsplit("/", 1)[0])
        await zk.client.create(path, data=msgspec.json.encode(stale))
        deadline = time.monotonic() + 20
        while len(await registered(zk, cluster)) < 3:  # the live runners have registered
            assert time.monotonic() < deadline, stack.logs()
            await asyncio.sleep(0.1)
    await publish_raw(js[1], sleep_task("reg-1", cluster=cluster, limit=2, discovery="registry"))
    view = await wait_final(status, "reg-1", stack=stack)
    assert view.state == "succeeded", view
    assert sorted(view.nodes) == ["r-1", "r-2"]


async def test_dns_discovery_of_localhost(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router()
    stack.runner("localhost", ["127.0.0.1", "::1"])
    await publish_raw(js[1], sleep_task("dns-1", cluster="localhost", limit=2, discovery="dns"))
    view = await wait_final(status, "dns-1", stack=stack)
    assert view.state == "succeeded", view
    assert "127.0.0.1" in view.nodes
    assert {i["node"] for i in stack.intervals()} == set(view.nodes)


async def test_routing_failures_are_dead_letters_with_their_reason(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    start_router(
        stack,
        geo_inventory(
            '[clusters."flat"]\nnodes = ["f-1", "f-2"]\n'
            '[clusters."empty"]\nnodes = []\n'
            '[clusters."es:logs"]\naws_tags = { team = "search" }\n'
        ),
    )
    stack.runner("flat", ["f-1", "f-2"])
    cases = {
        "bad-discovery": (
            sleep_task("bad-discovery", discovery="consul"),
            "unknown discovery plugin 'consul' (installed: aws_tags, dns, registry, static)",
        ),
        "bad-routing": (
            sleep_task("bad-routing", taskerman_params={"routing": "leader_last"}),
            "unknown routing plugin 'leader_last' (installed: name, seeds_last, zone)",
        ),
        "no-zone": (
            sleep_task("no-zone", cluster="flat", taskerman_params={"topology": "zone"}),
            "topology 'zone' needs a 'zone' attribute on every node; 2 of 2 from static have none",
        ),
        "explicit-zone": (
            sleep_task("explicit-zone", nodes=["cass-1"], taskerman_params={"topology": "rack"}),
            "explicit nodes carry no attributes",
        ),
        "empty": (sleep_task("empty", cluster="empty"), "cluster 'empty' in"),
        "aws": (sleep_task("aws", cluster="es:logs", discovery="aws_tags"), "pip install 'taskerman[aws]'"),
    }
    for payload, _ in cases.values():
        await publish_raw(js[1], payload)
    await publish_raw(js[1], sleep_task("ok-after", cluster="flat", limit=2))
    assert (await wait_final(status, "ok-after", stack=stack)).state == "succeeded"
    letters = {d.task_id: d for _, d in await deadletter.entries(js[1])}
    for task_id, (_, needle) in cases.items():
        assert task_id in letters, (task_id, sorted(letters))
        assert needle in letters[task_id].reason, letters[task_id].reason
        view = await status.view(task_id)
        assert view is not None
        assert view.state == "dead"
        assert view.error == letters[task_id].reason
    print("\n".join(f"{t}: {d.reason}" for t, d in sorted(letters.items())))


def overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return bool(a["start"] < b["end"] and b["start"] < a["end"])


async def test_zone_topology_never_lets_two_zones_act_at_once(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    start_router(stack, geo_inventory())
    nodes = sorted(ZONES)
    stack.runner(GEO, nodes[0::2])  # each process serves nodes of every zone
    stack.runner(GEO, nodes[1::2])
    await publish_raw(
        js[1], sleep_task("zones-1", seconds=0.5, limit=2, taskerman_params={"topology": "zone"})
    )
    view = await wait_final(status, "zones-1", within=60, stack=stack)
    assert view.state == "succeeded", view
    runs = [i for i in stack.intervals() if i["task_id"] == "zones-1"]
    assert sorted(i["node"] for i in runs) == nodes
    zone_of = {n: z for n, (z, _, _) in ZONES.items()}
    clashes = [
        (a["node"], b["node"])
        for a in runs
        for b in runs
        if zone_of[a["node"]] < zone_of[b["node"]] and overlap(a, b)
    ]
    assert clashes == [], clashes
    assert max_concurrency(runs) == 2  # the two nodes of a zone did act together
    order = [zone_of[i["node"]] for i in sorted(runs, key=lambda i: i["start"])]
    print("zones in start order:", order)
    assert [w.group for w in view.plan] == ["eu-1a", "eu-1b", "eu-1c"]


async def test_two_routers_route_every_node_item_exactly_once(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    nodes = ["n-1", "n-2", "n-3"]
    await away(stack.settings, "pair", nodes)  # the runner starts once every item is published
    start_router(stack, f'[clusters."pair"]\nnodes = {json.dumps(nodes)}\n')
    start_router(stack, f'[clusters."pair"]\nnodes = {json.dumps(nodes)}\n', name="inventory-2.toml")
    deadline = time.monotonic() + 20
    while (await js[1].consumer_info(subjects.TASKS_STREAM, subjects.ROUTER_DURABLE)).num_waiting < 2:
        assert time.monotonic() < deadline, "both routers should be pulling\n" + stack.logs()
        await asyncio.sleep(0.1)
    ids = [f"pair-{i:02d}" for i in range(50)]
    for task_id in ids:  # every task twice, under two message ids: both routers may see one task
        payload = sleep_task(task_id, cluster="pair", seconds=0.0, limit=3)
        await publish_raw(js[1], payload)
        await publish_raw(js[1], payload, msg_id=f"again-{task_id}")
    for task_id in ids:
        await wait_routed(status, task_id)
    tasks_left = await js[1].stream_info(subjects.TASKS_STREAM)
    deadline = time.monotonic() + 20
    while tasks_left.state.messages and time.monotonic() < deadline:  # the duplicates are acked too
        await asyncio.sleep(0.1)
        tasks_left = await js[1].stream_info(subjects.TASKS_STREAM)
    assert tasks_left.state.messages == 0
    items = await work_items(js[1])
    routed = Counter((i.task.task_id, i.node) for i in items)
    assert len(items) == 150
    assert set(routed) == {(t, n) for t in ids for n in nodes}
    assert set(routed.values()) == {1}
    per_router = Counter(re.findall(r"taskerman-router\[(\d+)\].*routed task_id=", all_logs(stack)))
    print("tasks routed per router process:", dict(per_router))
    assert len(per_router) == 2, per_router  # both routers took part
    assert sum(per_router.values()) == 100  # each of the 100 messages was handled once

    stack.runner("pair", nodes)  # and each (task, node) then runs exactly once
    for task_id in ids:
        assert (await wait_final(status, task_id, stack=stack)).state == "succeeded"
    ran = Counter((i["task_id"], i["node"]) for i in stack.intervals())
    assert set(ran) == set(routed)
    assert set(ran.values()) == {1}


async def test_plan_preview_of_a_zone_aware_task(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    plan_args = ["plan", "test:backup", "--cluster", GEO, "--limit", "2", "--topology", "zone"]
    plan_args += ["--routing", "seeds_last", "--arg", "seconds=30", "--task-id", "backup-geo"]
    out = stack.cli(*plan_args, timeout=60)
    assert out.returncode == 1, out
    assert "no router answered on taskerman.api.plan" in out.stderr

    start_router(stack, geo_inventory())
    assert stack.cli("cluster", "budget", GEO, "3").returncode == 0
    out = stack.cli(*plan_args)
    assert out.returncode == 0, out.stderr + stack.logs()
    print("\n$ taskerman " + " ".join(plan_args) + "\n" + out.stdout)
    text = out.stdout
    assert "plan for test:backup on cassandra:geo  (task backup-geo; nothing was submitted)" in text
    assert "6 node(s) from discovery 'static', ordered by routing 'seeds_last', topology 'zone'" in text
    assert re.search(r"wave 1 +zone eu-1a +\(2\) +cass-2, cass-1\n", text), text  # seed last in its zone
    assert re.search(r"wave 2 +zone eu-1b +\(2\) +cass-3, cass-4\n", text), text
    assert re.search(r"exclusion +1 +group 'io'", text)
    assert re.search(r"topology +1 +one zone at a time, 3 zone\(s\)", text)
    assert re.search(r"budget +3 +cluster disruption budget", text)
    assert re.search(r"task +2 +at most 2 of the task's 6 node\(s\)", text)
    assert "breaker: closed" in text

    as_json = json.loads(stack.cli(*plan_args, "--json").stdout)
    assert [w["nodes"] for w in as_json["waves"]] == [
        ["cass-2", "cass-1"],
        ["cass-3", "cass-4"],
        ["cass-5", "cass-6"],
    ]
    assert as_json["concurrency"] == 2

    flat = stack.cli(
        "submit", "test:sleep", "--cluster", GEO, "--limit", "4", "--dry-run", "--task-id", "dry"
    )
    assert flat.returncode == 0, flat.stderr
    print("$ taskerman submit test:sleep --cluster cassandra:geo --limit 4 --dry-run\n" + flat.stdout)
    assert "waves: the ideal schedule, 3 node(s) at a time" in flat.stdout  # the budget of 3 binds
    assert re.search(r"wave 1 +\(3\) +cass-1, cass-2, cass-3\n", flat.stdout), flat.stdout
    assert await status.get_task("dry") is None  # nothing was submitted
    assert await status.get_task("backup-geo") is None
    assert (await js[1].stream_info(subjects.TASKS_STREAM)).state.messages == 0

    bad = stack.cli("plan", "test:sleep", "--cluster", GEO, "--discovery", "consul")
    assert bad.returncode == 2
    assert "cannot route the task: discovery: unknown discovery plugin 'consul'" in bad.stderr
    missing = stack.cli("plan", "test:sleep", "--cluster", "nowhere")
    assert missing.returncode == 1
    assert "unknown cluster 'nowhere'" in missing.stderr
