"""Every wait explained, on real processes: a node that cannot start says in its record what holds
it back (`waiting_for`) and `taskerman status` and `watch` show it with the command that would
release it; the record is cleared once the node starts. Behind an open breaker, behind a full
budget held by another task, and in a paused task."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus import audit
from taskcore.bus.tracking import PauseRecord, StatusStore
from taskcore.core.settings import Settings

from .conftest import BIN, QUICK_EXIT, Stack, publish_raw, task_json, wait_final


def sleep_task(task_id: str, cluster: str, nodes: list[str], limit: int = 2, **params: Any) -> bytes:
    args = params.pop("args", {"seconds": 0.1})
    return task_json(
        action="test:sleep",
        cluster_name=cluster,
        nodes=nodes,
        limit=limit,
        task_id=task_id,
        taskerman_params={"action_args": args, **params},
    )


def status_json(stack: Stack, task_id: str) -> dict[str, Any]:
    """`taskerman status TASK_ID --json`; {} while the task is not known yet (not yet routed)."""
    out = stack.cli("status", task_id, "--json")
    if out.returncode == 1 and "unknown task" in out.stderr:
        return {}
    assert out.returncode == 0, out.stdout + out.stderr
    view: dict[str, Any] = json.loads(out.stdout)
    return view


async def waits_of(
    stack: Stack, task_id: str, nodes: list[str], match: Callable[[str], bool], within: float = 60
) -> dict[str, dict[str, Any]]:
    """Poll `taskerman status --json` (as a user would) until every one of `nodes` says it waits
    for something `match` accepts; their `waiting_for` fields."""
    deadline = time.monotonic() + within
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = (await asyncio.to_thread(status_json, stack, task_id)).get("nodes", {})
        waits = {n: seen[n].get("waiting_for") for n in nodes if n in seen}
        if len(waits) == len(nodes) and all(w and match(w["reason"]) for w in waits.values()):
            return waits
        await asyncio.sleep(0.3)
    raise AssertionError(f"{task_id}: the nodes do not say so: {seen}\n{stack.logs()}")


def watching(stack: Stack, task_id: str) -> subprocess.Popen[str]:
    """`taskerman watch TASK_ID` into a pipe: the plain lines (not a terminal)."""
    return subprocess.Popen(
        [str(BIN / "taskerman"), "watch", task_id], env=stack.env(), stdout=subprocess.PIPE, text=True
    )


def taskerman(stack: Stack, *args: str) -> subprocess.Popen[str]:
    """`taskerman ARGS` in the background, its output in pipes."""
    return subprocess.Popen(
        [str(BIN / "taskerman"), *args],
        env=stack.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def line_with(proc: subprocess.Popen[str], text: str) -> str:
    """The first line the process prints that contains `text` (the test's timeout bounds it)."""
    assert proc.stdout is not None
    read: list[str] = []
    while line := await asyncio.to_thread(proc.stdout.readline):
        read.append(line)
        if text in line:
            return line
    raise AssertionError(f"no line with {text!r} before the output ended: {''.join(read)}")


async def test_a_task_behind_an_open_breaker_says_so_until_the_reset(
    settings: Settings, tmp_path: Path, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack = Stack(msgspec.structs.replace(settings, breaker_threshold=1), tmp_path)
    try:
        stack.router()
        stack.runner("pg:sick", ["p1", "p2"])
        fail = {"args": {"seconds": 0.05, "fail": True}, "workqueue_args": {"retry_count": 0}}
        await publish_raw(js[1], sleep_task("fails", "pg:sick", ["p1"], **fail))
        assert (await wait_final(status, "fails", stack=stack)).state == "dead"

        await publish_raw(js[1], sleep_task("held", "pg:sick", ["p1", "p2"]))
        waits = await waits_of(stack, "held", ["p1", "p2"], lambda r: r.startswith("breaker open since"))
        for w in waits.values():
            assert "(reason fails on p1: ActionFailed: execute_action failed" in w["reason"], w
            assert w["release"] == "taskerman breaker reset pg:sick", w
            assert w["since"] > 0, w
        shown = stack.cli("status", "held").stdout
        assert "for: breaker open since" in shown, shown
        assert "`taskerman breaker reset pg:sick` releases it" in shown, shown
        assert stack.intervals() == [i for i in stack.intervals() if i["task_id"] == "fails"]

        watch = watching(stack, "held")
        line = await line_with(watch, "waiting:")
        assert "2 node(s) (p1, p2): breaker open since" in line, line
        assert "`taskerman breaker reset pg:sick` releases it" in line, line
        reset = stack.cli("breaker", "reset", "pg:sick")
        assert reset.returncode == 0, reset.stdout + reset.stderr
        assert await asyncio.to_thread(watch.wait, 60) == 0  # the watch ends with the task's success
        view = await wait_final(status, "held", stack=stack)
        assert view.state == "succeeded", view
        assert all(r.waiting_for is None for r in view.nodes.values()), view  # cleared when it started
    finally:
        stack.stop()


async def test_a_task_behind_a_full_budget_names_the_task_and_nodes_holding_it(
    settings: Settings, tmp_path: Path, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    """The holder fails while a marker file exists and retries in place, keeping its budget slots
    through its backoff (50 retries a second apart): the budget stays full, held by it, until the
    test removes the marker (a high breaker threshold keeps its failures from opening the breaker)."""
    marker = tmp_path / "sick"
    marker.write_text("fails while this exists")
    stack = Stack(msgspec.structs.replace(settings, breaker_threshold=10_000), tmp_path)
    try:
        stack.router()
        stack.runner("kafka:main", ["n1", "n2"], packs={"test": {"fail_marker": str(marker)}})
        stack.runner("kafka:main", ["n3", "n4"])
        out = stack.cli("cluster", "budget", "kafka:main", "2")
        assert out.returncode == 0, out.stdout + out.stderr
        retry = {"workqueue_args": {"retry_count": 50, "backoff": [1.0]}}
        await publish_raw(js[1], sleep_task("first", "kafka:main", ["n1", "n2"], **retry))

        async def both_failed() -> bool:
            view = await status.view("first")
            return view is not None and all(r.failures for r in view.nodes.values()) and len(view.nodes) == 2

        deadline = time.monotonic() + 60
        while not await both_failed():
            assert time.monotonic() < deadline, stack.logs()
            await asyncio.sleep(0.2)
        await publish_raw(js[1], sleep_task("second", "kafka:main", ["n3", "n4"]))
        waits = await waits_of(stack, "second", ["n3", "n4"], lambda r: r.startswith("budget "))
        held = {f"budget 2/2 held by first on {a}, {b}" for a, b in (("n1", "n2"), ("n2", "n1"))}
        for w in waits.values():
            assert w["reason"] in held, w  # the longest-held first: they took it a moment apart
            assert w["release"] == "", w
        shown = stack.cli("status", "second").stdout
        assert any(f"for: {reason}" in shown for reason in held), shown
        assert [i for i in stack.intervals() if i["task_id"] == "second"] == []

        marker.unlink()  # the holder recovers and lets go
        for task_id in ("first", "second"):
            view = await wait_final(status, task_id, stack=stack)
            assert view.state == "succeeded", view
            assert all(r.waiting_for is None for r in view.nodes.values()), view
    finally:
        stack.stop()


async def test_the_waiting_nodes_of_a_paused_task_say_paused(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    """Paused before its items arrive (as `taskerman pause` writes it), so that no node runs first."""
    nodes = ["n1", "n2", "n3"]
    stack.router()
    stack.runner("c1", nodes)
    await status.pause("px", PauseRecord(by="alice", at=time.time(), reason="look at the graphs"))
    await publish_raw(js[1], sleep_task("px", "c1", nodes, limit=1))
    waits = await waits_of(stack, "px", nodes, lambda r: r.startswith("paused"))
    for w in waits.values():
        assert w["reason"] == "paused by alice (look at the graphs)", w
        assert w["release"] == "taskerman resume px", w
    shown = stack.cli("status", "px").stdout
    assert "for: paused by alice (look at the graphs); `taskerman resume px` releases it" in shown, shown
    assert stack.intervals() == []

    out = stack.cli("resume", "px")
    assert out.returncode == 0, out.stdout + out.stderr
    view = await wait_final(status, "px", stack=stack)
    assert view.state == "succeeded", view
    assert all(r.waiting_for is None for r in view.nodes.values()), view


async def test_a_frozen_cluster_starts_nothing_and_says_until_when(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router()
    stack.runner("db:main", ["n1", "n2"])
    out = stack.cli("cluster", "freeze", "db:main", "--until", "2h", "--reason", "release week")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "frozen until" in out.stdout, out.stdout
    assert "(release week)" in out.stdout, out.stdout
    assert "nothing new starts" in out.stdout, out.stdout
    await publish_raw(js[1], sleep_task("frozen", "db:main", ["n1", "n2"]))
    waits = await waits_of(stack, "frozen", ["n1", "n2"], lambda r: r.startswith("cluster frozen until"))
    for w in waits.values():
        assert w["reason"].endswith("(release week)"), w
        assert w["release"] == "taskerman cluster unfreeze db:main", w
    shown = stack.cli("status", "frozen").stdout
    assert "`taskerman cluster unfreeze db:main` releases it" in shown, shown
    assert stack.intervals() == []

    out = stack.cli("cluster", "unfreeze", "db:main")  # heard on the config's watch, not polled
    assert out.returncode == 0, out.stdout + out.stderr
    assert "open now" in out.stdout, out.stdout
    view = await wait_final(status, "frozen", within=30, stack=stack)
    assert view.state == "succeeded", view
    kinds = [e.kind for e in await audit.read(js[1], audit.cluster_subject("db:main"))]
    assert kinds == ["cluster-frozen", "cluster-unfrozen"], kinds


async def test_outside_its_maintenance_window_a_cluster_waits_for_it(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    """A daily window that opened an hour ago and closed a minute ago: closed now, open again in
    about 23 hours; clearing the windows lets the task go at once."""
    now = time.gmtime(time.time())
    start, end = (now.tm_hour - 1) % 24, now.tm_hour
    spec = f"daily {start:02d}:{now.tm_min:02d}-{end:02d}:{now.tm_min:02d} UTC"
    if now.tm_min == 0 or now.tm_sec > 50:  # keep clear of the window's edge
        spec = f"daily {(now.tm_hour + 2) % 24:02d}:00-{(now.tm_hour + 3) % 24:02d}:00 UTC"
    stack.router()
    stack.runner("db:main", ["n1"])
    bad = stack.cli("cluster", "window", "db:main", "weekdays 02:00-05:00 UTC")
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "use Mon…Sun, ranges like Mon-Fri, or daily" in bad.stderr, bad.stderr
    out = stack.cli("cluster", "window", "db:main", spec)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"windows {spec}" in out.stdout, out.stdout
    assert "closed until" in out.stdout, out.stdout
    await publish_raw(js[1], sleep_task("later", "db:main", ["n1"]))
    waits = await waits_of(stack, "later", ["n1"], lambda r: r.startswith("outside maintenance window until"))
    assert waits["n1"]["reason"].endswith(f"({spec})"), waits
    assert waits["n1"]["release"] == "taskerman cluster window db:main --clear", waits
    assert stack.intervals() == []

    out = stack.cli("cluster", "window", "db:main", "--clear")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "none (always open)" in out.stdout, out.stdout
    view = await wait_final(status, "later", within=30, stack=stack)
    assert view.state == "succeeded", view


async def test_a_window_that_opens_in_a_few_seconds_holds_the_rollout_until_then(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    opens = time.time() + 5
    start, end = time.gmtime(opens), time.gmtime(opens + 3600)
    spec = f"daily {time.strftime('%H:%M:%S', start)}-{time.strftime('%H:%M:%S', end)} UTC"
    stack.router()
    stack.runner("db:main", ["n1", "n2"])
    out = stack.cli("cluster", "window", "db:main", spec)
    assert out.returncode == 0, out.stdout + out.stderr
    await publish_raw(js[1], sleep_task("soon", "db:main", ["n1", "n2"], limit=1))
    view = await wait_final(status, "soon", within=60, stack=stack)
    assert view.state == "succeeded", view
    starts = [i["start"] for i in stack.intervals()]
    assert len(starts) == 2
    assert min(starts) >= int(opens), (starts, opens)  # nothing before the window opened


async def test_ctrl_c_during_wait_says_the_task_keeps_running(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    stack.router()
    stack.runner("c1", ["n1"], extra_env=QUICK_EXIT)
    proc = taskerman(
        stack, "submit", "test:sleep", "--cluster", "c1", "--node", "n1", "--arg", "seconds=30",
        "--task-id", "long-1", "--wait",
    )  # fmt: skip

    async def running() -> bool:
        rec = await status.get_node("long-1", "n1")
        return rec is not None and rec.state == "running"

    deadline = time.monotonic() + 30
    while not await running():
        assert time.monotonic() < deadline, stack.logs()
        await asyncio.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _out, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted: task long-1 keeps running; `taskerman watch long-1` follows it again" in err, err
    assert "Traceback" not in err, err
    assert (await status.get_node("long-1", "n1")).state == "running"  # type: ignore[union-attr]
    assert stack.cli("cancel", "long-1").returncode == 0
