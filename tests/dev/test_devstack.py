"""`taskerman dev up|status|down` and the demo rolling restart, as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import nats
import pytest
from aiozk import ZKClient
from aiozk import exc as zk_exc

from taskcore.bus import permissions
from taskcore.core import signing, subjects
from taskcore.core.settings import Settings
from taskcore.runtime.procs import alive
from taskerman_dev import secrets as stack_secrets
from taskerman_dev.launchers import free_port, free_ports

_T = TypeVar("_T")
BIN = Path(sys.executable).parent
SERVER_VARS = ("TASKERMAN_NATS_URL", "TASKERMAN_ZK_HOSTS")
STREAMS = (
    subjects.TASKS_STREAM,
    subjects.WORK_STREAM,
    subjects.DEAD_STREAM,
    subjects.EVENTS_STREAM,
    f"KV_{subjects.STATUS_BUCKET}",
)


@pytest.fixture
def dev_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = dict(os.environ)
    env.update(
        TASKERMAN_HOME=str(tmp_path / "home"),
        TASKERMAN_NATS_URL=f"nats://127.0.0.1:{free_port()}",
        TASKERMAN_ZK_HOSTS=f"127.0.0.1:{free_port()}",
    )
    yield env
    subprocess.run(
        [str(BIN / "taskerman"), "dev", "down"], env=env, capture_output=True, timeout=120, check=False
    )


def tm(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "taskerman"), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_dev_stack_rolling_restart(dev_env: dict[str, str]) -> None:
    up = tm(dev_env, "dev", "up", "--runners", "3")
    assert up.returncode == 0, up.stdout + up.stderr
    st = tm(dev_env, "dev", "status", "--json")
    assert st.returncode == 0, st.stdout + st.stderr
    report = json.loads(st.stdout)
    assert report["nats_url"] == dev_env["TASKERMAN_NATS_URL"]
    assert set(report["credentials"]) == set(permissions.ROLES)  # a seed per role, to connect as one
    procs = report["processes"]
    names = sorted(p["name"] for p in procs)
    assert names.count("runner") == 3
    for needed in ("nats-server", "zookeeper", "router", "scheduler"):
        assert needed in names
    runners = sorted(p["node"] for p in procs if p["name"] == "runner")
    assert runners == ["node-1", "node-2", "node-3"]
    assert all(p["cluster"] == "demo:web" for p in procs if p["name"] == "runner")
    assert all(p["alive"] and p["pid"] > 0 for p in procs)

    sub = tm(dev_env, "submit", "demo:restart", "--cluster", "demo:web", "--limit", "2", "--wait")
    assert sub.returncode == 0, sub.stdout + sub.stderr
    task_id = sub.stdout.splitlines()[0].strip()
    assert "3/3 nodes succeeded" in sub.stdout
    status = json.loads(tm(dev_env, "status", task_id, "--json").stdout)
    assert status["state"] == "succeeded"
    assert sorted(status["nodes"]) == ["node-1", "node-2", "node-3"]
    for node in status["nodes"].values():
        assert node["started_at"] <= node["finished_at"]
    _secure_by_default(dev_env)

    down = tm(dev_env, "dev", "down")
    assert down.returncode == 0, down.stdout + down.stderr
    for p in procs:
        if p["name"] != "demo-service":  # a service's recorded pid changed when it was restarted
            assert not alive(p["pid"], reap=False), p
    assert tm(dev_env, "dev", "status").returncode == 1


async def _attack(url: str, secrets_dir: Path) -> None:
    """What an anonymous client tried, refused at the door; then with a runner's credentials (a
    runner's machine taken over): a hand-made work item on a node's subject and purging the audit
    trail, both refused by the server; then as admin, who may publish work items (`dlq replay`),
    an unsigned one: the runner dead-letters it (checked by the caller)."""
    with pytest.raises(nats.errors.Error):
        await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    item = {"task": {"action": "demo:restart", "cluster_name": "demo:web", "task_id": "forged"}}
    item.update(node="node-1", routed_at=0.0)
    subject = subjects.node_subject("demo:web", "node-1")
    seed = signing.read_seed(secrets_dir / stack_secrets.nats_seed_name("operator")).decode()
    nc = await nats.connect(url, nkeys_seed_str=seed)  # what `nats pub --creds …` does
    try:
        task = {"action": "demo:restart", "cluster_name": "demo:web", "task_id": "by-operator", "limit": 1}
        ack = await nc.jetstream(timeout=5).publish(subjects.GLOBAL, json.dumps(task).encode())
        assert ack.stream == subjects.TASKS_STREAM  # the original interface, with an operator's key
    finally:
        await nc.close()
    for role in ("runner", "admin"):
        seed = signing.read_seed(secrets_dir / stack_secrets.nats_seed_name(role)).decode()
        nc = await nats.connect(url, nkeys_seed_str=seed)
        try:
            js = nc.jetstream(timeout=2)
            publish = js.publish(
                subject, json.dumps(item).encode(), headers={"Nats-Msg-Id": f"forged:{role}"}
            )
            if role == "runner":
                with pytest.raises(nats.errors.TimeoutError):  # not permitted: no ack, nothing stored
                    await publish
            else:
                await publish
            with pytest.raises((nats.errors.TimeoutError, nats.js.errors.APIError)):
                await js.purge_stream(subjects.EVENTS_STREAM)
        finally:
            await nc.close()


def _secure_by_default(env: dict[str, str]) -> None:
    """`dev up` made the stack's keys under its home: its NATS server admits only its roles' users,
    each with its permissions; its runners refuse an item the router did not sign, and nobody can
    purge the audit trail."""
    folder = Path(env["TASKERMAN_HOME"]) / "secrets"
    roles = sorted(stack_secrets.nats_seed_name(r) for r in permissions.ROLES)
    zk = ["zk-reader.pw", "zk-service.pw"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["admin.nk", "router.nk", *roles, *zk])
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in folder.iterdir())
    asyncio.run(_attack(env["TASKERMAN_NATS_URL"], folder))
    asyncio.run(_anonymous_zookeeper(Settings.from_env(env)))
    deadline = time.monotonic() + 30
    letters: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not letters:
        listed = tm(env, "dlq", "list", "--json")
        letters = [d for d in json.loads(listed.stdout) if d["task_id"] == "forged"]
        time.sleep(0.2)
    assert len(letters) == 1
    assert letters[0]["reason"].startswith("signature: the work item is not signed")


async def _anonymous_zookeeper(settings: Settings) -> None:
    """What the stack made in ZooKeeper is closed to a client without its identity."""
    client = ZKClient(settings.zk_hosts, chroot=settings.zk_chroot, session_timeout=6.0)
    await client.session.start()
    try:
        with pytest.raises(zk_exc.NoAuth):
            await client.get_children("/")
        with pytest.raises(zk_exc.NoAuth):
            await client.create("/planted", data=b"x")
    finally:
        await client.close()


@pytest.fixture
def cluster_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Three free client ports for the nats-servers and three for the ZooKeeper servers, given to
    `dev up --cluster-mode` as the lists it prints for export."""
    ports = free_ports(6)
    env = dict(os.environ)
    env.update(
        TASKERMAN_HOME=str(tmp_path / "home"),
        TASKERMAN_NATS_URL=",".join(f"nats://127.0.0.1:{p}" for p in ports[:3]),
        TASKERMAN_ZK_HOSTS=",".join(f"127.0.0.1:{p}" for p in ports[3:]),
    )
    yield env
    subprocess.run(
        [str(BIN / "taskerman"), "dev", "down"], env=env, capture_output=True, timeout=120, check=False
    )


