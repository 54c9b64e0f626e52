"""`taskerman dev down`: stop what the record names, workers first; SIGTERM, then SIGKILL."""

from __future__ import annotations

from pathlib import Path

from taskcore.core.settings import Settings
from taskcore.runtime import procs
from taskerman_dev import demo_fleet
from taskerman_dev.devstack.record import StackProcess, absolute, load_stack, recorded_alive, stack_path

STOP_TIMEOUT = 10.0
# The order `down` stops things in: workers first, so nothing acts on a fleet that is going away.
STOP_ORDER = (("runner",), ("router", "scheduler"), ("demo-service",), ("nats-server", "zookeeper"))


def _stop_rank(proc: StackProcess) -> int:
    """Position of the process in the stopping order (unknown names go with the router)."""
    return next((i for i, names in enumerate(STOP_ORDER) if proc.name in names), 1)


def _pids_of(proc: StackProcess) -> list[int]:
    """The live pids that belong to a recorded process (a demo service: its pidfile's and the original)."""
    pids = []
    if proc.state_dir is not None and (pid := demo_fleet.read_pid(Path(proc.state_dir))) is not None:
        pids.append(pid)
    if recorded_alive(proc) and proc.pid not in pids:
        pids.append(proc.pid)
    return pids


def down(settings: Settings) -> int:
    """Stop everything the recorded stack started, in order; SIGTERM, then SIGKILL after a deadline."""
    settings = absolute(settings)
    stack = load_stack(settings)
    if stack is None:
        print(f"no stack recorded under {settings.home}: nothing to stop")
        return 0
    stopped = killed = 0
    for rank in range(len(STOP_ORDER)):
        group = [p for p in stack.processes if _stop_rank(p) == rank]
        pids = [pid for p in group for pid in _pids_of(p)]
        if pids:
            killed += len(procs.terminate(pids, STOP_TIMEOUT))
            stopped += len(pids)
            print(f"  stopped {', '.join(sorted({p.name for p in group}))} ({len(pids)})", flush=True)
        for p in group:
            if p.state_dir is not None:
                demo_fleet.stop_service(Path(p.state_dir), timeout=1.0)  # clears a pidfile left by a kill
    stack_path(settings).unlink(missing_ok=True)
    if stopped:
        print(
            f"stack under {settings.home} stopped ({stopped} processes"
            + (f", {killed} killed)" if killed else ")")
        )
    else:
        print(f"nothing was running under {settings.home}; removed the stale record")
    return 0
