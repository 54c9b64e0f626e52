"""Process utilities against real child processes: state, liveness, start ticks, signals, stopping."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskcore.runtime import procs


def _spawn(argv: list[str], name: str) -> subprocess.Popen[bytes]:
    """Start `argv` and wait until it has exec'd (until then the child is a copy of this interpreter)."""
    proc = subprocess.Popen(argv)
    deadline = time.monotonic() + 5
    while procs.comm(proc.pid) != name and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = _spawn(["sleep", "60"], "sleep")
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _wait_state(pid: int, wanted: set[str], within: float = 5.0) -> str | None:
    deadline = time.monotonic() + within
    while (st := procs.state(pid)) not in wanted and time.monotonic() < deadline:
        time.sleep(0.01)
    return st


def test_stat_of_a_running_child(sleeper: subprocess.Popen[bytes]) -> None:
    found = procs.stat(sleeper.pid)
    assert found is not None
    assert found.state in ("R", "S", "D")  # running, sleeping, or in a disk wait (a busy CI disk)
    assert found.start_ticks == procs.start_ticks(sleeper.pid) > 0
    assert procs.alive(sleeper.pid)
    assert procs.alive(sleeper.pid, found.start_ticks)
    assert procs.cmdline(sleeper.pid) == ["sleep", "60"]
    assert procs.comm(sleeper.pid) == "sleep"
    assert sleeper.pid in procs.pids()


def test_a_name_with_parentheses_and_spaces_does_not_shift_the_fields(tmp_path: Path) -> None:
    odd = tmp_path / "a) b (c"
    odd.symlink_to(shutil.which("sleep") or "/bin/sleep")
    proc = _spawn([str(odd), "60"], "a) b (c")
    try:
        assert procs.comm(proc.pid) == "a) b (c"
        found = procs.stat(proc.pid)
        assert found is not None
        assert found.state in ("R", "S")
        assert found.start_ticks == procs.start_ticks(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_a_stopped_process_is_alive_and_stopped(sleeper: subprocess.Popen[bytes]) -> None:
    assert procs.send_signal(sleeper.pid, signal.SIGSTOP)
    assert _wait_state(sleeper.pid, set(procs.STOPPED_STATES)) in procs.STOPPED_STATES
    assert procs.alive(sleeper.pid)
    assert procs.send_signal(sleeper.pid, signal.SIGCONT)
    assert _wait_state(sleeper.pid, {"R", "S"}) in ("R", "S")


def test_a_killed_child_is_dead_and_reaped() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    started = procs.start_ticks(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    assert _wait_state(proc.pid, set(procs.DEAD_STATES)) == "Z"  # a zombie until reaped
    assert not procs.alive(proc.pid, reap=False)  # dead, but left for its Popen to reap
    assert procs.state(proc.pid) == "Z"
    assert not procs.alive(proc.pid)  # reaps it
    assert procs.stat(proc.pid) is None
    assert procs.state(proc.pid, started) is None
    assert not procs.alive(proc.pid, started)
    assert not procs.send_signal(proc.pid, signal.SIGTERM)  # gone: ignored


def test_start_ticks_tell_a_pid_from_a_later_process(sleeper: subprocess.Popen[bytes]) -> None:
    started = procs.start_ticks(sleeper.pid)
    assert started is not None
    reused = started - 1  # what a record made for an earlier process of the same pid would hold
    assert not procs.alive(sleeper.pid, reused)
    assert procs.state(sleeper.pid, reused) is None
    assert procs.state(sleeper.pid, started) in ("R", "S")


def test_no_such_pid() -> None:
    assert not procs.alive(0)
    assert not procs.alive(-1)
    assert procs.stat(2**22 + 1) is None  # above pid_max's ceiling
    assert not procs.alive(2**22 + 1)
    assert procs.cmdline(2**22 + 1) is None


def test_terminate_stops_running_paused_and_stubborn_processes() -> None:
    running = subprocess.Popen(["sleep", "60"])
    paused = subprocess.Popen(["sleep", "60"])
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert stubborn.stdout is not None
    assert stubborn.stdout.readline() == b"ready\n"
    os.kill(paused.pid, signal.SIGSTOP)
    began = time.monotonic()
    killed = procs.terminate([running, paused, stubborn.pid], timeout=1.0)
    assert killed == [stubborn.pid]
    assert time.monotonic() - began < 5
    assert running.returncode == -signal.SIGTERM  # a Popen keeps its exit status
    assert paused.returncode == -signal.SIGTERM
    assert not procs.alive(stubborn.pid)
    stubborn.wait()


def test_terminate_ignores_processes_already_gone() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert procs.terminate([proc, proc.pid], timeout=1.0) == []
