"""What every pack shares: health probes with a deadline, running an allowed command with a timeout,
the node operator's typed settings, and the check that an argument only names what those allow.

Commands are argv lists taken from the node's config, run without a shell, in a session of their own
(so a timeout kills the whole group), with their output captured to a file rather than a pipe (so a
command that leaves a daemon behind cannot hang us on an inherited pipe)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import ssl
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

import msgspec

from taskcore.core.actions import ActionContext
from taskcore.core.errors import ActionFailed, InvalidTask, TaskermanError

OUTPUT_TAIL = 2000  # bytes of a command's output kept for its error message
PROBE_INTERVAL = 0.2

_S = TypeVar("_S", bound=msgspec.Struct)
_P = ParamSpec("_P")
_R = TypeVar("_R")

Seconds = Annotated[float, msgspec.Meta(gt=0, le=3600)]
Argv = Annotated[list[Annotated[str, msgspec.Meta(min_length=1)]], msgspec.Meta(min_length=1)]


class ProbeFailed(TaskermanError):
    """A health probe did not pass (or did not pass in time)."""


class CommandFailed(TaskermanError):
    """An allowed command could not run, exited non-zero or outlived its timeout."""

    def __init__(self, argv: Sequence[str], problem: str, output: str = "") -> None:
        self.argv = list(argv)
        self.problem = problem
        self.output = output
        tail = f": {output.strip()[-300:]}" if output.strip() else ""
        super().__init__(f"{' '.join(argv)} {problem}{tail}")


class Probe(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How to ask a service whether it is healthy: exactly one of `tcp = "host:port"` (the port
    accepts a connection), `http = "http://host:port/path"` (answers 2xx; https too) or
    `command = ["argv", ...]` (exits 0); `timeout` bounds one probe."""

    tcp: str | None = None
    http: str | None = None
    command: Argv | None = None
    timeout: Seconds = 2.0

    def __post_init__(self) -> None:
        chosen = [k for k in ("tcp", "http", "command") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError(f"a probe needs exactly one of tcp, http, command (got {chosen or 'none'})")
        if self.tcp is not None:
            host_port(self.tcp)
        if self.http is not None:
            url = urlsplit(self.http)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError(f"http probe {self.http!r}: expected http(s)://host[:port]/path")

    def describe(self) -> str:
        if self.tcp is not None:
            return f"tcp {self.tcp}"
        if self.http is not None:
            return f"http {self.http}"
        return f"command {' '.join(self.command or [])}"


class CommandResult(msgspec.Struct, frozen=True):
    argv: list[str]
    returncode: int
    output: str  # stdout and stderr together, the last OUTPUT_TAIL bytes


def host_port(text: str) -> tuple[str, int]:
    """`127.0.0.1:8080`, `[::1]:8080` or `db.local:5432` as (host, port); ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {text!r}")
    return host, int(port)


# --- the node operator's settings ----------------------------------------------------------------------


def pack_config(ctx: ActionContext, schema: type[_S], step: str = "pre_check") -> _S:
    """The node operator's `[packs.<pack>]` settings as `schema`: the runner's decoded `ctx.config`
    when the action declares `Config = schema`, else the raw table decoded here. A missing or bad
    table is an ActionFailed naming the table and the problem."""
    if isinstance(ctx.config, schema):
        return ctx.config
    pack = ctx.task.action.split(":", 1)[0]
    try:
        return msgspec.convert(dict(ctx.pack_config), schema, strict=True)
    except msgspec.ValidationError as e:
        where = f"[packs.{pack}] of node {ctx.node!r}"
        what = "is missing" if not ctx.pack_config else "is not valid"
        raise ActionFailed(step, f"{where} {what}: {e}") from e


def allowed_name(name: str, allowed: Mapping[str, Any], what: str, arg: str, pack: str) -> None:
    """InvalidTask unless `name` is one of the names the node's config defines: a task may only
    pick among them (`what` is "service", "process" ..., `arg` the argument's name)."""
    if name in allowed:
        return
    known = ", ".join(sorted(allowed)) or "none"
    raise InvalidTask(
        f"{what} {name!r} is not in this node's [packs.{pack}] config (allowed: {known})",
        field=f"taskerman_params.action_args.{arg}",
    )


def missing_program(argv: Sequence[str]) -> str | None:
    """Why `argv` cannot run here (its program is not found or not executable), or None."""
    program = argv[0]
    if os.sep in program:
        return None if os.access(program, os.X_OK) else f"{program} is not an executable file"
    return None if shutil.which(program) else f"{program} is not on PATH"


# --- commands --------------------------------------------------------------------------------------------


async def run_command(
    argv: Sequence[str],
    time_limit: float,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    check: bool = True,
) -> CommandResult:
    """Run an allowed command (an argv list from the node's config, no shell) for at most
    `time_limit` seconds. Past it, or when we are cancelled, its whole process group is killed.
    With `check`, a non-zero exit is a CommandFailed carrying the tail of its output."""
    argv = list(argv)
    with tempfile.TemporaryFile() as out:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as e:
            raise CommandFailed(argv, f"cannot run: {e.strerror or e}") from e
        try:
            async with asyncio.timeout(time_limit):
                returncode = await proc.wait()
        except TimeoutError as e:
            await _kill_group(proc)
            raise CommandFailed(argv, f"timed out after {time_limit:g}s", _tail(out)) from e
        except asyncio.CancelledError:
            await _kill_group(proc)
            raise
        result = CommandResult(argv=argv, returncode=returncode, output=_tail(out))
    if check and returncode != 0:
        raise CommandFailed(argv, f"exited {_exit_text(returncode)}", result.output)
    return result


FENCING_TOKEN_ENV = "TASKERMAN_FENCING_TOKEN"
FENCING_TOKENS_ENV = "TASKERMAN_FENCING_TOKENS"


def fencing_env(ctx: ActionContext, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (or ours) plus the attempt's fencing tokens: `TASKERMAN_FENCING_TOKEN`, the task
    slot's, and `TASKERMAN_FENCING_TOKENS`, a JSON object of every lease's."""
    out = dict(os.environ if env is None else env)
    out[FENCING_TOKEN_ENV] = str(ctx.token)
    out[FENCING_TOKENS_ENV] = msgspec.json.encode(dict(ctx.tokens)).decode()
    return out


async def in_thread(fn: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
    """`asyncio.to_thread`, for a step's work: a thread cannot be stopped, so a cancellation (the
    step's timeout, a lost session, the shutdown grace) is raised only once the thread returned.
    The step, and with it the attempt's leases, lasts as long as its side effect does."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    cancelled = False
    while not work.done():
        try:
            await asyncio.wait({work})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not work.cancelled():
            work.exception()  # retrieved: the cancellation wins
        raise asyncio.CancelledError
    return work.result()


async def run_fenced(
    ctx: ActionContext,
    argv: Sequence[str],
    time_limit: float,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    check: bool = True,
) -> CommandResult:
    """`run_command` fenced by the attempt: `ctx.checkpoint()` before it starts (LeaseLost if the
    runner can no longer vouch for its leases), the fencing tokens in its environment (a command
    that talks to a datastore passes the token along, so the datastore can refuse a stale one),
    and its process group killed as soon as `ctx.cancelled` fires (a lease lost, the step's
    timeout, the runner stopping past its grace): the child never outlives the attempt's leases."""
    ctx.checkpoint()
    command = asyncio.ensure_future(
        run_command(argv, time_limit, env=fencing_env(ctx, env), cwd=cwd, check=check)
    )
    cancelled = asyncio.ensure_future(ctx.cancelled.wait())
    try:
        await asyncio.wait({command, cancelled}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        cancelled.cancel()
        if not command.done():  # cancelled, or we are: kill the group and wait for it to go
            command.cancel()
            await asyncio.gather(command, return_exceptions=True)
    if command.cancelled():
        raise CommandFailed(argv, "killed: the attempt was cancelled (lease lost, timeout or shutdown)")
    return command.result()


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await asyncio.shield(proc.wait())


def _tail(out: Any) -> str:
    out.seek(0, os.SEEK_END)
    size = out.tell()
    out.seek(max(0, size - OUTPUT_TAIL))
    data: bytes = out.read()
    return data.decode(errors="replace")


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"on signal {signal.Signals(-returncode).name}"
    return f"with status {returncode}"


# --- health probes ---------------------------------------------------------------------------------------


async def probe_once(probe: Probe) -> None:
    """One probe, bounded by its timeout; ProbeFailed saying why it did not pass."""
    what = probe.describe()
    try:
        async with asyncio.timeout(probe.timeout):
            if probe.tcp is not None:
                await _tcp(probe.tcp)
            elif probe.http is not None:
                await _http(probe.http)
            else:
                result = await run_command(probe.command or [], probe.timeout + 1.0, check=False)
                if result.returncode != 0:
                    tail = result.output.strip()[-200:]
                    raise ProbeFailed(f"{what}: exited {_exit_text(result.returncode)} {tail}".rstrip())
    except TimeoutError as e:
        raise ProbeFailed(f"{what}: no answer within {probe.timeout:g}s") from e
    except (OSError, CommandFailed) as e:
        raise ProbeFailed(f"{what}: {e}") from e


async def _tcp(target: str) -> None:
    host, port = host_port(target)
    _, writer = await asyncio.open_connection(host, port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def _http(url: str) -> None:
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    context = ssl.create_default_context() if secure else None
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status = (await reader.readline()).split()
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    code = status[1].decode(errors="replace") if len(status) >= 2 else "nothing"
    if not code.isdigit() or not 200 <= int(code) < 300:
        raise ProbeFailed(f"http {url}: answered {code}")


async def wait_healthy(probe: Probe, within: float, interval: float = PROBE_INTERVAL) -> None:
    """Probe until it passes; ProbeFailed with the last reason when `within` seconds pass first
    (a probe still running at the deadline is cut short)."""
    last = "no probe finished"
    try:
        async with asyncio.timeout(within):
            while True:
                try:
                    await probe_once(probe)
                    return
                except ProbeFailed as e:
                    last = str(e)
                await asyncio.sleep(interval)
    except TimeoutError as e:
        raise ProbeFailed(f"not healthy within {within:g}s (last: {last})") from e


async def wait_down(probe: Probe, within: float, interval: float = PROBE_INTERVAL) -> None:
    """Probe until it fails (the service has stopped); ProbeFailed when it still passes after `within`."""
    try:
        async with asyncio.timeout(within):
            while True:
                try:
                    await probe_once(probe)
                except ProbeFailed:
                    return
                await asyncio.sleep(interval)
    except TimeoutError as e:
        raise ProbeFailed(f"{probe.describe()} still passes {within:g}s after the stop") from e
