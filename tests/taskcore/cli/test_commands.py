"""The `taskerman` parser is built from the commands registered under `taskerman.cli`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from taskcore.cli import common
from taskcore.cli import main as cli
from taskcore.cli.command import ENTRY_POINT_GROUP, SettingsHook
from taskcore.cli.plan import Plan
from taskcore.cli.tasks import Status, Submit
from taskcore.core import signing
from taskcore.core.settings import Settings
from taskerman_dev.cli import Dev
from taskerman_dev.launchers import free_port

TASKCORE_COMMANDS = {
    "actions", "breaker", "cancel", "cluster", "dlq", "events", "health", "keys", "leases", "nodes",
    "pause", "plan", "publish", "resume", "schedules", "status", "submit", "tasks", "trace", "watch",
}  # fmt: skip


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_every_registered_command_is_in_the_parser() -> None:
    registered = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert registered == TASKCORE_COMMANDS | {"dev"}  # taskerman-dev is installed in development
    assert _commands(cli.build_parser()) == registered
    assert {c.name for c in cli.installed()} == registered


def test_without_the_dev_group_there_is_no_dev_command() -> None:
    commands = [c for c in cli.installed() if c.name != "dev"]
    parser = cli.build_parser(commands)
    assert _commands(parser) == TASKCORE_COMMANDS
    with pytest.raises(SystemExit):
        parser.parse_args(["dev", "up"])


def test_parsed_arguments_name_their_command() -> None:
    submit, status = Submit(), Status()
    parser = cli.build_parser([submit, status, Plan()])
    assert parser.parse_args(["status", "t1"]).command is status
    assert parser.parse_args(["submit", "test:sleep", "--cluster", "c"]).command is submit


def test_settings_hooks_adjust_the_settings_of_the_other_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    class Pinned:
        name = "pinned"

        def add_parser(self, subparsers: object) -> None:
            raise AssertionError("not parsed here")

        def run(self, args: argparse.Namespace, settings: Settings) -> int:
            return 0

        def adjust_settings(self, settings: Settings, env: object) -> Settings:
            return Settings(nats_url="nats://pinned:1", zk_hosts=settings.zk_hosts)

    pinned, status = Pinned(), Status()
    assert isinstance(pinned, SettingsHook)
    assert not isinstance(status, SettingsHook)
    monkeypatch.setenv("TASKERMAN_NATS_URL", "nats://env:2")
    assert cli.settings_for(status, [pinned, status]).nats_url == "nats://pinned:1"
    assert cli.settings_for(pinned, [pinned, status]).nats_url == "nats://env:2"  # not its own


def test_the_dev_hook_leaves_explicit_servers_alone() -> None:
    settings = Settings(nats_url="nats://a:1", zk_hosts="b:2")
    env = {"TASKERMAN_NATS_URL": "nats://a:1", "TASKERMAN_ZK_HOSTS": "b:2"}
    assert Dev().adjust_settings(settings, env) is settings


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`taskerman … | head`: the reader went away; exit 0, no traceback."""
    seed = tmp_path / "r.nk"
    signing.write_seed(seed)
    read, write = os.pipe()
    os.close(read)  # nobody reads: the first write fails with EPIPE
    try:
        done = subprocess.run(
            [str(Path(sys.executable).parent / "taskerman"), "keys", "nats-config", f"router={seed}"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    finally:
        os.close(write)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_an_unreachable_server_is_one_line_with_a_hint(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")  # nothing listens there
    env = {**os.environ, "TASKERMAN_NATS_URL": f"nats://127.0.0.1:{port}", "TASKERMAN_HOME": str(tmp_path)}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "taskerman"), "status", "t1"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"taskerman: NATS at nats://127.0.0.1:{port} is unreachable (no answer in 5s). {common.SERVER_HINT}"
    ]
