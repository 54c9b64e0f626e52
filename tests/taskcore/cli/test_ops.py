"""Operator commands (`cluster budget`, `breaker`, `leases`, `nodes`) against a real ZooKeeper."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from taskcore.cli import main as cli
from taskcore.coord import clusters
from taskcore.coord.leases import lease_path
from taskcore.coord.runners import Registration, RunnerInfo, node_path
from taskcore.coord.semaphore import FairSemaphore
from taskcore.coord.session import ZkSession
from taskcore.core.settings import Settings
from taskcore.core.subjects import encode_token
from taskerman_dev import secrets as stack_secrets
from taskerman_dev.launchers import NatsServer, ZooKeeperServer

CLUSTER = "demo:web"
ODD = "cass geo:ü"  # any characters are valid in a cluster name


@pytest.fixture
def settings(
    nats_server: NatsServer, zk_server: ZooKeeperServer, prefix: str, signing_keys: dict[str, Any]
) -> Settings:
    return Settings(
        **signing_keys, nats_url=nats_server.url, zk_hosts=zk_server.hosts, zk_chroot=f"/{prefix}"
    )


async def run(settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Dispatch like `taskerman ARGV` does; (exit code, stdout, stderr)."""
    args = cli.build_parser().parse_args(list(argv))
    code = await args.command.exec(args, settings)
    out, err = capsys.readouterr()
    return code, out, err


