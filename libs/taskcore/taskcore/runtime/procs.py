"""Processes by pid, as /proc shows them: state, liveness, start time, signals, and stopping a group.

A pid names a process only while it runs: once it exits the number can be handed to a later one.
The start time (`start_ticks`, clock ticks since boot) tells the two apart, so whoever records a pid
records its start ticks too and passes them as `started`. Without /proc (not Linux) a process that
answers signal 0 counts as alive and nothing can be told about its state or start."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

POLL = 0.05
KILL_WAIT = 5.0  # how long to wait for processes to go after SIGKILL
DEAD_STATES = frozenset("ZX")  # zombie, dead: exited, only not reaped yet
STOPPED_STATES = frozenset("Tt")  # stopped by a signal, or by a tracer

Proc = int | subprocess.Popen[Any]  # a pid, or a child we started (which Popen reaps)


class ProcStat(NamedTuple):
    """What /proc/PID/stat says about a process."""

    state: str  # R running, S sleeping, T stopped, Z zombie ...
    start_ticks: int  # when it started, in clock ticks since boot


def pids() -> list[int]:
    """The pids of every process /proc shows."""
    try:
        return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    except OSError:
        return []


def stat(pid: int) -> ProcStat | None:
    """The process's state and start ticks from /proc/PID/stat, or None when it is not there."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # the command name, in parentheses, may hold anything
    if len(fields) < 20 or not fields[19].isdigit():
        return None
    return ProcStat(state=fields[0], start_ticks=int(fields[19]))


def comm(pid: int) -> str | None:
    """The process's command name (/proc/PID/comm: at most 15 characters), or None."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().rstrip("\n")
    except OSError:
        return None


def cmdline(pid: int) -> list[str] | None:
    """The process's argv (/proc/PID/cmdline; empty for a zombie), or None when /proc does not tell."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks since boot; tells a pid from a later reuse of it."""
    found = stat(pid)
    return found.start_ticks if found is not None else None


def state(pid: int, started: int | None = None) -> str | None:
    """The process's state letter, or None when it is gone (or, given `started`, its pid is reused)."""
    found = stat(pid)
    if found is None or (started is not None and found.start_ticks != started):
        return None
    return found.state


def alive(pid: int, started: int | None = None, *, reap: bool = True) -> bool:
    """Whether the process runs: our own exited child is reaped first (unless not `reap`: whoever
    started it may want its exit status), a zombie counts as dead, and given `started`, a later
    process that reuses the pid is not it."""
    if pid <= 0:
        return False
    try:
        done, _ = os.waitpid(pid, os.WNOHANG) if reap else (0, 0)
        if done:
            return False
    except ChildProcessError:
        pass  # not our child
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's: it exists
    found = stat(pid)
    if started is not None:
        return found is not None and found.start_ticks == started and found.state not in DEAD_STATES
    return found is None or found.state not in DEAD_STATES


def send_signal(pid: int, sig: signal.Signals) -> bool:
    """Send a signal; False when the process is already gone. A PermissionError is raised."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def terminate(procs: Iterable[Proc], timeout: float = 10.0) -> list[int]:
    """Stop a group of processes: SIGCONT (a paused process must run to see SIGTERM) and SIGTERM to
    each, wait up to `timeout` for all of them to exit, SIGKILL the rest and wait for those too.

    Our children are reaped (a Popen keeps its exit status). Returns the pids that had to be killed."""
    live = [p for p in procs if _running(p)]
    for p in live:
        _send(p, signal.SIGCONT)
        _send(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while (live := [p for p in live if _running(p)]) and time.monotonic() < deadline:
        time.sleep(POLL)
    for p in live:
        log.warning("pid %d (%s) ignored SIGTERM for %.1fs: killing it", _pid(p), _name(p), timeout)
        _send(p, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT
    while any(_running(p) for p in live) and time.monotonic() < deadline:
        time.sleep(POLL)
    return [_pid(p) for p in live]


def _pid(p: Proc) -> int:
    return p if isinstance(p, int) else p.pid


def _name(p: Proc) -> str:
    """The process' command line, short, for a log line (empty once it is gone)."""
    try:
        raw = Path(f"/proc/{_pid(p)}/cmdline").read_bytes()
    except OSError:
        return ""
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)[:120]


def _running(p: Proc) -> bool:
    return alive(p) if isinstance(p, int) else p.poll() is None


def _send(p: Proc, sig: signal.Signals) -> None:
    """Signal a process, ignoring one that is gone (Popen never signals a child it has reaped)."""
    if isinstance(p, int):
        send_signal(p, sig)
    else:
        p.send_signal(sig)
