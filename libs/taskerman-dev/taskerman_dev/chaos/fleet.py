"""The processes a chaos run breaks: routers, runners and a scheduler (console scripts, each in a
session of its own) beside a 3-member NATS cluster and a 3-member ZooKeeper ensemble."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from taskcore.runtime import procs

BIN = Path(sys.executable).parent


class Service:
    """One service process that can be killed -9, paused and continued, and started again."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(BIN / self.argv[0]), *self.argv[1:]],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.paused = False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def pause(self) -> None:
        if self.running and self.proc is not None:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.paused and self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.paused = False


def stop_all(services: list[Service]) -> None:
    """Stop every service at once (SIGCONT, SIGTERM, SIGKILL after 15 s): one that hangs on its way
    out costs the run 15 s, not 15 s each."""
    procs.terminate([s.proc for s in services if s.proc is not None], timeout=15)
    for s in services:
        s.paused = False
