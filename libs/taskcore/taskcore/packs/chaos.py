"""The `chaos` pack: failure injection on processes that the node's operator names.

`chaos:kill-process` signals a process (SIGKILL by default) and checks that it is gone;
`chaos:pause-process` stops it with SIGSTOP for some seconds (at most the node's `max_pause`), then
resumes it with SIGCONT, whatever happens: when the step is cancelled, and, through a detached
watchdog, even when the runner itself dies meanwhile. A task names a process by the key the node
config gives it; the config finds it by pidfile or by exact name in /proc. A task never gives a pid."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from taskcore.core.actions import Action, ActionContext
from taskcore.core.errors import ActionFailed, InvalidTask
from taskcore.packs.common import Seconds, allowed_name, pack_config
from taskcore.runtime import procs

log = logging.getLogger(__name__)
PACK = "chaos"
POLL = 0.05
WATCHDOG_MARGIN = 5.0  # the detached watchdog resumes a paused process this long after it should have
SignalName = Literal["KILL", "TERM", "INT", "QUIT", "HUP"]


class ProcessDef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A process failure injection may target: the pid in `pidfile`, or the processes whose name
    (`/proc/PID/comm`, or the basename of argv[0]) is exactly `name`; with both, the pidfile's
    process must also have that name. More than one match by name is refused unless `all`."""

    pidfile: str | None = None
    name: str | None = None
    all: bool = False
    kill_timeout: Seconds = 10.0  # post_check of kill-process: gone within this

    def __post_init__(self) -> None:
        if self.pidfile is None and not self.name:
            raise ValueError("a process needs `pidfile` or `name`")
        if self.pidfile is not None and not os.path.isabs(self.pidfile):
            raise ValueError(f"`pidfile` {self.pidfile!r} must be an absolute path")


class ChaosConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The node operator's `[packs.chaos]` table."""

    processes: dict[str, ProcessDef]
    max_pause: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 60.0


class KillArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    process: Annotated[str, msgspec.Meta(min_length=1)]
    signal: SignalName = "KILL"


class PauseArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    process: Annotated[str, msgspec.Meta(min_length=1)]
    seconds: Annotated[float, msgspec.Meta(gt=0)] = 5.0


class Target(msgspec.Struct, frozen=True):
    """A process, as a pid and its start time (so a later reuse of the pid is not mistaken for it)."""

    pid: int
    started: int


# --- /proc ----------------------------------------------------------------------------------------------


def state(target: Target) -> str | None:
    """The process state letter (R, S, T, Z ...), or None when the process is gone (or the pid reused)."""
    return procs.state(target.pid, target.started)


def alive(target: Target) -> bool:
    """Whether the target still runs; never reaps it (it is the node's process, not ours to reap)."""
    return procs.alive(target.pid, target.started, reap=False)


def target(pid: int) -> Target | None:
    found = procs.stat(pid)
    if found is None or found.state in procs.DEAD_STATES:
        return None
    return Target(pid=pid, started=found.start_ticks)


def names(pid: int) -> set[str]:
    """What a process is called: its comm, and the basename of its argv[0]."""
    found = set()
    if (name := procs.comm(pid)) is not None:
        found.add(name)
    if argv := procs.cmdline(pid):
        found.add(os.path.basename(argv[0]))
    return found


def find(key: str, proc: ProcessDef, step: str) -> list[Target]:
    """The processes `proc` names right now; ActionFailed when there is none (or an ambiguous name)."""
    if proc.pidfile is not None:
        try:
            pid = int(Path(proc.pidfile).read_text().strip())
        except (OSError, ValueError) as e:
            raise ActionFailed(step, f"process {key!r}: cannot read a pid from {proc.pidfile}: {e}") from e
        found = target(pid)
        if found is None:
            raise ActionFailed(step, f"process {key!r}: pid {pid} from {proc.pidfile} is not running")
        if proc.name and proc.name not in names(pid):
            raise ActionFailed(
                step, f"process {key!r}: pid {pid} from {proc.pidfile} is not {proc.name!r}: stale pidfile?"
            )
        return [found]
    mine = {os.getpid(), os.getppid()}
    matches = []
    for pid in procs.pids():
        if pid not in mine and proc.name in names(pid) and (found := target(pid)) is not None:
            matches.append(found)
    if not matches:
        raise ActionFailed(step, f"process {key!r}: no process named {proc.name!r} is running")
    if len(matches) > 1 and not proc.all:
        pids = ", ".join(str(t.pid) for t in matches)
        raise ActionFailed(
            step,
            f"process {key!r}: {len(matches)} processes are named {proc.name!r} ({pids}); set all = true",
        )
    return matches


def send(targets: list[Target], sig: signal.Signals) -> list[Target]:
    """Signal each target that is still the same process; returns those signalled."""
    sent = []
    for t in targets:
        try:
            if alive(t) and procs.send_signal(t.pid, sig):
                sent.append(t)
        except PermissionError as e:
            raise ActionFailed("execute_action", f"not allowed to send {sig.name} to pid {t.pid}: {e}") from e
    return sent


# --- the actions ----------------------------------------------------------------------------------------


def _check_process(name: str, config: ChaosConfig) -> None:
    allowed_name(name, config.processes, "process", "process", PACK)