def test_dev_stack_cluster_mode_survives_losing_a_server_of_each(cluster_env: dict[str, str]) -> None:
    up = tm(cluster_env, "dev", "up", "--cluster-mode", "--runners", "2")
    assert up.returncode == 0, up.stdout + up.stderr
    nats_urls = cluster_env["TASKERMAN_NATS_URL"].split(",")
    zk_ports = [int(h.rpartition(":")[2]) for h in cluster_env["TASKERMAN_ZK_HOSTS"].split(",")]
    assert f"export TASKERMAN_NATS_URL={cluster_env['TASKERMAN_NATS_URL']}" in up.stdout
    # From here on the CLI runs as a user's shell would, without the server variables: it finds the
    # running stack's servers in $TASKERMAN_HOME/stack.json.
    user_env = {k: v for k, v in cluster_env.items() if k not in SERVER_VARS}
    procs = _dev_status(user_env)
    for name in ("nats-server", "zookeeper"):
        assert sorted(p["member"] for p in procs if p["name"] == name) == [1, 2, 3]
    assert sorted(p["node"] for p in procs if p["name"] == "runner") == ["node-1", "node-2"]
    assert all(p["alive"] and p["pid"] > 0 for p in procs), procs
    streams = _eventually(
        lambda: _streams(nats_urls, Path(cluster_env["TASKERMAN_HOME"])), 20, "every stream with a leader"
    )
    assert {name: replicas for name, (replicas, _) in streams.items()} == dict.fromkeys(STREAMS, 3)

    first = tm(user_env, "submit", "demo:restart", "--cluster", "demo:web", "--limit", "1", "--wait")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2/2 nodes succeeded" in first.stdout

    # kill -9 the nats-server leading the WORK stream (member i serves the i-th URL, server name
    # taskerman-i) and the ZooKeeper leader, as crashes would
    nats_victim = int(streams[subjects.WORK_STREAM][1].rpartition("-")[2])
    zk_victim = next(i for i, port in enumerate(zk_ports, start=1) if _zk_mode(port) == "leader")
    victims = {("nats-server", nats_victim), ("zookeeper", zk_victim)}
    for p in procs:
        if (p["name"], p["member"]) in victims:
            os.kill(p["pid"], signal.SIGKILL)
    # The CLI asks JetStream about its streams on connecting, which times out while a stream the dead
    # server led elects a new leader among the survivors: submit once they have.
    survivors = [u for i, u in enumerate(nats_urls, start=1) if i != nats_victim]
    _eventually(
        lambda: _streams(survivors, Path(cluster_env["TASKERMAN_HOME"])), 30, "a new leader for every stream"
    )
    _eventually(
        lambda: any(_zk_mode(port) == "leader" for i, port in enumerate(zk_ports, start=1) if i != zk_victim),
        30,
        "a new ZooKeeper leader",
    )

    second = tm(user_env, "submit", "demo:restart", "--cluster", "demo:web", "--limit", "1", "--wait")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "2/2 nodes succeeded" in second.stdout
    after = _dev_status(user_env, expect=1)  # not all alive: exit 1
    dead = {(p["name"], p["member"]) for p in after if not p["alive"]}
    assert dead == victims, after

    down = tm(user_env, "dev", "down")
    assert down.returncode == 0, down.stdout + down.stderr
    for p in after:
        assert not alive(p["pid"], reap=False), p
    assert tm(user_env, "dev", "status").returncode == 1


