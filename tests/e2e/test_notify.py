"""Webhooks on a real stack: the scheduler's notifier posts to a real local HTTP receiver when a
task ends (finished, failed), a node is dead-lettered and a breaker opens, each signed; a receiver
that is down gets them once it comes back."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from taskcore.bus.tracking import StatusStore
from taskcore.core import subjects
from taskerman_dev.launchers.ports import free_port
from taskerman_scheduler import notifier, webhooks
from tests.e2e.conftest import Stack, publish_raw, task_json, wait_final

SECRET = "a shared secret of the receiver"


class Receiver:
    """A real HTTP server on a fixed port that records what it is sent; `start` and `stop` it at
    will (the port stays the same, as a receiver that was down and came back)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.got: list[dict[str, Any]] = []
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        got = self.got

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                payload = self.rfile.read(int(self.headers["Content-Length"]))
                got.append({"headers": dict(self.headers), "payload": payload})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def notices(self) -> list[dict[str, Any]]:
        return [json.loads(g["payload"])["taskerman"] for g in self.got]


def hooks_file(tmp: Path, port: int) -> Path:
    secret = tmp / "hook.secret"
    secret.write_text(SECRET + "\n")
    path = tmp / "webhooks.toml"
    path.write_text(
        "[[webhook]]\n"
        'name = "oncall"\n'
        f'url = "http://127.0.0.1:{port}/hook"\n'
        f'secret_file = "{secret}"\n'
        'clusters = ["c1"]\n'
        "retry_base_s = 0.5\n"
        "retry_max_s = 2.0\n"
        "\n[[webhook]]\n"
        'name = "named-only"\n'
        f'url = "http://127.0.0.1:{port}/named"\n'
        f'secret_file = "{secret}"\n'
        'events = ["finished"]\n'
    )
    return path


async def notifier_ready(js: JetStreamContext, within: float = 30) -> None:
    """Until the leading scheduler's notifier has its consumer: it reads the events from then on."""
    deadline = time.monotonic() + within
    while True:
        try:
            await js.consumer_info(subjects.EVENTS_STREAM, notifier.DURABLE)
            return
        except NotFoundError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def received(
    receiver: Receiver, want: set[tuple[str, str]], within: float = 60
) -> list[tuple[str, str]]:
    """(kind, task id) of every notice received, once `want` are all in and a second more has
    passed (room for a repeat that should not come)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if want <= {(n["kind"], n["task_id"]) for n in receiver.notices()}:
            await asyncio.sleep(1)
            break
        await asyncio.sleep(0.2)
    return sorted((n["kind"], n["task_id"]) for n in receiver.notices())


async def test_the_end_of_tasks_dead_letters_and_an_opened_breaker_are_posted_signed(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    receiver = Receiver(free_port())
    receiver.start()
    try:
        stack.spawn("taskerman-scheduler", "--webhooks", str(hooks_file(stack.tmp, receiver.port)))
        stack.router()
        stack.runner("c1", ["n1", "n2"])
        await notifier_ready(js[1])
        ok = task_json(
            action="test:sleep",
            cluster_name="c1",
            nodes=["n1", "n2"],
            limit=2,
            task_id="ok-1",
            taskerman_params={"action_args": {"seconds": 0.2}, "notify": ["named-only"]},
        )
        await publish_raw(js[1], ok)
        assert (await wait_final(status, "ok-1", stack=stack)).state == "succeeded"
        bad = task_json(
            action="test:sleep",
            cluster_name="c1",
            nodes=["n1", "n2"],
            limit=2,
            task_id="bad-1",
            taskerman_params={
                "action_args": {"seconds": 0.1, "post_check_fail_nodes": ["n2"]},
                "workqueue_args": {"retry_count": 0},
            },
        )
        await publish_raw(js[1], bad)
        assert (await wait_final(status, "bad-1", stack=stack)).state != "succeeded"
        want = {
            ("finished", "ok-1"),
            ("failed", "bad-1"),
            ("dead-lettered", "bad-1"),
            ("breaker-opened", "bad-1"),
        }
        kinds = await received(receiver, want)
    finally:
        receiver.stop()
    assert want <= set(kinds), (kinds, stack.logs())
    assert kinds.count(("finished", "ok-1")) == 2  # to the cluster's webhook and to the one it named
    assert kinds.count(("failed", "bad-1")) == 1  # the other follows finished tasks it is named by
    for got in receiver.got:
        h = got["headers"]
        assert webhooks.verify(
            SECRET.encode(), h[webhooks.TIMESTAMP_HEADER], got["payload"], h[webhooks.SIGNATURE_HEADER]
        )
        assert json.loads(got["payload"])["text"]  # what a Slack channel shows
    ended = next(n for n in receiver.notices() if n["kind"] == "finished")
    assert ended["state"] == "succeeded"
    assert "2 succeeded" in ended["detail"]


async def test_a_receiver_that_was_down_gets_the_notices_when_it_comes_back(
    stack: Stack, js: tuple[NATS, JetStreamContext], status: StatusStore
) -> None:
    receiver = Receiver(free_port())  # not started: connections are refused
    stack.spawn("taskerman-scheduler", "--webhooks", str(hooks_file(stack.tmp, receiver.port)))
    stack.router()
    stack.runner("c1", ["n1"])
    await notifier_ready(js[1])
    task = task_json(
        action="test:sleep",
        cluster_name="c1",
        nodes=["n1"],
        task_id="late-1",
        taskerman_params={"action_args": {"seconds": 0.1}},
    )
    await publish_raw(js[1], task)
    assert (await wait_final(status, "late-1", stack=stack)).state == "succeeded"
    await asyncio.sleep(3)  # a few tries refused
    assert "webhook not reached webhook=oncall" in (stack.tmp / "taskerman-scheduler.log").read_text()
    receiver.start()
    try:
        kinds = await received(receiver, {("finished", "late-1")})
    finally:
        receiver.stop()
    assert kinds == [("finished", "late-1")], stack.logs()
    assert len({g["headers"][webhooks.DELIVERY_HEADER] for g in receiver.got}) == 1
