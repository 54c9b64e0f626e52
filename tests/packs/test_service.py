"""The `service` pack's steps, run directly against real commands: a stand-in `systemctl` script
that records its calls and flips a health flag, a health probe that reads the flag; plus its
config schema and the checks that arguments only name what the node's config allows."""

from __future__ import annotations

import asyncio
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from taskcore.core.actions import Action, ActionContext, node_config
from taskcore.core.errors import ActionFailed, InvalidTask
from taskcore.core.model import Task
from taskcore.packs.service import Reload, Restart, ServiceArgs, ServiceConfig, StopStart

FAKE_SYSTEMCTL = """#!/bin/sh
# a stand-in for systemctl: records its arguments; stop removes the health flag, start and
# restart create it (unless the unit is "broken.service", which never comes up)
echo "$@" >> "{log}"
case "$1" in
  stop) rm -f "{flag}" ;;
  start|restart|reload) [ "$2" = broken.service ] || touch "{flag}" ;;
esac
"""


@pytest.fixture
def box(tmp_path: Path) -> dict[str, Path]:
    log, flag = tmp_path / "calls.log", tmp_path / "healthy"
    ctl = tmp_path / "systemctl"
    ctl.write_text(FAKE_SYSTEMCTL.format(log=log, flag=flag))
    ctl.chmod(0o755)
    flag.touch()
    return {"log": log, "flag": flag, "ctl": ctl, "tmp": tmp_path}


def _table(box: dict[str, Path], **service: Any) -> dict[str, Any]:
    probe = {"command": ["test", "-f", str(box["flag"])]}
    return {
        "systemctl": [str(box["ctl"])],
        "services": {"web": {"unit": "nginx.service", "probe": probe, "health_timeout": 2, **service}},
    }


def _ctx(cls: type[Action], table: dict[str, Any], **args: Any) -> ActionContext:
    task = Task(action=cls.name, cluster_name="c", task_id="t")
    config = node_config(cls, cls.name, table)
    parsed = msgspec.convert(args, cls.Args)
    cls.check_args(parsed, config)
    return ActionContext(
        task=task, cluster="c", node="n1", args=parsed, token=1, attempt=1, pack_config=table, config=config
    )


async def _run(cls: type[Action], ctx: ActionContext) -> None:
    action = cls()
    await action.pre_check(ctx)
    await action.execute_action(ctx)
    await action.post_check(ctx)


def _calls(box: dict[str, Path]) -> list[str]:
    return box["log"].read_text().splitlines() if box["log"].exists() else []


async def test_restart_through_systemd(box: dict[str, Path]) -> None:
    await _run(Restart, _ctx(Restart, _table(box), service="web"))
    assert _calls(box) == ["restart nginx.service"]


async def test_reload_through_systemd(box: dict[str, Path]) -> None:
    await _run(Reload, _ctx(Reload, _table(box), service="web"))
    assert _calls(box) == ["reload nginx.service"]


async def test_stop_start_waits_until_the_service_is_down(box: dict[str, Path]) -> None:
    await _run(StopStart, _ctx(StopStart, _table(box), service="web"))
    assert _calls(box) == ["stop nginx.service", "start nginx.service"]


async def test_restart_through_a_command_pair(box: dict[str, Path]) -> None:
    flag = str(box["flag"])
    table = _table(box)
    table["services"]["web"] = {
        "stop": ["rm", "-f", flag],
        "start": ["touch", flag],
        "probe": {"command": ["test", "-f", flag]},
    }
    await _run(Restart, _ctx(Restart, table, service="web"))
    assert box["flag"].exists()
    assert not _calls(box)  # no systemctl involved


async def test_an_unhealthy_service_is_left_alone_unless_allowed(box: dict[str, Path]) -> None:
    box["flag"].unlink()
    with pytest.raises(ActionFailed, match="not healthy before the restart") as info:
        await Restart().pre_check(_ctx(Restart, _table(box), service="web"))
    assert info.value.step == "pre_check"
    assert "allow_unhealthy" in str(info.value)
    await _run(Restart, _ctx(Restart, _table(box), service="web", allow_unhealthy=True))
    assert _calls(box) == ["restart nginx.service"]


async def test_post_check_fails_when_the_service_never_comes_back(box: dict[str, Path]) -> None:
    ctx = _ctx(Restart, _table(box, unit="broken.service", health_timeout=0.8), service="web")
    action = Restart()
    await action.pre_check(ctx)
    box["flag"].unlink()  # the restart takes it down, and it never comes back
    await action.execute_action(ctx)
    with pytest.raises(ActionFailed, match=r"not healthy within 0\.8s") as info:
        await action.post_check(ctx)
    assert info.value.step == "post_check"


