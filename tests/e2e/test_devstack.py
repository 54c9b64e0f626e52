"""`taskerman dev up|status|down` and the demo rolling restart, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskcore.launchers import free_port

BIN = Path(sys.executable).parent


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
    procs = json.loads(st.stdout)
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

    down = tm(dev_env, "dev", "down")
    assert down.returncode == 0, down.stdout + down.stderr
    for p in procs:
        if p["name"] != "demo-service":  # a service's recorded pid changed when it was restarted
            assert not Path(f"/proc/{p['pid']}").exists() or _zombie(p["pid"]), p
    assert tm(dev_env, "dev", "status").returncode == 1


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
