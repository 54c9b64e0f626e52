"""Signed work items on real servers and real router and runner processes: an item the router did
not sign (unsigned, or signed by a key nobody trusts), one altered after signing and one replayed to
another node's subject are each dead-lettered with a `signature:` reason and never run (the witness
file stays empty), and the runner then runs a valid task. Two trusted keys: items signed by either
run (rotation). Without keys a router or runner refuses to start, unless TASKERMAN_INSECURE=1."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus import deadletter
from taskcore.bus import jetstream as bus
from taskcore.bus.tracking import StatusStore
from taskcore.coord import clusters
from taskcore.coord.clusters import Breaker
from taskcore.coord.session import ZkSession
from taskcore.core import signing, subjects
from taskcore.core.model import DeadLetter, Task, TaskermanParams, WorkItem
from taskcore.core.settings import Settings
from taskcore.core.signing import Signer

from .conftest import BIN, Stack, publish_raw, wait_final
from .node_runners import task, wait_for

Js = tuple[NATS, JetStreamContext]


def _item(task_id: str, node: str, **args: object) -> bytes:
    """A work item of test:sleep for `node`; were it run, its post_check would trip c1's breaker."""
    params = TaskermanParams(action_args={"seconds": 0.1, "post_check_fail_nodes": [node], **args})
    spec = Task(action="test:sleep", cluster_name="c1", task_id=task_id, taskerman_params=params)
    return msgspec.json.encode(WorkItem(task=spec, node=node, routed_at=time.time()))


async def _letters(js: JetStreamContext, count: int) -> list[DeadLetter]:
    letters: list[DeadLetter] = []

    async def enough() -> bool:
        nonlocal letters
        letters = [d for _, d in await deadletter.entries(js)]
        return len(letters) >= count

    await wait_for(enough)
    return letters


async def _runner_ready(js: JetStreamContext, *nodes: str) -> None:
    """Until the runner has created the consumers of `nodes`."""

    async def ready() -> bool:
        names = {c.name for c in await js.consumers_info(subjects.WORK_STREAM)}
        return all(subjects.runner_durable("c1", n) in names for n in nodes)

    await wait_for(ready)


async def test_items_the_router_did_not_sign_are_dead_lettered_and_never_run(
    stack: Stack, settings: Settings, js: Js, status: StatusStore, signer: Signer
) -> None:
    router, runner = stack.router(), stack.runner("c1", ["n1", "n2"])
    await _runner_ready(js[1], "n1", "n2")
    n1, n2 = subjects.node_subject("c1", "n1"), subjects.node_subject("c1", "n2")
    # 1. a client that is not the router publishes an unsigned item
    await bus.publish(js[1], n1, _item("forged-unsigned", "n1"), msg_id="forged-unsigned:n1")
    # 2. … or one signed with a key of its own, which no runner trusts
    stranger = Signer(signing.new_seed())
    await bus.publish_work(js[1], stranger, n1, _item("forged-key", "n1"), "forged-key:n1")
    # 3. an item the router signed, altered afterwards (its arguments), headers kept
    payload = _item("altered", "n1")
    headers = signer.sign(n1, "altered:n1", payload)
    await bus.publish(js[1], n1, _item("altered", "n1", seconds=0.2), msg_id="altered:n1", headers=headers)
    # 4. an item the router signed for n1, replayed to n2's subject
    payload = _item("replayed", "n1")
    headers = signer.sign(n1, "replayed:n1", payload)
    await bus.publish(js[1], n2, payload, msg_id="replayed:n1", headers=headers)

    letters = {d.task_id: d for d in await _letters(js[1], 4)}
    assert set(letters) == {"forged-unsigned", "forged-key", "altered", "replayed"}, stack.logs()
    for letter in letters.values():
        assert letter.reason.startswith("signature: "), letter.reason
        assert "it was not run" in letter.reason
        assert letter.deliveries == 1
    assert "not signed" in letters["forged-unsigned"].reason
    assert f"signed by key '{stranger.key}', which this runner does not trust" in letters["forged-key"].reason
    assert "altered after signing" in letters["altered"].reason
    assert letters["replayed"].node == "n2"
    assert letters["replayed"].source_subject == n2
    assert stack.intervals() == []  # nothing acted
    for task_id in letters:  # and nothing a forger claimed was recorded for its task
        assert await status.get_node(task_id, "n1") is None
        assert await status.get_node(task_id, "n2") is None
    async with ZkSession.from_settings(settings) as zk:
        breaker = Breaker(zk, "c1", clusters.breaker_policy(settings))
        assert await breaker.state() == "closed"  # no forged post_check tripped it

    # the runner keeps going: a valid task, through the router, runs
    await publish_raw(js[1], task("valid", "test:sleep", ["n1", "n2"], limit=2, args={"seconds": 0.1}))
    view = await wait_final(status, "valid", stack=stack)
    assert view.state == "succeeded", view
    assert {i["task_id"] for i in stack.intervals()} == {"valid"}
    assert router.poll() is None
    assert runner.poll() is None

    # an operator does not re-sign a refused item by accident
    [seq] = [s for s, d in await deadletter.entries(js[1]) if d.task_id == "forged-key"]
    out = stack.cli("dlq", "replay", str(seq))
    assert out.returncode == 1
    assert f"dead letter {seq} is a work item refused for its signature" in out.stderr
    assert "--force" in out.stderr
    assert await deadletter.get(js[1], seq) is not None  # left in place


