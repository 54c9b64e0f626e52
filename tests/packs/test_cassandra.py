"""The cassandra pack against a `nodetool` stand-in (tests/packs/fakes/nodetool): Cassandra cannot run
here, so these tests check the step sequences and the failure handling on the same commands and outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from taskcore.core.errors import ActionFailed, InvalidTask
from taskcore.packs import cassandra
from taskcore.packs.cassandra import (
    CassandraRepair,
    CassandraRestart,
    CassandraSnapshot,
    parse_status,
    ring_problem,
)
from tests.packs.datastores import FAKES, action_context, run_steps

LOCAL = "10.0.0.1"


class FakeRing:
    """The fake's state file: a ring of three nodes, all UN; and the fake, copied beside it as an
    executable (the node config names a program, as it would name /usr/bin/nodetool)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.nodetool = path.parent / "nodetool"
        shutil.copyfile(FAKES / "nodetool", self.nodetool)
        self.nodetool.chmod(0o755)
        self.write(
            local=LOCAL,
            nodes={LOCAL: "UN", "10.0.0.2": "UN", "10.0.0.3": "UN"},
            running=True,
            boot_polls=2,
            calls=[],
        )

    def read(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.path.read_text())
        return state

    def write(self, **changes: Any) -> None:
        state = self.read() if self.path.exists() else {}
        state.update(changes)
        self.path.write_text(json.dumps(state))

    def calls(self) -> list[str]:
        return [" ".join(c) for c in self.read()["calls"]]

    def table(self, **extra: Any) -> dict[str, Any]:
        """The node's `[packs.cassandra]`: the fake as nodetool, its service control as the commands."""
        service = [str(self.nodetool), "--state", str(self.path), "fake-service"]
        return {
            "address": LOCAL,
            "nodetool": str(self.nodetool),
            "nodetool_args": ["--state", str(self.path)],
            "stop_command": [*service, "stop"],
            "start_command": [*service, "start"],
            "keyspaces": ["app"],
            **extra,
        }


@pytest.fixture
def ring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeRing:
    monkeypatch.setattr(cassandra, "POLL", 0.05)
    return FakeRing(tmp_path / "ring.json")


def test_parse_status_reads_every_datacenter() -> None:
    output = """Datacenter: dc1
===============
Status=Up/Down
|/ State=Normal/Leaving/Joining/Moving
--  Address      Load        Tokens  Owns (effective)  Host ID                               Rack
UN  10.0.0.1     1.2 GiB     16      66.7%             6b1c0000-0000-4000-8000-000000000000  r1
DN  10.0.0.2     ?           16      66.7%             6b1c0000-0000-4000-8000-000000000001  r1
Datacenter: dc2
===============
--  Address      Load        Tokens  Owns (effective)  Host ID                               Rack
UJ  2001:db8::1  12 KiB      16      ?                 6b1c0000-0000-4000-8000-000000000002  r1
"""
    assert parse_status(output) == {"10.0.0.1": "UN", "10.0.0.2": "DN", "2001:db8::1": "UJ"}


def test_ring_health() -> None:
    ring = {LOCAL: "UN", "10.0.0.2": "UJ", "10.0.0.3": "UN"}
    assert ring_problem(ring, LOCAL) == "not every node is UN: 10.0.0.2 UJ"  # no restart mid-bootstrap
    assert ring_problem(ring, LOCAL, settled=False) is None  # but a joining node is not a down one
    assert ring_problem({**ring, "10.0.0.3": "DL"}, LOCAL, settled=False) == "nodes down: 10.0.0.3 DL"
    assert ring_problem({**ring, LOCAL: "UL"}, LOCAL, settled=False) == "this node (10.0.0.1) is UL"
    assert ring_problem(ring, "10.0.0.9") is not None


async def test_restart_drains_restarts_and_waits_for_un(ring: FakeRing) -> None:
    ctx = action_context(CassandraRestart, ring.table(), {"up_timeout": 10})

    await run_steps(CassandraRestart(), ctx)

    calls = ring.calls()
    assert calls[:4] == ["status", "drain", "fake-service stop", "fake-service start"]
    # booting: nodetool cannot connect twice, then the node is UN
    assert calls[4:] == ["status", "status", "status"]
    assert ring.read()["nodes"][LOCAL] == "UN"


async def test_post_check_fails_when_the_node_never_comes_back_un(ring: FakeRing) -> None:
    ring.write(after_start="DN", boot_polls=1)
    ctx = action_context(CassandraRestart, ring.table(), {"up_timeout": 3})
    action = CassandraRestart()
    await action.pre_check(ctx)
    await action.execute_action(ctx)
    with pytest.raises(ActionFailed, match=r"not back within 3s: this node \(10.0.0.1\) is DN") as e:
        await action.post_check(ctx)
    assert e.value.step == "post_check"


async def test_post_check_fails_while_another_node_is_down(ring: FakeRing) -> None:
    ctx = action_context(CassandraRestart, ring.table(), {"up_timeout": 0.5})
    action = CassandraRestart()
    await action.pre_check(ctx)
    await action.execute_action(ctx)
    # the node is back but a peer went down meanwhile
    ring.write(nodes={LOCAL: "UN", "10.0.0.2": "UN", "10.0.0.3": "DN"}, booting=0)
    with pytest.raises(ActionFailed, match=r"10.0.0.3 DN"):
        await action.post_check(ctx)


