"""`taskerman publish`: a task's raw JSON onto `tasks.global`, from a file or stdin, through a real
router and runner; what does not decode is refused before anything is published."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskcore.bus.tracking import StatusStore
from taskcore.core import subjects
from tests.e2e.conftest import BIN, Stack, wait_final


def publish(stack: Stack, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "taskerman"), "publish", *args],
        env=stack.env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def task(**fields: object) -> str:
    return json.dumps({"action": "test:sleep", "cluster_name": "c1", "nodes": ["n1", "n2"], **fields})


async def published(js: JetStreamContext) -> int:
    """Messages ever stored on tasks.global (the router's acks remove them from the work queue)."""
    return (await js.stream_info(subjects.TASKS_STREAM)).state.last_seq


async def test_publish_from_stdin_and_from_a_file_runs_the_task(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore, tmp_path: Path
) -> None:
    stack.router()
    stack.runner("c1", ["n1", "n2"])
    args = {"action_args": {"seconds": 0.1}}
    out = publish(stack, stdin=task(task_id="pub-stdin", limit=2, taskerman_params=args))
    assert (out.returncode, out.stdout, out.stderr) == (0, "pub-stdin\n", "")
    path = tmp_path / "task.json"
    path.write_text(task(task_id="pub-file", taskerman_params=args))
    out = publish(stack, str(path), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"task_id": "pub-file"}
    for task_id in ("pub-stdin", "pub-file"):
        view = await wait_final(status, task_id, stack=stack)
        assert view.state == "succeeded", view
        assert view.limit == (2 if task_id == "pub-stdin" else 1)
    again = publish(stack, str(path))  # the same id: JetStream drops it, and says so
    assert again.returncode == 0
    assert "already published" in again.stderr
    assert await published(js[1]) == 2


async def test_publish_without_task_id_prints_the_id_the_router_gives_it(
    stack: Stack, status: StatusStore
) -> None:
    stack.router()
    stack.runner("c1", ["n1", "n2"])
    out = publish(stack, "-", "--wait", stdin=task(taskerman_params={"action_args": {"seconds": 0.1}}))
    assert out.returncode == 0, out.stdout + out.stderr
    task_id = out.stdout.splitlines()[0]
    view = await wait_final(status, task_id, stack=stack)
    assert view.state == "succeeded"
    assert sorted(view.nodes) == ["n1", "n2"]


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        ('{"action": "test:sleep", "cluster_name": ', "not valid JSON"),
        ("", "no task in stdin"),
        ("[1, 2]", "Expected `object`"),
        (task(limit=0), "limit: Expected `int` >= 1"),
        (task(colour="red"), "colour"),
        (task(taskerman_params={"retries": 3}), "taskerman_params.retries"),
    ],
)
async def test_publish_refuses_what_does_not_decode_and_publishes_nothing(
    stack: Stack, js: tuple[NATS, JetStreamContext], payload: str, says: str
) -> None:
    out = publish(stack, stdin=payload)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout == ""
    assert says in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert await published(js[1]) == 0


async def test_publish_of_a_missing_file_is_a_clear_error(stack: Stack, tmp_path: Path) -> None:
    out = publish(stack, str(tmp_path / "nope.json"))
    assert out.returncode == 2
    assert "cannot read" in out.stderr
    assert "No such file or directory" in out.stderr
