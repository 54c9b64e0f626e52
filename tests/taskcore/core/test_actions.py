"""The action registry: only installed actions, only validated arguments, only compatible versions."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from taskcore.core.actions import Action, ActionRegistry, NoArgs
from taskcore.core.errors import InvalidTask, UnknownAction
from taskcore.core.model import Task
from taskerman_dev.actions import SleepArgs, TestSleep


def _task(action: str = "test:sleep", version: float | str | None = None, **action_args: Any) -> Task:
    raw: dict[str, Any] = {
        "action": action,
        "cluster_name": "demo:web",
        "version": version,
        "taskerman_params": {"action_args": action_args},
    }
    return msgspec.convert(raw, Task)


class _Versioned(Action):
    """An action at version 2.3, to probe the compatibility rule."""

    name = "probe:versioned"
    version = "2.3"


@pytest.fixture(scope="module")
def registry() -> ActionRegistry:
    return ActionRegistry.installed()


def test_installed_registry_has_the_builtin_actions(registry: ActionRegistry) -> None:
    names = registry.names()
    assert "test:sleep" in names
    assert "demo:restart" in names
    assert names == sorted(names)


def test_resolve_test_sleep(registry: ActionRegistry) -> None:
    cls, args = registry.resolve(_task(seconds=0.5, fail=True, fail_nodes=["node-2"]))
    assert cls is TestSleep
    assert args == SleepArgs(seconds=0.5, fail=True, fail_nodes=["node-2"])


def test_resolve_defaults_and_int_seconds(registry: ActionRegistry) -> None:
    _, args = registry.resolve(_task())
    assert args == SleepArgs()
    _, args = registry.resolve(_task(seconds=2))
    assert isinstance(args, SleepArgs)
    assert args.seconds == 2.0


def test_unknown_action(registry: ActionRegistry) -> None:
    with pytest.raises(UnknownAction) as info:
        registry.resolve(_task("nope:rm_rf"))
    err = info.value
    assert isinstance(err, InvalidTask)
    assert err.field == "action"
    assert "'nope:rm_rf'" in err.problem
    assert "test:sleep" in err.problem
    assert "demo:restart" in err.problem


def test_unknown_action_in_an_empty_registry() -> None:
    with pytest.raises(UnknownAction, match=r"installed: none"):
        ActionRegistry({}).resolve(_task())


@pytest.mark.parametrize(
    ("action_args", "says"),
    [
        ({"seconds": "fast"}, "Expected `float`, got `str`"),
        ({"fail": "true"}, "Expected `bool`, got `str`"),
        ({"fail": 1}, "Expected `bool`, got `int`"),
        ({"fail_nodes": "node-1"}, "Expected `array`, got `str`"),
        ({"fail_nodes": [1, 2]}, "Expected `str`, got `int`"),
        ({"command": "rm -rf /"}, "unknown field `command`"),
    ],
)
def test_bad_action_args(registry: ActionRegistry, action_args: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidTask) as info:
        registry.resolve(_task(**action_args))
    err = info.value
    assert not isinstance(err, UnknownAction)
    assert err.field == "taskerman_params.action_args"
    assert says in err.problem


def test_action_without_args_rejects_any() -> None:
    class _NoArgs(Action):
        name = "probe:noargs"

    reg = ActionRegistry({"probe:noargs": _NoArgs})
    cls, args = reg.resolve(_task("probe:noargs"))
    assert cls is _NoArgs
    assert isinstance(args, NoArgs)
    with pytest.raises(InvalidTask) as info:
        reg.resolve(_task("probe:noargs", x=1))
    assert info.value.field == "taskerman_params.action_args"


@pytest.mark.parametrize("version", [None, 1, 1.0, "1", "1.0"])
def test_compatible_versions_of_test_sleep(registry: ActionRegistry, version: float | str | None) -> None:
    cls, _ = registry.resolve(_task(version=version))
    assert cls is TestSleep


@pytest.mark.parametrize("version", [1.1, "1.5", 2, "2.0", 0.9, "0"])
def test_incompatible_versions_of_test_sleep(registry: ActionRegistry, version: float | str) -> None:
    with pytest.raises(InvalidTask) as info:
        registry.resolve(_task(version=version))
    err = info.value
    assert err.field == "version"
    assert "not compatible with installed 1.0" in err.problem


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("2.0", True),
        (2, True),
        (2.2, True),
        ("2.3", True),
        ("2.4", False),
        (2.10, True),  # a JSON float 2.10 is 2.1: minor 1; send "2.10" as a string for minor 10
        ("2.10", False),
        ("3.0", False),
        ("1.9", False),
        ("1.3", False),
    ],
)
def test_version_rule(version: float | str, ok: bool) -> None:
    reg = ActionRegistry({"probe:versioned": _Versioned})
    task = _task("probe:versioned", version=version)
    if ok:
        assert reg.resolve(task)[0] is _Versioned
    else:
        with pytest.raises(InvalidTask) as info:
            reg.resolve(task)
        assert info.value.field == "version"
