"""`taskerman submit` flags become a validated task, or one InvalidTask naming what is wrong."""

from __future__ import annotations

import pytest

from taskcore.cli import common
from taskcore.cli import main as cli
from taskcore.core.actions import ActionRegistry
from taskcore.core.errors import InvalidTask, UnknownAction
from taskcore.core.model import Task


@pytest.fixture(scope="module")
def registry() -> ActionRegistry:
    return ActionRegistry.installed()


def _build(registry: ActionRegistry, *argv: str) -> Task:
    args = cli.build_parser().parse_args(["submit", *argv])
    return common.build_task(args, registry)


def test_parse_arg_float() -> None:
    key, value = common.parse_arg("seconds=0.5")
    assert key == "seconds"
    assert isinstance(value, float)
    assert value == 0.5


def test_parse_arg_bool() -> None:
    key, value = common.parse_arg("fail=true")
    assert key == "fail"
    assert value is True
    assert common.parse_arg("fail=false") == ("fail", False)


def test_parse_arg_list() -> None:
    assert common.parse_arg('fail_nodes=["a","b"]') == ("fail_nodes", ["a", "b"])


def test_parse_arg_int() -> None:
    key, value = common.parse_arg("count=3")
    assert (key, value) == ("count", 3)
    assert isinstance(value, int)


def test_parse_arg_string() -> None:
    assert common.parse_arg("name=abc") == ("name", "abc")
    assert common.parse_arg("name=node 1") == ("name", "node 1")
    assert common.parse_arg("name=") == ("name", "")


def test_parse_arg_splits_at_the_first_equals() -> None:
    assert common.parse_arg("expr=a=b") == ("expr", "a=b")


@pytest.mark.parametrize("text", ["noequals", "=value", ""])
def test_parse_arg_needs_key_equals_value(text: str) -> None:
    with pytest.raises(InvalidTask) as info:
        common.parse_arg(text)
    assert info.value.field == "--arg"
    assert "key=value" in info.value.problem


def test_build_task(registry: ActionRegistry) -> None:
    task = _build(
        registry,
        "test:sleep",
        "--cluster", "demo:web",
        "--limit", "2",
        "--node", "node-1",
        "--node", "node-2",
        "--arg", "seconds=0.5",
        "--arg", "fail=true",
        "--arg", 'fail_nodes=["node-2"]',
        "--retries", "5",
        "--owner", "gsi",
        "--task-id", "abcd-ef123",
    )  # fmt: skip
    assert task.action == "test:sleep"
    assert task.cluster_name == "demo:web"
    assert task.limit == 2
    assert task.nodes == ("node-1", "node-2")
    assert task.action_args == {"seconds": 0.5, "fail": True, "fail_nodes": ["node-2"]}
    assert task.retry_count == 5
    assert task.owner == "gsi"
    assert task.task_id == "abcd-ef123"


def test_build_task_defaults_and_generated_id(registry: ActionRegistry) -> None:
    first = _build(registry, "test:sleep", "--cluster", "demo:web")
    second = _build(registry, "test:sleep", "--cluster", "demo:web")
    assert first.limit == 1
    assert first.retry_count == 3
    assert first.nodes == ()
    assert first.action_args == {}
    assert len(first.task_id) == 16
    assert first.task_id != second.task_id


def test_limit_zero_is_invalid(registry: ActionRegistry) -> None:
    with pytest.raises(InvalidTask) as info:
        _build(registry, "test:sleep", "--cluster", "demo:web", "--limit", "0")
    assert info.value.field == "limit"
    assert ">= 1" in str(info.value)


def test_retries_out_of_range_is_invalid(registry: ActionRegistry) -> None:
    with pytest.raises(InvalidTask) as info:
        _build(registry, "test:sleep", "--cluster", "demo:web", "--retries", "999")
    assert info.value.field == "taskerman_params.workqueue_args.retry_count"


def test_blank_node_is_invalid(registry: ActionRegistry) -> None:
    with pytest.raises(InvalidTask) as info:
        _build(registry, "test:sleep", "--cluster", "demo:web", "--node", "n1", "--node", "  ")
    assert info.value.field == "nodes[1]"


def test_unknown_action(registry: ActionRegistry) -> None:
    with pytest.raises(UnknownAction) as info:
        _build(registry, "nope:thing", "--cluster", "demo:web")
    assert info.value.field == "action"
    assert "test:sleep" in info.value.problem


def test_bad_action_name(registry: ActionRegistry) -> None:
    with pytest.raises(InvalidTask) as info:
        _build(registry, "restart", "--cluster", "demo:web")
    assert info.value.field == "action"


def test_arg_without_equals(registry: ActionRegistry) -> None:
    with pytest.raises(InvalidTask) as info:
        _build(registry, "test:sleep", "--cluster", "demo:web", "--arg", "noequals")
    assert info.value.field == "--arg"


def test_arg_of_the_wrong_type(registry: ActionRegistry) -> None:
    with pytest.raises(InvalidTask) as info:
        _build(registry, "test:sleep", "--cluster", "demo:web", "--arg", "seconds=slow")
    assert info.value.field == "taskerman_params.action_args"


def test_unknown_arg(registry: ActionRegistry) -> None:
    with pytest.raises(InvalidTask) as info:
        _build(registry, "test:sleep", "--cluster", "demo:web", "--arg", "command=reboot")
    assert info.value.field == "taskerman_params.action_args"
    assert "command" in info.value.problem


def test_submit_and_plan_share_the_routing_options() -> None:
    task = _build(
        ActionRegistry.installed(),
        "test:sleep",
        "--cluster",
        "c",
        "--topology",
        "zone",
        "--routing",
        "seeds_last",
        "--discovery",
        "dns",
    )
    assert task.taskerman_params.topology == "zone"
    assert task.taskerman_params.routing == "seeds_last"
    assert task.discovery == "dns"
    plan = cli.build_parser().parse_args(["plan", "test:sleep", "--cluster", "c", "--topology", "rack"])
    assert common.build_task(plan, ActionRegistry.installed()).taskerman_params.topology == "rack"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("90s", 90.0), ("30m", 1800.0), ("6h", 21600.0), ("2d", 172800.0), ("1.5h", 5400.0)],
)
def test_deadline_durations(text: str, seconds: float) -> None:
    assert common.parse_duration(text, "--deadline") == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5m", "0", "h"])
def test_bad_deadline_names_the_option(text: str) -> None:
    with pytest.raises(InvalidTask) as e:
        common.parse_duration(text, "--deadline")
    assert e.value.field == "--deadline"
