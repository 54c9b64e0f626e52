"""Faults with real processes: a lease holder paused past its ZooKeeper session, and ZooKeeper itself
killed and restarted in the middle of a rolling task. The witness file (written by `test:sleep`, ending
each interval at its last successful checkpoint) is the judge: never more than `limit` acting at once,
nothing lost, and nobody acting once its session could have expired.

What happens in the pause test, step by step (from the runner and ZooKeeper logs; session timeout 4 s,
trust window 3 s = timeout minus a 25% margin):
 1. Runner A takes the slot of the task's semaphore (fencing token = its holder node's czxid, T1),
    marks its node down (a persistent marker of owner A's node, lasting 2 x (ack_wait + session
    timeout)) and starts its 8 s sleep; runner B fetches its item, finds the slot taken and waits at
    the head of the queue on a children watch, keeping its item claimed with in-progress acks.
 2. A is SIGSTOPped. ZooKeeper hears nothing from it; 4 s after A's last ping it expires the session
    and deletes A's ephemeral holder node. A's own trust window had closed a second earlier.
 3. B's watch fires and B reads the holders: A's node still holds through its marker (it may be
    half-done), so B waits on.
 4. A is SIGCONTed ~8 s after the stop. The sleep's checkpoint (or the runner's guard) finds the last
    ZooKeeper round trip ~8 s old, far past the trust window, and raises LeaseLost before any further
    step. The witness interval of A's first attempt ends at its last checkpoint before the stop. A
    renews its markers through the new session aiozk opened, logs "released back task_id=… node=n1
    step=execute_action error=zookeeper session untrusted (…)" and marks the node `retrying`. It
    keeps the item claimed (no nak: the node's next item must not come first) and, 2 s later, waits
    for its leases again in place.
 5. A's node holds (its markers): it joins at once, takes the slot (token T2 > T1) and runs its sleep
    again from scratch: attempt 2, no failure counted. Its success releases the slot and the markers
    in one transaction; then B takes the slot (T3 > T2) and runs.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus import jetstream as bus
from taskcore.bus.tracking import StatusStore
from taskcore.coord.session import SAFETY_MARGIN
from taskcore.core.settings import Settings
from taskerman_dev.launchers import NatsServer, ZooKeeperServer

from .conftest import Stack, max_concurrency, publish_raw, task_json, wait_final

_T = TypeVar("_T")
CLUSTER = "c1"
PAUSE_SLEEP = 8.0  # the paused holder is still mid-action when it resumes
PAUSE_FOR = 8.0  # twice the e2e session timeout
SLACK = 0.5  # scheduling slack on a loaded machine, for bounds read off the witness


async def eventually(probe: Callable[[], Awaitable[_T | None]], within: float, what: str, stack: Stack) -> _T:
    """Poll `probe` until it returns something other than None."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = await probe()
        if found is not None:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {within}s: {what}\n{stack.logs()}")


def running(status: StatusStore, task_id: str, nodes: list[str]) -> Callable[[], Awaitable[list[str] | None]]:
    """A probe: the nodes of `task_id` whose runner has its leases and is acting, when there are any."""

    async def probe() -> list[str] | None:
        found = []
        for node in nodes:
            rec = await status.get_node(task_id, node)
            if rec is not None and rec.state == "running":
                found.append(node)
        return found or None

    return probe


def complete(interval: dict[str, Any], seconds: float) -> bool:
    """Whether a witness interval covers the whole sleep (the attempt was not cut short)."""
    return bool(interval["end"] - interval["start"] >= seconds - 0.01)


async def two_runners_one_slot(
    stack: Stack, js: JetStreamContext, task_id: str, seconds: float, workqueue_args: dict[str, Any]
) -> dict[str, subprocess.Popen[bytes]]:
    """A router, a runner each for n1 and n2, and a task of `seconds` on both under limit 1; the
    runner processes by node."""
    stack.router({CLUSTER: ["n1", "n2"]})
    procs = {"n1": stack.runner(CLUSTER, ["n1"]), "n2": stack.runner(CLUSTER, ["n2"])}
    params = {"action_args": {"seconds": seconds}, "workqueue_args": workqueue_args}
    await publish_raw(
        js,
        task_json(
            action="test:sleep", cluster_name=CLUSTER, limit=1, task_id=task_id, taskerman_params=params
        ),
    )
    return procs


