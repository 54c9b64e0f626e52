"""A short chaos run, as `make chaos` runs the long one: real processes on 3 NATS servers and 3
ZooKeeper servers, every fault kind injected, and the independent checker's verdict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from taskerman_dev.chaos.checker import Report
from taskerman_dev.chaos.nemesis import KINDS

DURATION = 20  # seconds: the nemesis then completes its round, one fault of every kind


@pytest.mark.timeout(480)  # ~80 s alone; a loaded machine starts six JVM and Go servers slowly
def test_a_short_chaos_run_loses_nothing_and_never_breaks_a_limit(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "taskerman_dev.chaos",
            "--duration",
            str(DURATION),
            "--every",
            "2",
            "--seed",
            "7",
            "--home",
            str(tmp_path / "run"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=450,
        check=False,
    )
    tail = done.stdout[-3000:] + done.stderr[-3000:]
    assert out.exists(), tail
    report = msgspec.json.decode(out.read_bytes(), type=Report)
    assert report.lost == [], tail
    assert report.duplicates == [], tail
    assert report.over_limit == [], tail
    assert report.token_regressions == [], tail
    assert set(report.faults) == set(KINDS), report.faults
    assert report.tasks >= 15
    assert report.outcomes.get("succeeded", 0) > 0
    assert done.returncode == 0, tail