async def run_json(settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, _ = await run(settings, capsys, *argv, "--json")
    assert code == 0
    return msgspec.json.decode(out)


async def test_budget_set_show_unset(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    no_budget = f"{CLUSTER}: no budget (only task limits apply)\n"
    async with ZkSession.from_settings(settings) as zk:
        for node in ("n1", "n2", "n3"):  # the cluster's runners, while the session lives
            await Registration(zk, CLUSTER, node, "1.2.3", []).register()
        assert await run(settings, capsys, "cluster", "budget", CLUSTER) == (0, no_budget, "")
        assert await run(settings, capsys, "cluster", "budget", CLUSTER, "2") == (
            0,
            f"{CLUSTER}: budget 2\n",
            "",
        )
        assert await run(settings, capsys, "cluster", "budget", CLUSTER) == (0, f"{CLUSTER}: budget 2\n", "")
        assert (await clusters.read_config(zk, CLUSTER)).budget == 2
        code, _, err = await run(settings, capsys, "cluster", "budget", CLUSTER, "3")
        assert code == 0
        assert "budget 3 is not below the 3 node(s) registered" in err
        assert await run(settings, capsys, "cluster", "budget", CLUSTER, "--unset") == (0, no_budget, "")
        assert (await clusters.read_config(zk, CLUSTER)).budget is None
    code, out, err = await run(settings, capsys, "cluster", "budget", "demo:wbe", "2")  # a typo
    assert (code, out) == (0, "demo:wbe: budget 2\n")
    assert "no runner is registered for cluster 'demo:wbe' (a typo?" in err


@pytest.mark.parametrize("argv", [["0"], ["-1"], ["3", "--unset"]])
async def test_budget_invalid_is_exit_2(
    settings: Settings, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = await run(settings, capsys, "cluster", "budget", CLUSTER, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("taskerman cluster budget: ")
    async with ZkSession.from_settings(settings) as zk:
        assert (await clusters.read_config(zk, CLUSTER)).budget is None  # nothing was written


async def test_breaker_open_status_and_reset(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    policy = clusters.breaker_policy(settings)
    async with ZkSession.from_settings(settings) as zk:
        await clusters.Breaker(zk, ODD, policy).record_failure("post_check: cluster on fire", trip=True)
        await clusters.Breaker(zk, CLUSTER, policy).record_failure("pre_check: flaky")
        await clusters.count(zk, ODD, "test:sleep", clusters.added(None, failed=True, lease_wait_s=1.5))
        await clusters.count(zk, ODD, "test:sleep", clusters.added(None, failed=False, lease_wait_s=0.5))

    code, out, _ = await run(settings, capsys, "breaker", "status")
    assert code == 0
    assert f"{ODD}: open since " in out
    assert "reason: post_check: cluster on fire" in out
    assert f"{CLUSTER}: closed" in out  # below the threshold: one failure counted, still closed
    assert "executions 2  failures 1  lease wait 2.0s" in out

    [view] = await run_json(settings, capsys, "breaker", "status", ODD)
    assert view["cluster"] == ODD
    assert view["state"] == "open"
    assert view["reason"] == "post_check: cluster on fire"
    assert view["failures_in_window"] == 1
    assert view["opened_at"] == pytest.approx(time.time(), abs=60)
    assert view["stats"] == {"test:sleep": {"executions": 2, "failures": 1, "lease_wait_s": 2.0}}

    code, out, _ = await run(settings, capsys, "breaker", "reset", ODD)
    assert (code, out) == (0, f"{ODD}: breaker reset to closed; it was open (post_check: cluster on fire)\n")
    [view] = await run_json(settings, capsys, "breaker", "status", ODD)
    assert (view["state"], view["reason"], view["failures_in_window"]) == ("closed", "", 0)


async def test_breaker_status_without_any_breaker(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_json(settings, capsys, "breaker", "status") == []
    code, out, _ = await run(settings, capsys, "breaker", "status")
    assert code == 0
    assert "no breakers" in out


async def test_leases_show_holders_and_owners(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    async with ZkSession.from_settings(settings) as zk:
        task_slot = await FairSemaphore(zk, lease_path("restart-1"), 2).acquire("node-1")
        other_slot = await FairSemaphore(zk, lease_path("elsewhere"), 1).acquire("db-7")
        budget_slot = await FairSemaphore(zk, clusters.cluster_path(CLUSTER, "budget"), 2).acquire("node-1")
        group = clusters.cluster_path(CLUSTER, "exclusion", encode_token("io"))
        member = await FairSemaphore(zk, group, 1).acquire("node-2", owner=encode_token("backup-1"))
        global_member = await FairSemaphore(zk, f"/global/{encode_token('test:backup')}", 2).acquire(
            "node-2", owner=encode_token(CLUSTER)
        )
        await clusters.set_budget(zk, CLUSTER, 2)

        view = await run_json(settings, capsys, "leases")
        tasks = {t["task_id"]: t["holders"] for t in view["tasks"]}
        assert set(tasks) == {"restart-1", "elsewhere"}
        [holder] = tasks["restart-1"]
        assert holder["node"] == "node-1"
        assert holder["holder"] == task_slot.holder
        assert holder["znode"].endswith(task_slot.holder.rsplit("#", 1)[1])
        assert holder["token"] == task_slot.token
        assert holder["since"] == pytest.approx(time.time(), abs=60)
        [cl] = view["clusters"]
        assert (cl["cluster"], cl["budget"]) == (CLUSTER, 2)
        assert [h["token"] for h in cl["budget_holders"]] == [budget_slot.token]
        [excl] = cl["exclusion"]
        assert (excl["name"], excl["owner"]) == ("io", "backup-1")
        assert [(h["node"], h["token"]) for h in excl["holders"]] == [("node-2", member.token)]
        [glob] = view["global_leases"]
        assert (glob["name"], glob["owner"]) == ("test:backup", CLUSTER)
        assert [h["token"] for h in glob["holders"]] == [global_member.token]
        assert "waiters are not shown" in view["note"]

        # One cluster: a task belongs to it through its holders' nodes (db-7 is nobody of demo:web).
        view = await run_json(settings, capsys, "leases", CLUSTER)
        assert [t["task_id"] for t in view["tasks"]] == ["restart-1"]
        assert view["tasks_filtered_by"]

        code, out, _ = await run(settings, capsys, "leases")
        assert code == 0
        assert "task restart-1: 1 slot(s) held" in out
        assert f"token {task_slot.token}" in out
        assert f"cluster {CLUSTER}: budget 1 of 2 held" in out
        assert "exclusion io: owner task backup-1" in out
        assert f"test:backup: owner cluster {CLUSTER}" in out
        assert "waiters are not shown" in out

        await FairSemaphore(zk, lease_path("restart-1"), 2).release(task_slot)
        await FairSemaphore(zk, lease_path("elsewhere"), 1).release(other_slot)
        await FairSemaphore(zk, group, 1).release(member)
        view = await run_json(settings, capsys, "leases")
        assert view["tasks"] == []
        assert view["clusters"][0]["exclusion"] == []  # released: no owner shown any more


async def test_nodes_marks_stale(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    async with ZkSession.from_settings(settings) as zk:
        await Registration(zk, CLUSTER, "node-1", "1.2.3", ["test:sleep", "demo:restart"]).register()
        old = time.time() - 3600
        dead = RunnerInfo(
            cluster=CLUSTER, node="node-2", pid=4242, version="1.0", actions=(), since=old, heartbeat=old
        )
        path = node_path(CLUSTER, "node-2")
        await zk.client.create(path, data=msgspec.json.encode(dead))
        await Registration(zk, ODD, "n1", "1.2.3", []).register()

        rows = {r["node"]: r for r in await run_json(settings, capsys, "nodes", CLUSTER)}
        assert set(rows) == {"node-1", "node-2"}
        assert rows["node-1"]["stale"] is False
        assert rows["node-1"]["version"] == "1.2.3"
        assert rows["node-1"]["actions"] == ["test:sleep", "demo:restart"]
        assert rows["node-1"]["heartbeat_age_s"] < 60
        assert rows["node-2"]["stale"] is True
        assert rows["node-2"]["pid"] == 4242
        assert rows["node-2"]["heartbeat_age_s"] == pytest.approx(3600, abs=60)

        code, out, _ = await run(settings, capsys, "nodes")
        assert code == 0  # stale runners are marked, not an error
        lines = out.splitlines()
        assert any(
            "node-1" in line and " live " in line and "test:sleep, demo:restart" in line for line in lines
        )
        assert any("node-2" in line and "STALE" in line and "pid 4242" in line for line in lines)
        assert any(ODD in line for line in lines)
        assert lines[-1].startswith("3 runner(s), 1 stale")


def test_a_reader_identity_changing_a_budget_is_told_it_takes_the_admin(settings: Settings) -> None:
    """`cluster budget` as an operator (ZooKeeper's reader identity): refused, said in one line."""
    env = stack_secrets.role_env({**os.environ, **settings.env()}, "operator")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "taskerman"), "cluster", "budget", CLUSTER, "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "ZooKeeper refused it" in done.stderr
    assert "take the admin's" in done.stderr
    assert "Traceback" not in done.stderr