class KillProcess(Action):
    """`chaos:kill-process`: send `signal` (KILL by default) to the named process; post_check: it is
    gone within the process's `kill_timeout`."""

    name = "chaos:kill-process"
    version = "1.0"
    Args = KillArgs
    Config = ChaosConfig
    timeout = 600.0

    def __init__(self) -> None:
        self.killed: list[Target] = []

    @classmethod
    def check_args(cls, args: KillArgs, config: ChaosConfig) -> None:
        _check_process(args.process, config)

    async def pre_check(self, ctx: ActionContext) -> None:
        """The process runs (exactly one, unless the config says `all`)."""
        conf = pack_config(ctx, ChaosConfig, "pre_check")
        args: KillArgs = ctx.args
        find(args.process, conf.processes[args.process], "pre_check")

    async def execute_action(self, ctx: ActionContext) -> None:
        conf = pack_config(ctx, ChaosConfig, "execute_action")
        args: KillArgs = ctx.args
        targets = find(args.process, conf.processes[args.process], "execute_action")
        ctx.checkpoint()
        self.killed = send(targets, signal.Signals[f"SIG{args.signal}"])
        log.warning(
            "chaos: SIG%s to %s pids %s on %s",
            args.signal,
            args.process,
            [t.pid for t in self.killed],
            ctx.node,
        )

    async def post_check(self, ctx: ActionContext) -> None:
        conf = pack_config(ctx, ChaosConfig, "post_check")
        args: KillArgs = ctx.args
        within = conf.processes[args.process].kill_timeout
        deadline = time.monotonic() + within
        while True:  # not our child: there is no exit to wait on, so poll /proc
            left = [t for t in self.killed if alive(t)]
            if not left or time.monotonic() >= deadline:
                break
            await asyncio.sleep(POLL)
        if left:
            pids = ", ".join(str(t.pid) for t in left)
            raise ActionFailed(
                "post_check",
                f"process {args.process!r} (pid {pids}) still runs {within:g}s after SIG{args.signal}",
            )


class PauseProcess(Action):
    """`chaos:pause-process`: SIGSTOP the named process for `seconds` (at most the node's
    `max_pause`), then SIGCONT; post_check: it runs again."""

    name = "chaos:pause-process"
    version = "1.0"
    Args = PauseArgs
    Config = ChaosConfig
    timeout = 3700.0  # max_pause is at most an hour

    def __init__(self) -> None:
        self.paused: list[Target] = []

    @classmethod
    def check_args(cls, args: PauseArgs, config: ChaosConfig) -> None:
        _check_process(args.process, config)
        if args.seconds > config.max_pause:
            raise InvalidTask(
                f"{args.seconds:g}s is longer than this node allows "
                f"([packs.{PACK}] max_pause = {config.max_pause:g})",
                field="taskerman_params.action_args.seconds",
            )

    async def pre_check(self, ctx: ActionContext) -> None:
        """The process runs and is not paused already."""
        conf = pack_config(ctx, ChaosConfig, "pre_check")
        args: PauseArgs = ctx.args
        for t in find(args.process, conf.processes[args.process], "pre_check"):
            if state(t) in procs.STOPPED_STATES:
                raise ActionFailed("pre_check", f"process {args.process!r} (pid {t.pid}) is already stopped")

    async def execute_action(self, ctx: ActionContext) -> None:
        """SIGSTOP, hold for `seconds` (checkpointing), SIGCONT in any case."""
        conf = pack_config(ctx, ChaosConfig, "execute_action")
        args: PauseArgs = ctx.args
        targets = find(args.process, conf.processes[args.process], "execute_action")
        ctx.checkpoint()
        for t in targets:
            await _watchdog(t, args.seconds + WATCHDOG_MARGIN)
        began = time.monotonic()
        try:
            self.paused = send(targets, signal.SIGSTOP)
            log.warning(
                "chaos: paused %s pids %s for %gs", args.process, [t.pid for t in self.paused], args.seconds
            )
            while (left := began + args.seconds - time.monotonic()) > 0:
                if ctx.cancelled.is_set():
                    raise ActionFailed(
                        "execute_action", f"cancelled {time.monotonic() - began:.1f}s into the pause"
                    )
                await asyncio.sleep(min(left, POLL))
                ctx.checkpoint()
        finally:
            resumed = send(self.paused, signal.SIGCONT)  # synchronous: a cancellation cannot skip it
            log.warning("chaos: resumed %s pids %s", args.process, [t.pid for t in resumed])

    async def post_check(self, ctx: ActionContext) -> None:
        """Every paused process is still there and running again."""
        args: PauseArgs = ctx.args
        for t in self.paused:
            st = state(t)
            if st is None or st in procs.DEAD_STATES:
                raise ActionFailed("post_check", f"process {args.process!r} (pid {t.pid}) died while paused")
            if st in procs.STOPPED_STATES:
                raise ActionFailed("post_check", f"process {args.process!r} (pid {t.pid}) is still stopped")


async def _watchdog(t: Target, after: float) -> None:
    """A detached `sleep; kill -CONT` that resumes the process even if this runner dies while it is
    paused (a SIGCONT to a process that runs is harmless). The shell forks it and exits at once."""
    script = 'p=$1; s=$2; (sleep "$s"; kill -CONT "$p") </dev/null >/dev/null 2>&1 &'
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        script,
        "sh",
        str(t.pid),
        f"{after:.1f}",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    await asyncio.shield(proc.wait())
