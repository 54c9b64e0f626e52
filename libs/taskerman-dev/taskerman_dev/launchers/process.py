"""One server process: started in its own session, ready when its probe passes, stopped by
SIGTERM then SIGKILL; killed, paused and resumed by chaos tests."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from taskcore.core.errors import ServerNotReady
from taskcore.runtime import procs
from taskerman_dev.launchers.ports import connect_host, free_port


class Managed:
    """A context manager: start and wait until ready on enter (stopping again if that fails), stop on exit."""

    def start(self) -> None:
        raise NotImplementedError

    def wait_ready(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class ServerProcess(Managed):
    """A server process started in its own session, logging to a file under its home."""

    name = "server"

    def __init__(self, home: Path, port: int | None, host: str) -> None:
        self.home = Path(home).resolve()
        self.host = host
        self.port = port if port is not None else free_port(connect_host(host))
        self.log_path = self.home / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def _command(self) -> list[str]:
        """Write config files and return the argv that starts the server."""
        raise NotImplementedError

    def _probe(self) -> bool:
        """Return whether the server answers its readiness check."""
        raise NotImplementedError

    @property
    def pid(self) -> int:
        """Process id of the running server."""
        if self._proc is None:
            raise ServerNotReady(f"{self.name} was never started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the process has been started and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Spawn the server process; returns without waiting for readiness."""
        if self.running:
            return
        self._close_log()
        self.home.mkdir(parents=True, exist_ok=True)
        argv = self._command()
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.home,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Poll the readiness check until it passes; raise ServerNotReady with the log tail if not."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise ServerNotReady(f"{self.name} exited (code {code}) before ready\n{self.log_tail()}")
            if self._probe():
                return
            if time.monotonic() > deadline:
                raise ServerNotReady(f"{self.name} not ready after {timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after `timeout`) and reap it."""
        if self._proc is not None:
            procs.terminate([self._proc], timeout)
        self._close_log()

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would, and reap it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close_log()

    def restart(self, timeout: float = 30.0) -> None:
        """Start the server again (same ports, same data) after a kill or stop, and wait until ready."""
        self.start()
        self.wait_ready(timeout)

    def pause(self) -> None:
        """Freeze the server with SIGSTOP."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a paused server with SIGCONT."""
        self._signal(signal.SIGCONT)

    def log_tail(self, lines: int = 40) -> str:
        """Return the last lines of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _signal(self, sig: signal.Signals) -> None:
        """Send a signal to the running server."""
        if not self.running:
            raise ServerNotReady(f"{self.name} is not running")
        procs.send_signal(self.pid, sig)

    def _close_log(self) -> None:
        """Close the log file handle held for the child."""
        if self._log is not None:
            self._log.close()
            self._log = None
