"""End-to-end fixtures: a fresh nats-server per test, the session's ZooKeeper under a per-test
chroot, and real router and runner processes spawned from the installed console scripts."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus import jetstream as bus
from taskcore.bus.tracking import StatusStore, TaskView
from taskcore.coord.runners import Registration
from taskcore.coord.session import ZkSession
from taskcore.core import subjects
from taskcore.core.model import TASK_FINISHED, Task
from taskcore.core.settings import Settings
from taskcore.runtime import procs
from taskerman_dev import secrets as stack_secrets
from taskerman_dev.launchers import NatsServer, ZooKeeperServer

BIN = Path(sys.executable).parent
# for a runner whose action outlives its test: at teardown it hands the item back after 1 s
# instead of letting the action finish (the default grace) and being killed 10 s later
QUICK_EXIT = {"TASKERMAN_SHUTDOWN_GRACE": "1"}


@pytest.fixture
def nats_fresh(tmp_path: Path, nats_users: dict[str, str]) -> Iterator[NatsServer]:
    """A nats-server of this test's own: stream names are fixed by the design, so tests do not
    share one. Secured as the session's is."""
    with NatsServer(tmp_path / "nats", users=nats_users) as server:
        yield server


@pytest.fixture
def settings(
    nats_fresh: NatsServer,
    zk_server: ZooKeeperServer,
    prefix: str,
    tmp_path: Path,
    signing_keys: dict[str, Any],
) -> Settings:
    return Settings(
        **signing_keys,
        nats_url=nats_fresh.url,
        zk_hosts=zk_server.hosts,
        zk_chroot=f"/{prefix}",
        zk_session_timeout=4.0,
        home=tmp_path,
        ack_wait=6.0,
    )


def toml_value(v: Any) -> str:
    """A TOML value: JSON strings, numbers, booleans and arrays are TOML too; tables become inline."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


class Stack:
    """Spawns and tears down real service processes for one test."""

    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.settings = settings
        self.tmp = tmp
        self.witness = tmp / "witness.jsonl"
        self.procs: list[subprocess.Popen[bytes]] = []

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.settings.env())
        env["TASKERMAN_WITNESS_FILE"] = str(self.witness)
        env["TASKERMAN_LOG_FORMAT"] = "text"  # the tests read the logs as text
        return env

    def spawn(
        self, name: str, *args: str, extra_env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a console script with the stack's environment (plus `extra_env`), its output in
        `<name>.log`; a service connects to NATS as its role."""
        log = (self.tmp / f"{name}.log").open("ab")
        env = {**stack_secrets.command_env(self.env(), [name]), **(extra_env or {})}
        proc = subprocess.Popen([str(BIN / name), *args], env=env, stdout=log, stderr=log)
        self.procs.append(proc)
        return proc

    def inventory(self, clusters: dict[str, list[str]]) -> Path:
        path = self.tmp / "inventory.toml"
        lines = []
        for cluster, nodes in clusters.items():
            lines.append(f"[clusters.{json.dumps(cluster)}]")
            lines.append(f"nodes = {json.dumps(nodes)}")
        path.write_text("\n".join(lines) + "\n")
        return path

    def router(
        self, clusters: dict[str, list[str]] | None = None, extra_env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        args = ["--inventory", str(self.inventory(clusters))] if clusters else []
        return self.spawn("taskerman-router", *args, extra_env=extra_env)

    def runner(
        self,
        cluster: str,
        nodes: list[str],
        *,
        actions: dict[str, dict[str, Any]] | None = None,
        packs: dict[str, dict[str, Any]] | None = None,
        extra_env: dict[str, str] | None = None,
        away_grace: float = 0.0,
    ) -> subprocess.Popen[bytes]:
        """A runner process serving `nodes`; `actions` are per-action overrides for its config file
        (e.g. {"test:sleep": {"exclusion_groups": ["backup"]}}); with `away_grace`, the router
        still queues items for its nodes that long after it stops."""
        args = ["--cluster", cluster]
        for n in nodes:
            args += ["--node", n]
        if actions or packs or away_grace:
            path = self.tmp / f"runner-{len(self.procs)}.toml"
            lines = [f"cluster = {json.dumps(cluster)}", f"away_grace = {away_grace}"]
            for table, entries in (("actions", actions or {}), ("packs", packs or {})):
                for name, fields in entries.items():
                    lines.append(f"[{table}.{json.dumps(name)}]")
                    lines += [f"{k} = {toml_value(v)}" for k, v in fields.items()]
            path.write_text("\n".join(lines) + "\n")
            args += ["--config", str(path)]
        return self.spawn("taskerman-runner", *args, extra_env=extra_env)

    def cli(self, *args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "taskerman"), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def intervals(self) -> list[dict[str, Any]]:
        if not self.witness.exists():
            return []
        return [json.loads(line) for line in self.witness.read_text().splitlines() if line.strip()]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log")))

    def stop(self) -> None:
        procs.terminate(self.procs, timeout=10)


@pytest.fixture
def stack(settings: Settings, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(settings, tmp_path)
    yield s
    s.stop()


@pytest.fixture
async def js(settings: Settings) -> AsyncIterator[tuple[NATS, JetStreamContext]]:
    nc = await bus.connect(settings, "test")
    js = nc.jetstream()
    await bus.provision(js, settings)
    yield nc, js
    await nc.close()


@pytest.fixture
async def status(js: tuple[NATS, JetStreamContext]) -> StatusStore:
    return StatusStore(await bus.status_bucket(js[1]))


async def publish_raw(js: JetStreamContext, data: bytes | str, msg_id: str | None = None) -> None:
    """What `nats pub tasks.global '<json>'` does (plus a message id when given)."""
    payload = data.encode() if isinstance(data, str) else data
    await js.publish(subjects.GLOBAL, payload, headers={"Nats-Msg-Id": msg_id} if msg_id else None)


async def away(settings: Settings, cluster: str, nodes: list[str], grace: float = 600.0) -> None:
    """Away notes for `nodes`, as runners that exited cleanly with an `away_grace` leave them: the
    router then queues their items instead of recording them unserved (for a test that reads the
    items, or starts their runners later)."""
    async with ZkSession.from_settings(settings) as zk:
        for i in range(0, len(nodes), 500):  # aiozk pipelines the requests of one batch
            batch = [Registration(zk, cluster, n, "test", [], away_grace=grace) for n in nodes[i : i + 500]]
            await asyncio.gather(*(r.leave() for r in batch))


def task_json(**fields: Any) -> bytes:
    return msgspec.json.encode(fields)


async def wait_final(
    status: StatusStore, task_id: str, within: float = 60, stack: Stack | None = None
) -> TaskView:
    """Wait until the task reaches a final state."""
    deadline = time.monotonic() + within
    view = None
    while time.monotonic() < deadline:
        view = await status.view(task_id)
        if view is not None and view.state in TASK_FINISHED:
            return view
        await asyncio.sleep(0.2)
    detail = stack.logs() if stack else ""
    raise AssertionError(f"task {task_id} did not finish in {within}s: {view}\n{detail}")


def max_concurrency(intervals: list[dict[str, Any]]) -> int:
    """Most intervals open at one instant (an end at t closes before a start at t opens)."""
    events = sorted([(i["start"], 1) for i in intervals] + [(i["end"], -1) for i in intervals])
    peak = cur = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return peak


__all__ = ["Stack", "Task", "max_concurrency", "publish_raw", "task_json", "wait_final"]