async def test_paused_holder_acts_no_more_and_keeps_its_place(
    stack: Stack, settings: Settings, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    task_id = "pause-1"
    procs = await two_runners_one_slot(stack, js[1], task_id, PAUSE_SLEEP, {"retry_count": 2, "backoff": 0.5})
    [first] = await eventually(running(status, task_id, ["n1", "n2"]), 30, "a node running", stack)
    other = "n2" if first == "n1" else "n1"
    await asyncio.sleep(1.0)  # well inside execute_action
    paused = procs[first]
    stopped_at = time.time()
    paused.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(PAUSE_FOR)  # the paused holder's session expires meanwhile
    finally:
        paused.send_signal(signal.SIGCONT)
    resumed_at = time.time()
    view = await wait_final(status, task_id, within=60, stack=stack)
    logs = stack.logs()
    runner_log = (stack.tmp / "taskerman-runner.log").read_text()  # both runners log here, with pids

    assert view.state == "succeeded", logs
    assert {n: r.state for n, r in view.nodes.items()} == {"n1": "succeeded", "n2": "succeeded"}
    assert view.nodes[first].attempts == 2  # cut short once, then a run from scratch
    assert view.nodes[first].failures == 0  # a lost lease is not the action's failure
    assert view.nodes[other].attempts == 1
    assert paused.poll() is None  # the paused runner survived its lost session

    intervals = sorted((i for i in stack.intervals() if i["task_id"] == task_id), key=lambda i: i["start"])
    assert [(i["node"], i["attempt"]) for i in intervals] == [(first, 1), (first, 2), (other, 1)], intervals
    cut, rerun, after = intervals
    assert max_concurrency(intervals) <= 1, intervals
    # The paused holder did nothing after the stop: its interval ends at its last checkpoint before it.
    assert cut["end"] <= stopped_at + SLACK, (cut, stopped_at)
    assert not complete(cut, PAUSE_SLEEP)
    # Its node kept its place through the pause: the other started only after the rerun had ended.
    assert rerun["start"] >= resumed_at - SLACK, (rerun, resumed_at)
    assert after["start"] >= rerun["end"], (after, rerun)
    assert complete(rerun, PAUSE_SLEEP)
    assert complete(after, PAUSE_SLEEP)
    tokens = [i["token"] for i in intervals]
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == len(tokens), tokens
    assert view.nodes[first].token == rerun["token"]
    # LeaseLost (the session is untrusted), then a nak: released back, not failed.
    assert any(
        "released back" in line and f"node={first}" in line and "untrusted" in line
        for line in runner_log.splitlines()
    ), logs


async def test_a_holder_whose_session_went_while_it_acted_keeps_its_place_until_it_ran_again(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    """Limit 1. The acting node's runner is frozen past its session timeout while nobody waits
    (the other node's runner was killed): the node may be half-done, so when its runner wakes and
    hands the item back, it renews its down markers. Its runner is frozen again before its retry,
    and the other node, served by a new runner, does not start until the frozen node has run
    again. Fails without the markers: the other node takes the free slot at once."""
    task_id = "acted-lost"
    procs = await two_runners_one_slot(stack, js[1], task_id, 3.0, {"retry_count": 0})
    [first] = await eventually(running(status, task_id, ["n1", "n2"]), 30, "a node running", stack)
    other = "n2" if first == "n1" else "n1"
    procs[other].send_signal(signal.SIGKILL)  # its item comes back after ack_wait, to a new runner
    procs[other].wait()
    frozen = procs[first]
    frozen.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(PAUSE_FOR)  # twice the session timeout: the slot's ephemeral node is gone
        frozen.send_signal(signal.SIGCONT)

        async def handed_back() -> bool | None:
            rec = await status.get_node(task_id, first)
            return True if rec is not None and rec.state == "retrying" else None

        await eventually(handed_back, 30, f"{first} handed back", stack)
        frozen.send_signal(signal.SIGSTOP)  # down again before its retry
        stack.runner(CLUSTER, [other])
        await asyncio.sleep(PAUSE_FOR)  # the new runner is up and its item redelivered
    finally:
        frozen.send_signal(signal.SIGCONT)
    view = await wait_final(status, task_id, within=60, stack=stack)
    assert view.state == "succeeded", stack.logs()
    assert (view.nodes[first].attempts, view.nodes[first].failures) == (2, 0)
    runs = sorted((i for i in stack.intervals() if i["task_id"] == task_id), key=lambda i: i["start"])
    assert [(i["node"], i["attempt"]) for i in runs] == [(first, 1), (first, 2), (other, 1)], runs
    assert runs[2]["start"] >= runs[1]["end"]  # the node counted as acting until it ran again


async def test_a_node_handed_back_after_it_acted_runs_again_before_its_next_item(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    """One runner, one node, two tasks on it, the second queued behind the first. The runner is
    frozen past its session while the first acts, so the first is handed back; it runs again in
    place before the second (one item at a time per node: had the first gone back to JetStream, the
    second would come first, and the half-done node would act in it while its down markers, kept
    for the first, run out). Fails with a nak: the second runs between the first's two attempts."""
    stack.router({CLUSTER: ["n1"]})
    runner = stack.runner(CLUSTER, ["n1"])
    for task_id, seconds in (("handed-1", 3.0), ("handed-2", 0.5)):
        params = {"action_args": {"seconds": seconds}, "workqueue_args": {"retry_count": 0}}
        await publish_raw(
            js[1],
            task_json(action="test:sleep", cluster_name=CLUSTER, task_id=task_id, taskerman_params=params),
        )
    await eventually(running(status, "handed-1", ["n1"]), 30, "the first task running", stack)
    runner.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(PAUSE_FOR)  # twice the session timeout: the session is gone
    finally:
        runner.send_signal(signal.SIGCONT)
    views = [await wait_final(status, t, within=60, stack=stack) for t in ("handed-1", "handed-2")]
    assert [v.state for v in views] == ["succeeded", "succeeded"], stack.logs()
    assert (views[0].nodes["n1"].attempts, views[0].nodes["n1"].failures) == (2, 0)
    runs = sorted((i for i in stack.intervals() if i["node"] == "n1"), key=lambda i: i["start"])
    order = [(i["task_id"], i["attempt"]) for i in runs]
    assert order == [("handed-1", 1), ("handed-1", 2), ("handed-2", 1)], runs
    assert complete(runs[1], 3.0)


async def test_zookeeper_killed_and_restarted_mid_rollout(
    nats_fresh: NatsServer, prefix: str, tmp_path: Path, signing_keys: dict[str, Any]
) -> None:
    """A ZooKeeper of this test's own (the session one cannot be killed): kill -9 it while two nodes
    act, start it again on the same port and data 3 s later; the rollout finishes, nothing is lost.

    Steps sleep 4 s, longer than the 3 s trust window, so the steps in flight at the kill must be
    cut at a checkpoint. (With 1 s steps they legitimately finish inside the trust window, the
    session cannot have expired yet; the outage is then caught by the lease check before post_check,
    the item is released back and the node runs again: at least once, never unguarded.)

    What happens (from the logs): the kill closes every client's connection; aiozk's read loop ends
    quietly, so the session stays "connected" until a write fails (~2-3 s here) and aiozk suspends it,
    or until the trust window runs out, whichever comes first; the runner's guard or the next
    checkpoint raises LeaseLost ("session untrusted (state=suspended, 2.7s since last round trip)"), the
    witness interval ends there, the item is nak'ed and the release waits for ZooKeeper. aiozk retries
    the server after 4 s; the restarted server has restored the sessions from its log with a fresh
    timeout, so the sessions resume (no "Expiring session" in its log), the pending releases delete
    the old slots, the waiting nodes take them (new, larger czxids) and the rollout finishes."""
    nodes = [f"node-{i}" for i in range(1, 7)]
    seconds, limit, task_id = 4.0, 2, "zk-restart-1"
    with ZooKeeperServer(tmp_path / "zk") as zk:
        settings = Settings(
            **signing_keys,
            nats_url=nats_fresh.url,
            zk_hosts=zk.hosts,
            zk_chroot=f"/{prefix}",
            zk_session_timeout=4.0,
            home=tmp_path,
            ack_wait=6.0,
        )
        stack = Stack(settings, tmp_path)
        nc = await bus.connect(settings, "test")
        try:
            js = nc.jetstream()
            await bus.provision(js, settings)
            status = StatusStore(await bus.status_bucket(js))
            stack.router({CLUSTER: nodes})
            stack.runner(CLUSTER, nodes[:3])
            stack.runner(CLUSTER, nodes[3:])
            await publish_raw(
                js,
                task_json(
                    action="test:sleep",
                    cluster_name=CLUSTER,
                    limit=limit,
                    task_id=task_id,
                    taskerman_params={
                        "action_args": {"seconds": seconds},
                        "workqueue_args": {"retry_count": 3, "backoff": 0.5},
                    },
                ),
            )

            async def two_running() -> list[str] | None:
                found = await running(status, task_id, nodes)()
                return found if found and len(found) >= limit else None

            await eventually(two_running, 30, "the first nodes running", stack)
            await asyncio.sleep(0.1)  # mid-action, well before the steps could finish
            killed_at = time.time()
            zk.kill()
            await asyncio.sleep(3.0)
            zk.start()
            await asyncio.to_thread(zk.wait_ready)
            restarted_at = time.time()
            view = await wait_final(status, task_id, within=60, stack=stack)
        finally:
            stack.stop()
            await nc.close()
    logs = stack.logs()

    assert view.state == "succeeded", logs
    assert {n: r.state for n, r in view.nodes.items()} == dict.fromkeys(nodes, "succeeded")
    intervals = [i for i in stack.intervals() if i["task_id"] == task_id]
    assert max_concurrency(intervals) <= limit, intervals
    for node in nodes:  # nothing lost: each node's successful attempt is a complete interval
        [done] = [i for i in intervals if i["token"] == view.nodes[node].token and i["node"] == node]
        assert complete(done, seconds), done
    # Steps running when ZooKeeper died stopped at a checkpoint within the trust window; nobody acted
    # while it was down beyond that window.
    trusted_until = killed_at + settings.zk_session_timeout * (1 - SAFETY_MARGIN) + SLACK
    hit = [i for i in intervals if i["start"] < killed_at]
    assert len(hit) == limit, hit  # the kill did hit running steps
    for i in hit:
        assert i["end"] <= trusted_until, (i, killed_at)
        if i["start"] + seconds > trusted_until:  # it would have outlasted the window: it was cut
            assert not complete(i, seconds), i
    for i in intervals:
        acted_while_down = i["start"] < restarted_at and i["end"] > trusted_until
        assert not acted_while_down, (i, killed_at, restarted_at)