async def test_a_failing_command_fails_execute_with_its_output(box: dict[str, Path]) -> None:
    table = _table(box)
    table["services"]["web"] = {
        "stop": ["sh", "-c", "echo 'permission denied' >&2; exit 4"],
        "start": ["true"],
        "probe": {"command": ["true"]},
    }
    with pytest.raises(ActionFailed, match="exited with status 4: permission denied"):
        await _run(Restart, _ctx(Restart, table, service="web"))


async def test_pre_check_names_a_command_that_is_not_installed(box: dict[str, Path]) -> None:
    table = _table(box)
    table["services"]["web"] = {
        "stop": ["no-such-ctl", "stop"],
        "start": ["true"],
        "probe": {"command": ["true"]},
    }
    with pytest.raises(ActionFailed, match="no-such-ctl is not on PATH"):
        await Restart().pre_check(_ctx(Restart, table, service="web"))


async def test_a_step_that_is_cancelled_kills_its_command(box: dict[str, Path]) -> None:
    table = _table(box)
    marker = box["tmp"] / "finished"
    table["services"]["web"] = {
        "stop": ["sh", "-c", f"sleep 5; touch {marker}"],
        "start": ["true"],
        "probe": {"command": ["true"]},
    }
    step = asyncio.create_task(Restart().execute_action(_ctx(Restart, table, service="web")))
    await asyncio.sleep(0.3)
    step.cancel()
    with pytest.raises(asyncio.CancelledError):
        await step
    await asyncio.sleep(0.2)
    assert not marker.exists()


# --- what a task may name -------------------------------------------------------------------------------


def test_a_service_the_node_does_not_name_is_rejected(box: dict[str, Path]) -> None:
    with pytest.raises(InvalidTask) as info:
        _ctx(Restart, _table(box), service="db")
    assert info.value.field == "taskerman_params.action_args.service"
    assert "service 'db' is not in this node's [packs.service] config (allowed: web)" in info.value.problem


def test_reload_needs_a_unit_or_a_reload_command(box: dict[str, Path]) -> None:
    table = _table(box)
    table["services"]["web"] = {"stop": ["true"], "start": ["true"], "probe": {"command": ["true"]}}
    with pytest.raises(InvalidTask, match="has no `reload` command"):
        _ctx(Reload, table, service="web")
    _ctx(Restart, table, service="web")  # restart does not need one


@pytest.mark.parametrize(
    ("service", "says"),
    [
        ({"probe": {"tcp": "127.0.0.1:1"}}, "needs `unit`, or both `start` and `stop`"),
        ({"start": ["x"], "probe": {"tcp": "127.0.0.1:1"}}, "needs `unit`, or both"),
        ({"unit": "a.service", "start": ["x"], "stop": ["y"], "probe": {"tcp": "127.0.0.1:1"}}, "not both"),
        ({"unit": "--now", "probe": {"tcp": "127.0.0.1:1"}}, "is not a systemd unit name"),
        ({"unit": "a.service"}, "missing required field `probe`"),
        ({"unit": "a.service", "probe": {"tcp": "127.0.0.1:1"}, "start_cmd": ["x"]}, "unknown field"),
        ({"start": "svc start", "stop": ["y"], "probe": {"tcp": "127.0.0.1:1"}}, "Expected `array | null`"),
    ],
)
def test_service_config_is_checked(service: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidTask) as info:
        node_config(Restart, "service:restart", {"services": {"web": service}})
    assert info.value.field == "packs.service"
    assert says in info.value.problem
    assert "[packs.service] settings are not valid for service:restart" in info.value.problem


def test_a_node_without_the_table_cannot_run_the_pack() -> None:
    with pytest.raises(InvalidTask, match=r"this node has no \[packs\.service\] table"):
        node_config(Restart, "service:restart", None)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ({"service": "web", "unit": "sshd.service"}, "unknown field `unit`"),
        ({"service": "web", "command": ["rm", "-rf", "/"]}, "unknown field `command`"),
        ({"service": 3}, "Expected `str`, got `int`"),
        ({"service": "web", "allow_unhealthy": "yes"}, "Expected `bool`, got `str`"),
        ({}, "missing required field `service`"),
    ],
)
def test_arguments_cannot_smuggle_in_commands(args: dict[str, Any], says: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=re.escape(says)):
        msgspec.convert(args, ServiceArgs, strict=True)


def test_the_config_schema_reads_toml() -> None:
    raw = tomllib.loads(
        """
        systemctl = ["sudo", "-n", "systemctl"]
        [services.web]
        unit = "nginx.service"
        probe = {http = "http://127.0.0.1:8080/health", timeout = 1}
        health_timeout = 60
        [services.api]
        start = ["/usr/local/bin/api-ctl", "start"]
        stop = ["/usr/local/bin/api-ctl", "stop"]
        probe = {tcp = "127.0.0.1:9000"}
        """
    )
    conf = msgspec.convert(raw, ServiceConfig, strict=True)
    assert conf.systemctl == ["sudo", "-n", "systemctl"]
    assert conf.services["web"].probe.timeout == 1.0
    assert conf.services["api"].can_reload() is False
