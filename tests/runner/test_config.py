"""The node config: what only the operator decides (enabled packs, pack settings, overrides), checked
against the installed actions at start-up and per item before anything runs; the shutdown grace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from taskcore.core.actions import ActionRegistry, AnyConfig
from taskcore.core.errors import InvalidTask, TaskermanError, UnknownAction
from taskcore.core.model import Task
from taskcore.packs.service import Restart, ServiceArgs, ServiceConfig
from taskerman_runner import config

NODE_TOML = """
cluster = "web:eu"
node = "web-1"
enabled_packs = ["service", "test"]

[packs.service.services.web]
unit = "nginx.service"
probe = {http = "http://127.0.0.1:8080/health"}

[actions."service:restart"]
timeout = 120
exclusion_groups = ["restarts"]
"""


@pytest.fixture(scope="module")
def installed() -> ActionRegistry:
    return ActionRegistry.installed()


def _task(action: str, **args: Any) -> Task:
    return msgspec.convert(
        {"action": action, "cluster_name": "web:eu", "taskerman_params": {"action_args": args}}, Task
    )


def test_load_a_node_config(tmp_path: Path, installed: ActionRegistry) -> None:
    path = tmp_path / "node.toml"
    path.write_text(NODE_TOML)
    conf = config.load(path)
    assert conf.enabled_packs == ["service", "test"]
    assert conf.actions["service:restart"].timeout == 120.0
    assert config.check(conf, installed.only(conf.enabled_packs)) == []


def test_bad_settings_are_caught_at_start(tmp_path: Path, installed: ActionRegistry) -> None:
    conf = config.NodeConfig(
        cluster="c",
        enabled_packs=["service", "servcie"],
        packs={"service": {"services": {"web": {"unit": "nginx.service"}}}},
    )
    problems = config.check(conf, installed.only(conf.enabled_packs))
    assert "enabled_packs: no installed action belongs to pack 'servcie'" in problems
    assert any(p.startswith("[packs.service]:") and "missing required field `probe`" in p for p in problems)
    path = tmp_path / "bad.toml"
    path.write_text('cluster = "c"\n[actions."test:sleep"]\ntimeout = -1\n')
    with pytest.raises(TaskermanError, match=r"bad\.toml: Expected `float` > 0"):
        config.load(path)


def test_a_disabled_pack_is_refused_by_name(installed: ActionRegistry) -> None:
    registry = installed.only(["test"])
    assert "service:restart" not in registry.names()
    assert "test:sleep" in registry.names()
    with pytest.raises(UnknownAction, match="its pack 'service' is not enabled on this node"):
        registry.resolve(_task("service:restart", service="web"))
    assert installed.only(None) is installed


def test_resolve_for_node_checks_the_node_config(installed: ActionRegistry) -> None:
    packs = {"service": {"services": {"web": {"unit": "nginx.service", "probe": {"tcp": "127.0.0.1:80"}}}}}
    cls, args, conf = installed.resolve_for_node(_task("service:restart", service="web"), packs)
    assert cls is Restart
    assert args == ServiceArgs(service="web")
    assert isinstance(conf, ServiceConfig)
    with pytest.raises(InvalidTask) as info:
        installed.resolve_for_node(_task("service:restart", service="sshd"), packs)
    assert info.value.field == "taskerman_params.action_args.service"
    with pytest.raises(InvalidTask, match=r"no \[packs\.service\] table") as missing:
        installed.resolve_for_node(_task("service:restart", service="web"), {})
    assert missing.value.field == "packs.service"
    with pytest.raises(InvalidTask, match="unknown field `unti`"):
        installed.resolve_for_node(
            _task("service:restart", service="web"), {"service": {"services": {"web": {"unti": "x"}}}}
        )
    # an action without a schema takes any table, or none
    _, _, anything = installed.resolve_for_node(_task("test:sleep"), {"test": {"fail_marker": "/x"}})
    assert isinstance(anything, AnyConfig)


@pytest.mark.parametrize(("raw", "grace"), [(None, 30.0), ("", 30.0), ("2.5", 2.5), ("0", 0.0)])
def test_shutdown_grace(raw: str | None, grace: float) -> None:
    env = {} if raw is None else {config.GRACE_ENV: raw}
    assert config.shutdown_grace(env) == grace


@pytest.mark.parametrize("raw", ["-1", "soon", "inf", "nan"])
def test_a_bad_shutdown_grace_is_refused(raw: str) -> None:
    with pytest.raises(TaskermanError, match="TASKERMAN_SHUTDOWN_GRACE"):
        config.shutdown_grace({config.GRACE_ENV: raw})


class _BrokenCheck(Restart):
    """An action whose own check is buggy."""

    @classmethod
    def check_args(cls, args: Any, config: Any) -> None:
        raise KeyError("oops")


def test_a_broken_check_refuses_the_item_instead_of_crashing() -> None:
    registry = ActionRegistry({"service:restart": _BrokenCheck})
    packs = {"service": {"services": {"web": {"unit": "nginx.service", "probe": {"tcp": "127.0.0.1:80"}}}}}
    with pytest.raises(InvalidTask, match="could not check its arguments: KeyError"):
        registry.resolve_for_node(_task("service:restart", service="web"), packs)