async def test_rotation_items_signed_by_either_trusted_key_run(
    stack: Stack, js: Js, status: StatusStore, tmp_path: Path
) -> None:
    old = stack.settings.router_seed_file
    assert old is not None
    new = tmp_path / "router-new.nk"
    new_key = signing.write_seed(new)
    trusted = ",".join((*stack.settings.trusted_router_keys, new_key))
    stack.runner("c1", ["n1"], extra_env={signing.TRUSTED_ENV: trusted})  # trusts the old and the new key
    first = stack.router()  # signs with the old key
    await publish_raw(js[1], task("rot-old", "test:sleep", ["n1"], args={"seconds": 0.05}))
    assert (await wait_final(status, "rot-old", stack=stack)).state == "succeeded"
    first.terminate()
    first.wait(timeout=30)
    stack.router(extra_env={signing.SEED_ENV: str(new)})  # the router's key rotated
    await publish_raw(js[1], task("rot-new", "test:sleep", ["n1"], args={"seconds": 0.05}))
    assert (await wait_final(status, "rot-new", stack=stack)).state == "succeeded"
    assert {i["task_id"] for i in stack.intervals()} == {"rot-old", "rot-new"}
    assert f"signing work items with key {new_key}" in (stack.tmp / "taskerman-router.log").read_text()


def _run(stack: Stack, name: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / name), *args],
        env={**stack.env(), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_without_keys_router_and_runner_refuse_to_start(stack: Stack) -> None:
    no_seed = _run(stack, "taskerman-router", env={signing.SEED_ENV: ""})
    assert no_seed.returncode == 2
    assert "no signing key: set TASKERMAN_ROUTER_SEED_FILE" in no_seed.stderr
    assert "TASKERMAN_INSECURE=1" in no_seed.stderr
    no_keys = _run(
        stack, "taskerman-runner", "--cluster", "c1", "--node", "n1", env={signing.TRUSTED_ENV: ""}
    )
    assert no_keys.returncode == 2
    assert "no trusted keys: set TASKERMAN_TRUSTED_ROUTER_KEYS" in no_keys.stderr
    bad_key = _run(
        stack, "taskerman-runner", "--cluster", "c1", "--node", "n1", env={signing.TRUSTED_ENV: "UXYZ"}
    )
    assert bad_key.returncode == 2
    assert "'UXYZ' is not a public nkey" in bad_key.stderr
    missing = _run(stack, "taskerman-router", env={signing.SEED_ENV: str(stack.tmp / "nowhere.nk")})
    assert missing.returncode == 2
    assert "cannot read the seed file" in missing.stderr


async def test_insecure_mode_is_explicit_and_warns(stack: Stack, js: Js, status: StatusStore) -> None:
    insecure = {signing.SEED_ENV: "", signing.TRUSTED_ENV: "", signing.INSECURE_ENV: "1"}
    stack.router(extra_env=insecure)
    stack.runner("c1", ["n1"], extra_env=insecure)
    await publish_raw(js[1], task("unsigned", "test:sleep", ["n1"], args={"seconds": 0.05}))
    assert (await wait_final(status, "unsigned", stack=stack)).state == "succeeded"
    logs = "".join(p.read_text() for p in stack.tmp.glob("taskerman-*.log"))
    assert "INSECURE: TASKERMAN_INSECURE=1 and no TASKERMAN_ROUTER_SEED_FILE" in logs
    assert "INSECURE: TASKERMAN_INSECURE=1 and no TASKERMAN_TRUSTED_ROUTER_KEYS" in logs
