"""`demo:restart` restarts a real demo service and proves it with the pid; it refuses when it cannot."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskcore.core.actions import ActionContext, ActionRegistry
from taskcore.core.errors import ActionFailed, InvalidTask
from taskcore.core.model import decode_task
from taskcore.runtime import procs
from taskerman_dev.demo_fleet import (
    DemoRestart,
    RestartArgs,
    ServiceUnhealthy,
    check_health,
    read_pid,
    start_service,
    stop_service,
    wait_healthy,
)
from taskerman_dev.launchers import free_port

NODE = "node-1"


def _context(pack_config: dict[str, Any], health_timeout: float = 5.0) -> ActionContext:
    """A context as the runner builds it, for node-1 of demo:web."""
    task = decode_task(
        '{"action": "demo:restart", "cluster_name": "demo:web", "task_id": "t-demo", '
        f'"taskerman_params": {{"action_args": {{"health_timeout": {health_timeout}}}}}}}'
    )
    _, args = ActionRegistry({"demo:restart": DemoRestart}).resolve(task)
    return ActionContext(
        task=task, cluster="demo:web", node=NODE, args=args, token=1, attempt=1, pack_config=pack_config
    )


@pytest.fixture
def service(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A running demo service for node-1; its `[packs.demo]` settings."""
    state_dir = tmp_path / NODE
    port = free_port()
    start_service(port, state_dir, NODE)
    try:
        yield {"port": port, "state_dir": str(state_dir)}
    finally:
        stop_service(state_dir, timeout=5.0)


async def test_restart_replaces_the_process(service: dict[str, Any]) -> None:
    before = await wait_healthy(service["port"], 10.0)
    assert before.node == NODE
    ctx = _context(service)
    action = DemoRestart()

    await action.pre_check(ctx)
    await action.execute_action(ctx)
    await action.post_check(ctx)

    after = await check_health(service["port"])
    assert after.pid != before.pid
    assert after.pid == action.pid_after == read_pid(Path(service["state_dir"]))
    assert not procs.alive(before.pid)


async def test_missing_service_fails_pre_check(tmp_path: Path) -> None:
    ctx = _context({"port": free_port(), "state_dir": str(tmp_path / NODE)})
    with pytest.raises(ActionFailed) as failed:
        await DemoRestart().pre_check(ctx)
    assert failed.value.step == "pre_check"
    assert "not healthy" in failed.value.reason


async def test_missing_pack_config_is_a_clear_failure() -> None:
    with pytest.raises(ActionFailed, match=r"no \[packs\.demo\] settings"):
        await DemoRestart().pre_check(_context({}))
    with pytest.raises(ActionFailed, match="port"):
        await DemoRestart().execute_action(_context({"state_dir": "/nowhere"}))
    with pytest.raises(ActionFailed, match="absolute"):
        await DemoRestart().pre_check(_context({"port": 1, "state_dir": "relative/dir"}))


async def test_wrong_node_on_the_port_fails_pre_check(service: dict[str, Any]) -> None:
    await wait_healthy(service["port"], 10.0)
    ctx = _context(service)
    ctx.node = "node-2"
    with pytest.raises(ActionFailed, match="answers as node 'node-1'"):
        await DemoRestart().pre_check(ctx)


async def test_wait_healthy_gives_up() -> None:
    with pytest.raises(ServiceUnhealthy, match="not healthy after"):
        await wait_healthy(free_port(), 0.3)


def test_args_are_validated() -> None:
    registry = ActionRegistry({"demo:restart": DemoRestart})
    task = decode_task('{"action": "demo:restart", "cluster_name": "demo:web"}')
    assert registry.resolve(task)[1] == RestartArgs(health_timeout=10.0)
    bad = decode_task(
        '{"action": "demo:restart", "cluster_name": "c", "taskerman_params": {"action_args": {"port": 22}}}'
    )
    with pytest.raises(InvalidTask, match="port"):
        registry.resolve(bad)


def test_stop_without_a_service_is_a_no_op(tmp_path: Path) -> None:
    (tmp_path / "service.pid").write_text("999999999\n")
    assert stop_service(tmp_path, timeout=1.0) is None
    assert not (tmp_path / "service.pid").exists()
