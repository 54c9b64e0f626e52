"""`make demo`: start the local stack, run a rolling restart of the demo fleet with live progress, stop.

A stack that is already running is reused and left running."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from taskcore.core.settings import Settings
from taskerman_dev import devstack

log = logging.getLogger(__name__)

DEFAULT_HOME = ".taskerman"
RUNNERS = 4
LIMIT = 2


def submit_command() -> list[str]:
    """The rolling restart: `demo:restart` on every node of the demo cluster, two at a time, waiting."""
    taskerman = Path(sys.executable).parent / "taskerman"
    return [
        str(taskerman),
        "submit",
        "demo:restart",
        "--cluster",
        devstack.CLUSTER,
        "--limit",
        str(LIMIT),
        "--wait",
    ]


def main() -> int:
    """Run the demo; exit with the submit's exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    os.environ.setdefault("TASKERMAN_HOME", DEFAULT_HOME)
    settings = Settings.from_env()
    stack = devstack.load_stack(settings)
    procs = stack.processes if stack is not None else []
    alive = sum(devstack.is_alive(p) for p in procs)
    if 0 < alive < len(procs):
        print(
            f"a stack under {settings.home.resolve()} is only partly running ({alive} of {len(procs)} "
            "processes): see `taskerman dev status`, or stop it with `taskerman dev down`",
            file=sys.stderr,
        )
        return 1
    reuse = alive > 0
    if reuse:
        print(f"== reusing the stack already running under {settings.home.resolve()} (left running)")
    else:
        print(f"== taskerman dev up --runners {RUNNERS}", flush=True)
        code = devstack.up(settings, runners=RUNNERS)
        if code != 0:
            return code
    try:
        command = submit_command()
        print(f"== taskerman {' '.join(command[1:])}", flush=True)
        env = {**os.environ, **settings.env()}
        try:
            code = subprocess.call(command, env=env)
        except KeyboardInterrupt:
            code = 130
        print(f"== rolling restart {'succeeded' if code == 0 else f'failed (exit {code})'}", flush=True)
    finally:
        if not reuse:
            print("== taskerman dev down", flush=True)
            devstack.down(settings)
    return code


if __name__ == "__main__":
    sys.exit(main())
