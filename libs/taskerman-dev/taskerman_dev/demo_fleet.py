"""The demo fleet: a small real HTTP service per node, and `demo:restart`, the action that restarts it.

`python -m taskerman_dev.demo_fleet serve --port P --state-dir D [--node N]` runs one node's service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import msgspec

from taskcore.core.actions import Action, ActionContext
from taskcore.core.errors import ActionFailed, TaskermanError
from taskcore.packs.common import in_thread
from taskcore.runtime import procs

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PACK = "demo"
PIDFILE = "service.pid"
LOGFILE = "service.log"
SERVICE_MARKER = "taskerman_dev.demo_fleet"
PROBE_INTERVAL = 0.1
PROBE_TIMEOUT = 2.0


class ServiceUnhealthy(TaskermanError):
    """The demo service did not answer its health check in time."""


class Health(msgspec.Struct, frozen=True):
    """What `GET /health` answers."""

    node: str
    pid: int
    started_at: float


class DemoPackConfig(msgspec.Struct, frozen=True):
    """The node operator's `[packs.demo]` settings: where this node's service listens and keeps its state."""

    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    state_dir: Annotated[str, msgspec.Meta(min_length=1)]
    stop_timeout: Annotated[float, msgspec.Meta(gt=0, le=600)] = 10.0


class RestartArgs(msgspec.Struct, forbid_unknown_fields=True):
    """Arguments of `demo:restart`."""

    health_timeout: Annotated[float, msgspec.Meta(gt=0, le=600)] = 10.0


# --- processes ------------------------------------------------------------------------------------------


def spawn_detached(
    argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> int:
    """Start `argv` in a new session, detached from this process (not our child), logging to `log_path`.

    A shell forks the command in the background and exits at once, so the command is reparented to init:
    nobody has to reap it, and it outlives whoever started it. Returns its pid."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    script = 'log=$1; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'
    done = subprocess.run(
        ["/bin/sh", "-c", script, "sh", str(log_path), *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
        check=False,
    )
    out = done.stdout.decode().strip()
    if done.returncode != 0 or not out.isdigit():
        raise OSError(f"could not start {argv[0]}: {done.stderr.decode().strip() or out}")
    return int(out)


# --- the service's control: start, stop, health ------------------------------------------------------


def read_pid(state_dir: Path) -> int | None:
    """The pid of the node's running service according to its pidfile, or None if it is not running."""
    try:
        pid = int((Path(state_dir) / PIDFILE).read_text().strip())
    except (OSError, ValueError):
        return None
    if not procs.alive(pid):
        return None
    argv = procs.cmdline(pid)
    if argv is None:
        return pid  # no /proc: trust the pidfile
    return pid if SERVICE_MARKER in "\0".join(argv) else None


def service_command(port: int, state_dir: Path, node: str = "") -> list[str]:
    """The argv that runs the node's service."""
    state_dir = Path(state_dir).resolve()
    argv = [sys.executable, "-m", "taskerman_dev.demo_fleet", "serve", "--port", str(port)]
    return [*argv, "--state-dir", str(state_dir), "--node", node or state_dir.name]


def start_service(port: int, state_dir: Path, node: str = "") -> int:
    """Start the node's service in the background (its log in `state_dir/service.log`); return its pid."""
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    pid = spawn_detached(service_command(port, state_dir, node), state_dir / LOGFILE)
    log.info("demo service started: node=%s port=%d pid=%d", node or state_dir.name, port, pid)
    return pid


def stop_service(state_dir: Path, timeout: float = 10.0) -> int | None:
    """Stop the node's service found through its pidfile (SIGTERM, then SIGKILL); return the pid stopped."""
    pidfile = Path(state_dir) / PIDFILE
    pid = read_pid(Path(state_dir))
    if pid is not None:
        killed = procs.terminate([pid], timeout)
        log.info("demo service stopped: pid=%d%s", pid, " (killed)" if killed else "")
    _remove_pidfile(pidfile, pid)
    return pid


def _remove_pidfile(pidfile: Path, pid: int | None) -> None:
    """Remove the pidfile unless it names another, live service."""
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return
    if pid is None or text == str(pid) or not (text.isdigit() and procs.alive(int(text))):
        pidfile.unlink(missing_ok=True)


async def check_health(port: int, host: str = HOST) -> Health:
    """One `GET /health`; raises ServiceUnhealthy unless it answers 200 with its JSON within 2 s."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"GET /health HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
                await writer.drain()
                raw = await reader.read()  # HTTP/1.0: the server closes after its answer
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError) as e:
        raise ServiceUnhealthy(f"{host}:{port} does not answer ({e!r})") from e
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or status[1] != b"200":
        raise ServiceUnhealthy(f"{host}:{port}/health answered {head[:80]!r}")
    try:
        return msgspec.json.decode(body, type=Health)
    except msgspec.DecodeError as e:
        raise ServiceUnhealthy(f"{host}:{port}/health answered a bad body: {e}") from e


async def wait_healthy(port: int, deadline_s: float, host: str = HOST) -> Health:
    """Poll the health check until it answers; raise ServiceUnhealthy after `deadline_s` seconds."""
    last: ServiceUnhealthy | None = None
    try:
        async with asyncio.timeout(deadline_s):
            while True:
                try:
                    return await check_health(port, host=host)
                except ServiceUnhealthy as e:
                    last = e
                await asyncio.sleep(PROBE_INTERVAL)
    except TimeoutError as e:
        raise ServiceUnhealthy(f"{host}:{port} not healthy after {deadline_s}s ({last})") from e


# --- the action ------------------------------------------------------------------------------------------


def pack_config(ctx: ActionContext, step: str) -> DemoPackConfig:
    """The node operator's `[packs.demo]` settings; ActionFailed naming what is missing or wrong."""
    if not ctx.pack_config:
        raise ActionFailed(
            step,
            f"node {ctx.node!r} has no [packs.{PACK}] settings: its runner config needs port and state_dir",
        )
    try:
        conf = msgspec.convert(dict(ctx.pack_config), DemoPackConfig)
    except msgspec.ValidationError as e:
        raise ActionFailed(step, f"node {ctx.node!r} has bad [packs.{PACK}] settings: {e}") from e
    if not Path(conf.state_dir).is_absolute():
        raise ActionFailed(step, f"node {ctx.node!r}: [packs.{PACK}] state_dir must be an absolute path")
    return conf


class DemoRestart(Action):
    """Restarts the node's demo service and waits until it answers its health check with a new pid."""

    name = "demo:restart"
    version = "1.0"
    Args = RestartArgs

    def __init__(self) -> None:
        self.pid_before: int | None = None
        self.pid_after: int | None = None

    async def pre_check(self, ctx: ActionContext) -> None:
        """The service answers its health check, as this node, from the pid in its pidfile."""
        conf = pack_config(ctx, "pre_check")
        try:
            health = await check_health(conf.port)
        except ServiceUnhealthy as e:
            raise ActionFailed("pre_check", f"service of {ctx.node!r} is not healthy: {e}") from e
        if health.node != ctx.node:
            raise ActionFailed(
                "pre_check", f"port {conf.port} answers as node {health.node!r}, not {ctx.node!r}"
            )
        pid = await in_thread(read_pid, Path(conf.state_dir))
        if pid != health.pid:
            raise ActionFailed(
                "pre_check",
                f"service answers from pid {health.pid} but its pidfile names {pid}: not ours to restart",
            )
        self.pid_before = pid

    async def execute_action(self, ctx: ActionContext) -> None:
        """Stop the service through its pidfile and start it again; record the new pid."""
        conf = pack_config(ctx, "execute_action")
        if ctx.cancelled.is_set():
            raise ActionFailed("execute_action", "cancelled before the restart began")
        state_dir = Path(conf.state_dir)
        stopped = await in_thread(stop_service, state_dir, conf.stop_timeout)
        self.pid_before = stopped if stopped is not None else self.pid_before
        try:
            self.pid_after = await in_thread(start_service, conf.port, state_dir, ctx.node)
        except OSError as e:
            raise ActionFailed("execute_action", f"could not start the service of {ctx.node!r}: {e}") from e
        log.info(
            "demo:restart node=%s task_id=%s pid %s -> %d",
            ctx.node,
            ctx.task.task_id,
            stopped,
            self.pid_after,
        )

    async def post_check(self, ctx: ActionContext) -> None:
        """The service answers within `health_timeout`, from the new pid."""
        conf = pack_config(ctx, "post_check")
        args: RestartArgs = ctx.args
        if self.pid_after is None:
            raise ActionFailed("post_check", "the service was not restarted")
        try:
            health = await wait_healthy(conf.port, args.health_timeout)
        except ServiceUnhealthy as e:
            raise ActionFailed("post_check", f"service of {ctx.node!r} is not healthy: {e}") from e
        if health.pid == self.pid_before:
            raise ActionFailed(
                "post_check", f"service of {ctx.node!r} still answers from old pid {health.pid}"
            )
        if health.pid != self.pid_after:
            raise ActionFailed(
                "post_check", f"service of {ctx.node!r} answers from pid {health.pid}, not {self.pid_after}"
            )


# --- the service itself ----------------------------------------------------------------------------------


def _handler(health: bytes) -> type[http.server.BaseHTTPRequestHandler]:
    """A request handler answering `GET /health` with `health`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = self.path.split("?", 1)[0] == "/health"
            body = health if found else b'{"error": "not found"}'
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


def serve(port: int, state_dir: Path, node: str) -> int:
    """Run the service until SIGTERM or SIGINT: answer health checks, keep the pidfile."""
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # before any thread starts: they inherit it
    health = msgspec.json.encode(Health(node=node, pid=os.getpid(), started_at=time.time()))
    server = http.server.ThreadingHTTPServer((HOST, port), _handler(health))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="http", daemon=True)
    thread.start()
    state_dir.mkdir(parents=True, exist_ok=True)
    pidfile = state_dir / PIDFILE
    tmp = state_dir / f".{PIDFILE}.{os.getpid()}"
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(pidfile)
    log.info("demo service up: node=%s port=%d pid=%d", node, port, os.getpid())
    try:
        received = signal.sigwait(stop_signals)
        log.info("demo service got %s", signal.Signals(received).name)
    finally:
        server.shutdown()
        server.server_close()
        with contextlib.suppress(OSError):
            if pidfile.read_text().strip() == str(os.getpid()):
                pidfile.unlink()
        log.info("demo service down: node=%s pid=%d", node, os.getpid())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m taskerman_dev.demo_fleet serve --port P --state-dir D [--node N]`."""
    parser = argparse.ArgumentParser(prog="python -m taskerman_dev.demo_fleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run one node's demo service")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--node", default="", help="node name to report (default: the state dir's name)")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    state_dir: Path = ns.state_dir.resolve()
    try:
        return serve(ns.port, state_dir, ns.node or state_dir.name)
    except OSError as e:
        log.error("demo service cannot start on %s:%d: %s", HOST, ns.port, e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
