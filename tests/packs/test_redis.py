"""The redis pack against real redis-server processes: a primary and a replica on free ports."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskcore.core.errors import ActionFailed, InvalidTask
from taskcore.packs.backups import backup_name, prune_backups
from taskcore.packs.redis_backup import RedisBackup
from taskcore.packs.redis_restart import RedisRestart
from taskerman_dev.launchers import free_ports
from tests.packs.datastores import (
    RedisServer,
    action_context,
    linked,
    names,
    require,
    run_steps,
    sha256sum_check,
    wait_for,
)


class Pair:
    def __init__(self, home: Path) -> None:
        p, r = free_ports(2)
        self.primary = RedisServer(home / "primary", p)
        self.replica = RedisServer(home / "replica", r, replica_of=p)

    def table(self, server: RedisServer, **extra: Any) -> dict[str, Any]:
        """The `[packs.redis]` table of the node that runs `server`."""
        return {"port": server.port, "start_command": server.start_command, **extra}


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    pair = Pair(tmp_path)
    try:
        pair.primary.start()
        pair.replica.start()
        wait_for("the replica links to its primary", lambda: linked(pair.primary, pair.replica))
        yield pair
    finally:
        pair.replica.stop()
        pair.primary.stop()


async def test_restarting_the_replica_keeps_its_link(pair: Pair) -> None:
    pair.primary.cli("SET", "k", "v1")
    before = pair.replica.pid()
    ctx = action_context(RedisRestart, pair.table(pair.replica), {"up_timeout": 20})

    await run_steps(RedisRestart(), ctx)  # stop by SHUTDOWN (no stop_command), then start_command

    assert pair.replica.pid() != before
    assert pair.replica.info("replication")["master_link_status"] == "up"
    assert pair.replica.cli("GET", "k") == "v1"
    pair.primary.cli("SET", "k", "v2")
    wait_for("a write reaches the restarted replica", lambda: pair.replica.cli("GET", "k") == "v2")


async def test_restarting_a_primary_with_a_healthy_replica(pair: Pair, tmp_path: Path) -> None:
    pair.primary.cli("SET", "kept", "yes")
    before = pair.primary.pid()
    stop = [require("redis-cli"), "-p", str(pair.primary.port), "SHUTDOWN"]
    ctx = action_context(RedisRestart, pair.table(pair.primary, stop_command=stop), {"up_timeout": 20})
    action = RedisRestart()

    await action.pre_check(ctx)
    assert action.replicas_before == 1
    await action.execute_action(ctx)
    await action.post_check(ctx)  # waits for the replica to be back online

    assert pair.primary.pid() != before
    assert linked(pair.primary, pair.replica)
    assert pair.primary.cli("GET", "kept") == "yes"  # saved at shutdown, loaded at start


async def test_refuses_the_only_healthy_primary(pair: Pair) -> None:
    pair.replica.stop()
    wait_for("the primary notices", lambda: "slave0" not in pair.primary.info("replication"))
    ctx = action_context(RedisRestart, pair.table(pair.primary))
    with pytest.raises(ActionFailed, match=r"only healthy primary: 0 healthy replica") as failed:
        await RedisRestart().pre_check(ctx)
    assert failed.value.step == "pre_check"
    assert pair.primary.cli("PING") == "PONG"


async def test_refuses_a_primary_short_of_its_configured_replicas(pair: Pair) -> None:
    ctx = action_context(RedisRestart, pair.table(pair.primary, min_healthy_replicas=2))
    with pytest.raises(ActionFailed, match=r"1 healthy replica\(s\) .* where 2 are needed"):
        await RedisRestart().pre_check(ctx)


async def test_refuses_a_primary_without_persistence(pair: Pair) -> None:
    pair.primary.cli("CONFIG", "SET", "save", "")
    ctx = action_context(RedisRestart, pair.table(pair.primary))
    with pytest.raises(ActionFailed, match=r"persistence off"):
        await RedisRestart().pre_check(ctx)


async def test_refuses_a_replica_cut_off_from_its_primary(pair: Pair) -> None:
    pair.primary.stop()
    wait_for("the link goes down", lambda: pair.replica.info("replication")["master_link_status"] == "down")
    ctx = action_context(RedisRestart, pair.table(pair.replica))
    with pytest.raises(ActionFailed, match=r"link to its primary .* is down: it may be the healthy copy"):
        await RedisRestart().pre_check(ctx)


async def test_post_check_fails_when_the_server_does_not_come_back(pair: Pair) -> None:
    table = pair.table(pair.replica, start_command=["true"])  # "starts" nothing
    ctx = action_context(RedisRestart, table, {"up_timeout": 1})
    action = RedisRestart()
    await action.pre_check(ctx)
    await action.execute_action(ctx)
    with pytest.raises(ActionFailed, match=r"not back within 1s: .*does not answer") as failed:
        await action.post_check(ctx)
    assert failed.value.step == "post_check"


async def test_backup_copies_a_dump_that_restores(pair: Pair, tmp_path: Path) -> None:
    for i in range(100):
        pair.primary.cli("SET", f"key:{i}", f"value {i}")
    backups = tmp_path / "backups"
    backups.mkdir()
    ctx = action_context(RedisBackup, pair.table(pair.primary, backup_dir=str(backups)), {"save_timeout": 30})
    action = RedisBackup()
    assert RedisBackup.exclusion_groups == ("backup",)

    await run_steps(action, ctx)

    assert action.backup is not None
    assert action.backup.parent == backups
    assert action.backup.name.startswith("redis-node-1-")
    assert action.backup.suffix == ".rdb"
    checksum = action.backup.with_name(action.backup.name + ".sha256")
    recorded = checksum.read_text().split()
    assert recorded == [hashlib.sha256(action.backup.read_bytes()).hexdigest(), action.backup.name]
    sha256sum_check(checksum)

    # load it into a fresh server
    fresh_home = tmp_path / "fresh"
    fresh = RedisServer(fresh_home, free_ports(1)[0])
    (fresh_home / "dump.rdb").write_bytes(action.backup.read_bytes())
    try:
        fresh.start()
        assert fresh.cli("DBSIZE") == "100"
        assert fresh.cli("GET", "key:42") == "value 42"
    finally:
        fresh.stop()

    # a copy that no longer matches its checksum fails verification
    with action.backup.open("r+b") as f:
        f.seek(20)
        f.write(b"\x00corrupt")
    with pytest.raises(ActionFailed, match=r"does not match its checksum"):
        await action.post_check(ctx)


async def test_backup_keeps_the_newest_copies(pair: Pair, tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    backups.mkdir()
    old = [backups / backup_name("redis-node-1", ".rdb", now=t) for t in (1e9, 1.1e9)]
    other = backups / backup_name("redis-node-10", ".rdb", now=1e9)  # another node's: never pruned
    for path in [*old, other]:
        path.write_bytes(b"REDIS0011")
        path.with_name(path.name + ".sha256").write_text("x\n")
    ctx = action_context(RedisBackup, pair.table(pair.primary, backup_dir=str(backups), keep=2))
    action = RedisBackup()

    await run_steps(action, ctx)

    assert action.backup is not None
    assert names(backups) == sorted(
        [p.name for p in (old[1], action.backup, other)]
        + [f"{p.name}.sha256" for p in (old[1], action.backup, other)]
    )
    assert prune_backups(backups, "redis-node-1", ".rdb", 5) == []


def test_node_config_decides_what_may_run(pair: Pair) -> None:
    with pytest.raises(InvalidTask, match=r"start_command"):
        action_context(RedisRestart, {"port": pair.primary.port})
    with pytest.raises(InvalidTask, match=r"backup_dir"):
        action_context(RedisBackup, {"port": pair.primary.port})
    with pytest.raises(InvalidTask, match=r"backup_dir"):
        action_context(RedisBackup, {"port": pair.primary.port, "backup_dir": "relative/dir"})
    with pytest.raises(InvalidTask, match=r"packs.redis"):
        action_context(RedisRestart, {"port": pair.primary.port, "start_command": "redis-server"})
    with pytest.raises(InvalidTask, match=r"unknown field"):
        action_context(RedisRestart, pair.table(pair.primary), {"command": ["rm", "-rf", "/"]})
    with pytest.raises(InvalidTask, match=r"action_args"):
        action_context(RedisRestart, pair.table(pair.primary), {"up_timeout": "soon"})
