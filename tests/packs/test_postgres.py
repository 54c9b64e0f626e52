"""The postgres pack against a real PostgreSQL server (initdb + pg_ctl in a temporary directory)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskcore.core.errors import ActionFailed, InvalidTask
from taskcore.packs.backups import sha256_file, write_checksum
from taskcore.packs.postgres import PostgresBackup
from taskerman_dev.launchers import free_port
from tests.packs.datastores import PostgresServer, action_context, names, run_steps, sha256sum_check

ROWS = 500


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    """One server for the module, with a database `app` holding a table of ROWS rows."""
    server = PostgresServer(free_port())
    try:
        server.initdb()
        server.start()
        server.psql("postgres", "CREATE DATABASE app")
        server.psql("postgres", "CREATE DATABASE other")
        server.psql(
            "app",
            "CREATE TABLE orders (id int PRIMARY KEY, item text);"
            f"INSERT INTO orders SELECT i, 'item ' || i FROM generate_series(1, {ROWS}) i",
        )
        yield server
    finally:
        server.stop()
        server.cleanup()


def table(server: PostgresServer, backups: Path, **extra: Any) -> dict[str, Any]:
    """The node's `[packs.postgres]`."""
    return {
        "port": server.port,
        "backup_dir": str(backups),
        "databases": ["app"],
        "methods": ["dump", "basebackup"],
        "bin_dir": str(server.bin),
        **extra,
    }


@pytest.fixture
def backups(tmp_path: Path) -> Path:
    path = tmp_path / "backups"
    path.mkdir()
    return path


async def test_dump_is_checksummed_and_restores(server: PostgresServer, backups: Path) -> None:
    ctx = action_context(PostgresBackup, table(server, backups))  # method dump, the only database
    action = PostgresBackup()

    await run_steps(action, ctx)

    assert action.backup is not None
    assert action.backup.name.startswith("postgres-node-1-app-")
    assert action.backup.suffix == ".dump"
    checksum = action.backup.with_name(action.backup.name + ".sha256")
    sha256sum_check(checksum)
    assert names(backups) == [action.backup.name, checksum.name]

    server.restore(action.backup, "restored")
    assert server.psql("restored", "SELECT count(*), max(item) FROM orders") == f"{ROWS}|item 99"

    with action.backup.open("r+b") as f:  # tampered with: the checksum catches it
        f.seek(100)
        f.write(b"garbage")
    with pytest.raises(ActionFailed, match=r"does not match its checksum"):
        await action.post_check(ctx)


async def test_truncated_dump_fails_pg_restore_list(server: PostgresServer, backups: Path) -> None:
    ctx = action_context(PostgresBackup, table(server, backups))
    action = PostgresBackup()
    await action.pre_check(ctx)
    await action.execute_action(ctx)
    assert action.backup is not None
    # cut short and re-checksummed: the checksum agrees, pg_restore --list does not
    action.backup.write_bytes(action.backup.read_bytes()[:20])
    write_checksum(action.backup, sha256_file(action.backup))
    with pytest.raises(ActionFailed, match=r"pg_restore"):
        await action.post_check(ctx)


async def test_basebackup_verifies_and_starts(server: PostgresServer, backups: Path) -> None:
    ctx = action_context(PostgresBackup, table(server, backups), {"method": "basebackup"})
    action = PostgresBackup()

    await run_steps(action, ctx)  # post_check: pg_verifybackup

    assert action.backup is not None
    assert action.backup.name.startswith("postgres-node-1-")
    assert action.backup.suffix == ".base"
    assert (action.backup / "backup_manifest").is_file()

    # a server started from a copy of it has the data
    data = server.root / "restored"
    shutil.copytree(action.backup, data)
    data.chmod(0o700)
    server.chown(data)
    port = free_port()
    server.start(data=data, port=port)
    try:
        assert server.psql("app", "SELECT count(*) FROM orders", port=port) == str(ROWS)
    finally:
        server.stop(data=data)

    (action.backup / "PG_VERSION").write_text("tampered\n")
    with pytest.raises(ActionFailed, match=r"pg_verifybackup"):
        await action.post_check(ctx)


async def test_pre_check_refuses_a_server_that_is_down(server: PostgresServer, backups: Path) -> None:
    ctx = action_context(PostgresBackup, table(server, backups, port=free_port()))
    with pytest.raises(ActionFailed, match=r"not ready") as failed:
        await PostgresBackup().pre_check(ctx)
    assert failed.value.step == "pre_check"


async def test_pre_check_refuses_a_missing_backup_dir(server: PostgresServer, tmp_path: Path) -> None:
    ctx = action_context(PostgresBackup, table(server, tmp_path / "nowhere"))
    with pytest.raises(ActionFailed, match=r"does not exist"):
        await PostgresBackup().pre_check(ctx)


def test_arguments_only_pick_what_the_node_allows(server: PostgresServer, backups: Path) -> None:
    assert PostgresBackup.exclusion_groups == ("backup",)
    with pytest.raises(InvalidTask, match=r"database 'other' is not in this node's \[packs.postgres\]"):
        action_context(PostgresBackup, table(server, backups), {"database": "other"})
    with pytest.raises(InvalidTask, match=r"method 'basebackup' is not allowed"):
        action_context(PostgresBackup, table(server, backups, methods=["dump"]), {"method": "basebackup"})
    with pytest.raises(InvalidTask, match=r"name the database"):
        action_context(PostgresBackup, table(server, backups, databases=["app", "other"]))
    with pytest.raises(InvalidTask, match=r"leave out database"):
        action_context(PostgresBackup, table(server, backups), {"method": "basebackup", "database": "app"})
    with pytest.raises(InvalidTask, match=r"action_args"):
        action_context(PostgresBackup, table(server, backups), {"method": "pg_dumpall"})
    with pytest.raises(InvalidTask, match=r"packs.postgres"):
        action_context(PostgresBackup, {"port": server.port})  # no backup_dir
