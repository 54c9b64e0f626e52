"""What every pack shares, against real sockets and processes: probes, allowed commands with a
timeout, the node's typed settings, and the check that an argument only names what they allow."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgspec
import pytest

from taskcore.core.actions import ActionContext
from taskcore.core.errors import ActionFailed, InvalidTask, LeaseLost
from taskcore.core.model import Task
from taskcore.packs.common import (
    CommandFailed,
    Probe,
    ProbeFailed,
    allowed_name,
    missing_program,
    pack_config,
    probe_once,
    run_command,
    run_fenced,
    wait_down,
    wait_healthy,
)
from taskcore.runtime import procs

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _http_answer(status: str) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(f"HTTP/1.0 {status}\r\nContent-Length: 2\r\n\r\nok".encode())
        await writer.drain()
        writer.close()

    return handle


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(10)
    writer.close()


@pytest.fixture
async def http_ok() -> AsyncIterator[int]:
    server, port = await _serve(_http_answer("200 OK"))
    async with server:
        yield port


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- probes ---------------------------------------------------------------------------------------------


async def test_tcp_probe_passes_on_a_listening_port_and_fails_on_a_closed_one(http_ok: int) -> None:
    await probe_once(Probe(tcp=f"127.0.0.1:{http_ok}"))
    with pytest.raises(ProbeFailed, match=r"tcp 127\.0\.0\.1:\d+"):
        await probe_once(Probe(tcp=f"127.0.0.1:{_free_port()}"))


async def test_http_probe_wants_a_2xx(http_ok: int) -> None:
    await probe_once(Probe(http=f"http://127.0.0.1:{http_ok}/health"))
    server, port = await _serve(_http_answer("503 Service Unavailable"))
    async with server:
        with pytest.raises(ProbeFailed, match="answered 503"):
            await probe_once(Probe(http=f"http://127.0.0.1:{port}/health"))


async def test_a_probe_that_hangs_fails_after_its_timeout() -> None:
    server, port = await _serve(_silent)
    async with server:
        started = time.monotonic()
        with pytest.raises(ProbeFailed, match=r"no answer within 0\.3s"):
            await probe_once(Probe(http=f"http://127.0.0.1:{port}/", timeout=0.3))
        assert time.monotonic() - started < 2


async def test_command_probe_is_its_exit_status() -> None:
    await probe_once(Probe(command=["true"]))
    with pytest.raises(ProbeFailed, match="exited with status 3"):
        await probe_once(Probe(command=[sys.executable, "-c", "raise SystemExit(3)"]))


async def test_wait_healthy_waits_for_a_service_that_comes_up() -> None:
    port = _free_port()

    async def later() -> asyncio.Server:
        await asyncio.sleep(0.5)
        return await asyncio.start_server(_http_answer("200 OK"), "127.0.0.1", port)

    starting = asyncio.create_task(later())
    await wait_healthy(Probe(tcp=f"127.0.0.1:{port}"), within=5)
    server = await starting
    server.close()
    await server.wait_closed()
    await wait_down(Probe(tcp=f"127.0.0.1:{port}"), within=2)


async def test_wait_healthy_gives_up_with_the_last_reason() -> None:
    started = time.monotonic()
    with pytest.raises(ProbeFailed, match=r"not healthy within 0\.6s \(last: tcp"):
        await wait_healthy(Probe(tcp=f"127.0.0.1:{_free_port()}"), within=0.6)
    assert time.monotonic() - started < 1.5


async def test_wait_down_fails_while_the_service_still_answers(http_ok: int) -> None:
    with pytest.raises(ProbeFailed, match="still passes"):
        await wait_down(Probe(tcp=f"127.0.0.1:{http_ok}"), within=0.5)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({}, "exactly one of tcp, http, command"),
        ({"tcp": "127.0.0.1:1", "http": "http://x/"}, "exactly one"),
        ({"tcp": "localhost"}, "expected host:port"),
        ({"tcp": "127.0.0.1:99999"}, "expected host:port"),
        ({"http": "ftp://x/"}, "http(s)://"),
        ({"command": []}, "length >= 1"),
        ({"command": "true"}, "Expected `array | null`, got `str`"),
        ({"tcp": "127.0.0.1:1", "timeout": 0}, "Expected `float` > 0"),
        ({"tcp": "127.0.0.1:1", "shell": "x"}, "unknown field `shell`"),
    ],
)
def test_probe_config_is_checked(raw: dict[str, object], says: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert(raw, Probe)
    assert says in str(info.value)


# --- commands -------------------------------------------------------------------------------------------


async def test_run_command_captures_output_and_status() -> None:
    result = await run_command([sys.executable, "-c", "print('hi'); import sys; sys.exit(0)"], 10)
    assert result.returncode == 0
    assert result.output.strip() == "hi"
    with pytest.raises(CommandFailed, match=r"exited with status 2: boom") as info:
        await run_command(["sh", "-c", "echo boom >&2; exit 2"], 10)
    assert info.value.argv == ["sh", "-c", "echo boom >&2; exit 2"]
    unchecked = await run_command(["false"], 10, check=False)
    assert unchecked.returncode == 1


def _fenced_ctx(checkpoint: Callable[[], None] = lambda: None) -> ActionContext:
    task = Task(action="test:sleep", cluster_name="c", task_id="fence-1")
    return ActionContext(
        task=task,
        cluster="c",
        node="n1",
        args=None,
        token=4242,
        attempt=1,
        tokens={"task": 4242, "budget": 17},
        checkpoint=checkpoint,
    )


async def test_a_fenced_command_sees_the_tokens_and_dies_with_the_attempt(tmp_path: Path) -> None:
    ctx = _fenced_ctx()
    seen = await run_fenced(
        ctx, ["sh", "-c", 'echo "$TASKERMAN_FENCING_TOKEN $TASKERMAN_FENCING_TOKENS"'], 10
    )
    assert seen.output.split(" ", 1) == ["4242", '{"task":4242,"budget":17}\n']

    pidfile = tmp_path / "child.pid"
    # the child ignores SIGTERM: only the group kill ends it
    script = f"trap '' TERM; echo $$ > {pidfile}; sleep 60"
    running = asyncio.create_task(run_fenced(ctx, ["sh", "-c", script], 120))
    for _ in range(500):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.02)
    pid = int(pidfile.read_text())
    ctx.cancelled.set()  # what the runner's step guard does when a lease is lost
    with pytest.raises(CommandFailed, match="killed: the attempt was cancelled"):
        await asyncio.wait_for(running, 10)
    assert not procs.alive(pid)  # gone before run_fenced returned: it never outlives the leases


async def test_a_fenced_command_does_not_start_without_its_leases() -> None:
    def lost() -> None:
        raise LeaseLost("session suspended")

    with pytest.raises(LeaseLost):
        await run_fenced(_fenced_ctx(lost), ["sh", "-c", "echo should not run"], 10)


async def test_run_command_is_no_shell() -> None:
    result = await run_command(["echo", "$(id)", ";", "rm", "-rf", "/"], 10)
    assert result.output.strip() == "$(id) ; rm -rf /"


async def test_run_command_kills_the_whole_group_on_timeout(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    script = f"sleep 30 & echo $! > {pidfile}; wait"
    started = time.monotonic()
    with pytest.raises(CommandFailed, match=r"timed out after 0\.5s"):
        await run_command(["sh", "-c", script], 0.5)
    assert time.monotonic() - started < 3
    child = int(pidfile.read_text())
    await asyncio.sleep(0.2)
    assert not _running(child)  # the grandchild went with its group


async def test_run_command_does_not_hang_on_a_daemon_it_leaves_behind(tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    started = time.monotonic()
    await run_command(["sh", "-c", f"(sleep 30 & echo $! > {pidfile}) ; echo started"], 10)
    assert time.monotonic() - started < 3  # the daemon holds our output file, not a pipe we wait on
    daemon = int(pidfile.read_text())
    assert _running(daemon)
    os.kill(daemon, 9)


async def test_a_missing_program_is_named() -> None:
    with pytest.raises(CommandFailed, match="cannot run"):
        await run_command(["/nonexistent/bin/tool", "start"], 5)
    assert missing_program(["/nonexistent/bin/tool"]) == "/nonexistent/bin/tool is not an executable file"
    assert missing_program(["no-such-program-here"]) == "no-such-program-here is not on PATH"
    assert missing_program(["sh", "-c", "true"]) is None


def _running(pid: int) -> bool:
    state = procs.state(pid)
    return state is not None and state not in procs.DEAD_STATES


# --- settings and names ---------------------------------------------------------------------------------


class _Conf(msgspec.Struct, forbid_unknown_fields=True):
    port: int
    names: dict[str, str] = {}


def _ctx(table: dict[str, object], config: object = None) -> ActionContext:
    task = Task(action="demo:thing", cluster_name="c", task_id="t")
    ctx = ActionContext(task=task, cluster="c", node="n1", args=None, token=1, attempt=1, pack_config=table)
    if config is not None:
        ctx.config = config
    return ctx


def test_pack_config_decodes_the_table_or_says_what_is_wrong() -> None:
    assert pack_config(_ctx({"port": 8080}), _Conf) == _Conf(port=8080)
    decoded = _Conf(port=1)
    assert pack_config(_ctx({}, decoded), _Conf) is decoded  # the runner's decoded Config is used
    with pytest.raises(ActionFailed, match=r"\[packs\.demo\] of node 'n1' is missing") as info:
        pack_config(_ctx({}), _Conf, "post_check")
    assert info.value.step == "post_check"
    with pytest.raises(ActionFailed, match=r"is not valid: Expected `int`, got `str` - at `\$.port`"):
        pack_config(_ctx({"port": "8080"}), _Conf)
    with pytest.raises(ActionFailed, match="unknown field `prot`"):
        pack_config(_ctx({"prot": 1}), _Conf)


def test_allowed_name_lists_what_the_node_allows() -> None:
    allowed_name("web", {"web": 1, "db": 2}, "service", "service", "service")
    with pytest.raises(InvalidTask) as info:
        allowed_name("../etc", {"web": 1, "db": 2}, "service", "service", "service")
    assert info.value.field == "taskerman_params.action_args.service"
    assert "'../etc' is not in this node's [packs.service] config (allowed: db, web)" in info.value.problem
