"""`python -m taskerman_dev.chaos --duration 1200`: run, print the report, exit 0 when it passes."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import tempfile
from pathlib import Path

import msgspec

from taskerman_dev.chaos.checker import Report
from taskerman_dev.chaos.run import ChaosRun


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="taskerman_dev.chaos", description=__doc__)
    p.add_argument("--duration", type=float, default=1200.0, help="seconds of faults and workload")
    p.add_argument("--every", type=float, default=4.0, help="seconds between faults")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--home", type=Path, help="where servers, logs and the witness go (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    home = args.home or Path(tempfile.mkdtemp(prefix="taskerman-chaos-"))
    print(f"chaos run: {args.duration:g}s, a fault every {args.every:g}s, seed {args.seed}, home {home}")
    report = asyncio.run(_until_terminated(ChaosRun(home, args.duration, args.seed, args.every)))
    print("\n".join(report.lines()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(msgspec.json.encode(report))
    return 0 if report.ok else 1


async def _until_terminated(run: ChaosRun) -> Report:
    """The run; SIGTERM cancels it, so that it stops the processes and servers it started (each in
    a session of its own: they would outlive us)."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run.run()


if __name__ == "__main__":
    sys.exit(main())