def _dev_status(env: dict[str, str], expect: int = 0) -> list[dict[str, Any]]:
    st = tm(env, "dev", "status", "--json")
    assert st.returncode == expect, st.stdout + st.stderr
    rows: list[dict[str, Any]] = json.loads(st.stdout)["processes"]
    return rows


def _streams(urls: list[str], home: Path) -> dict[str, tuple[int, str]] | None:
    """Each stream's replica count and leader, or None while one has no leader (asked as the
    stack's admin)."""
    seed = signing.read_seed(home / "secrets" / stack_secrets.nats_seed_name("admin")).decode()
    admin_auth = {"nkeys_seed_str": seed}

    async def ask() -> dict[str, tuple[int, str]] | None:
        nc = await nats.connect(
            urls, connect_timeout=2, max_reconnect_attempts=1, allow_reconnect=False, **admin_auth
        )
        try:
            js = nc.jetstream(timeout=2)
            found = {}
            for name in STREAMS:
                info = await js.stream_info(name)
                if info.cluster is None or not info.cluster.leader:
                    return None
                found[name] = (info.config.num_replicas, info.cluster.leader)
            return found
        finally:
            await nc.close()

    return asyncio.run(ask())


def _zk_mode(port: int) -> str | None:
    """A ZooKeeper server's `Mode:` (leader, follower), or None while it does not serve."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"srvr")
            reply = b"".join(iter(lambda: sock.recv(4096), b""))
    except OSError:
        return None
    modes = [
        line.partition(":")[2].strip() for line in reply.decode().splitlines() if line.startswith("Mode:")
    ]
    return modes[0] if modes else None


def _eventually(probe: Callable[[], _T | None], within: float, what: str) -> _T:
    """Poll until `probe` returns something truthy; a NATS or socket error is a miss."""
    deadline = time.monotonic() + within
    last: object = None
    while time.monotonic() < deadline:
        try:
            if result := probe():
                return result
            last = result
        except (OSError, TimeoutError, nats.errors.Error) as e:
            last = e
        time.sleep(0.5)
    pytest.fail(f"no {what} within {within}s (last: {last!r})")