async def test_restart_refuses_when_a_node_is_down(ring: FakeRing) -> None:
    ring.write(nodes={LOCAL: "UN", "10.0.0.2": "DN", "10.0.0.3": "UL"})
    ctx = action_context(CassandraRestart, ring.table())
    with pytest.raises(
        ActionFailed, match=r"refusing to restart 'node-1': not every node is UN: 10.0.0.2 DN, "
    ):
        await CassandraRestart().pre_check(ctx)
    assert ring.calls() == ["status"]


async def test_restart_refuses_a_node_missing_from_the_ring(ring: FakeRing) -> None:
    ctx = action_context(CassandraRestart, ring.table(address="10.9.9.9"))
    with pytest.raises(ActionFailed, match=r"10.9.9.9 is not in nodetool status"):
        await CassandraRestart().pre_check(ctx)


async def test_a_failing_drain_stops_before_the_restart(ring: FakeRing) -> None:
    ring.write(fail={"drain": "Drain is already in progress"})
    ctx = action_context(CassandraRestart, ring.table())
    action = CassandraRestart()
    await action.pre_check(ctx)
    with pytest.raises(ActionFailed, match=r"nodetool drain: exited with status 2: .*already in progress"):
        await action.execute_action(ctx)
    assert "fake-service stop" not in ring.calls()


async def test_repair_is_primary_range(ring: FakeRing) -> None:
    assert CassandraRepair.exclusion_groups == ("repair",)
    await run_steps(CassandraRepair(), action_context(CassandraRepair, ring.table(), {"keyspace": "app"}))
    assert ring.calls() == ["status", "repair -pr app", "status"]
    await run_steps(CassandraRepair(), action_context(CassandraRepair, ring.table()))
    assert ring.calls()[-2] == "repair -pr"


async def test_repair_failures(ring: FakeRing) -> None:
    ring.write(nodes={LOCAL: "UN", "10.0.0.2": "DN", "10.0.0.3": "UN"})
    with pytest.raises(ActionFailed, match=r"refusing to repair"):
        await CassandraRepair().pre_check(action_context(CassandraRepair, ring.table()))
    ring.write(nodes={LOCAL: "UN", "10.0.0.2": "UN", "10.0.0.3": "UN"}, fail={"repair": "Repair job failed"})
    with pytest.raises(ActionFailed, match=r"Repair job failed") as e:
        await run_steps(CassandraRepair(), action_context(CassandraRepair, ring.table()))
    assert e.value.step == "execute_action"


async def test_snapshot_is_tagged_by_task_and_survives_a_retry(ring: FakeRing) -> None:
    assert CassandraSnapshot.exclusion_groups == ("backup",)
    ctx = action_context(CassandraSnapshot, ring.table(), {"keyspace": "app"}, task_id="nightly/2024.01.01")
    await run_steps(CassandraSnapshot(), ctx)
    await run_steps(CassandraSnapshot(), ctx)  # a retry: the snapshot exists already, which is fine
    assert ring.read()["snapshots"] == [["taskerman-nightly_2024_01_01", "app"]]
    assert ring.calls()[:4] == [
        "status",
        "snapshot -t taskerman-nightly_2024_01_01 app",
        "listsnapshots",
        "status",
    ]


async def test_snapshot_post_check_needs_the_tag_listed(ring: FakeRing) -> None:
    ctx = action_context(CassandraSnapshot, ring.table(), task_id="never-taken")
    with pytest.raises(ActionFailed, match=r"does not list taskerman-never-taken"):
        await CassandraSnapshot().post_check(ctx)
    ring.write(fail={"snapshot": "No space left on device"})
    with pytest.raises(ActionFailed, match=r"No space left"):
        await CassandraSnapshot().execute_action(ctx)


async def test_snapshot_refuses_a_node_that_is_not_un(ring: FakeRing) -> None:
    ring.write(nodes={LOCAL: "UJ", "10.0.0.2": "UN"})
    with pytest.raises(ActionFailed, match=r"\(10.0.0.1\) is UJ, not UN"):
        await CassandraSnapshot().pre_check(action_context(CassandraSnapshot, ring.table()))


def test_node_config_decides_what_may_run(ring: FakeRing) -> None:
    with pytest.raises(
        InvalidTask, match=r"keyspace 'system_auth' is not in this node's \[packs.cassandra\]"
    ):
        action_context(CassandraRepair, ring.table(), {"keyspace": "system_auth"})
    with pytest.raises(InvalidTask, match=r"keyspace"):
        action_context(CassandraSnapshot, ring.table(keyspaces=[]), {"keyspace": "app"})
    with pytest.raises(InvalidTask, match=r"stop_command and start_command"):
        action_context(CassandraRestart, {"address": LOCAL})
    with pytest.raises(InvalidTask, match=r"packs.cassandra"):
        action_context(CassandraRepair, {"nodetool": str(ring.nodetool)})  # no address
