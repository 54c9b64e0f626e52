"""The short version of `make bench`: the benchmark runs end to end on real servers and reports
every figure. Its timings are not judged here (the machine is shared); what it measured about
safety is: no more nodes acted at once than the limit allowed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scale.py"


def test_quick_benchmark_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    assert figures["runner_memory"]["mb_per_node"] > 0
    assert [row["waiters"] for row in figures["zookeeper"]] == [10, 50]
    assert all(row["requests_per_hand_off"] > 0 for row in figures["zookeeper"])
    assert figures["dispatch"]["tasks"] == 20
    assert figures["dispatch"]["raw_relay_p50_ms"] > 0
    assert figures["fan_out"] == {**figures["fan_out"], "nodes": 500, "recorded_nodes": 500}
    rows = figures["makespan"]
    assert len(rows) == 2
    for row in rows:
        assert 0 < row["peak_acting"] <= row["m"], row
        assert row["makespan_s"] >= row["ideal_s"] * 0.95, row  # nobody beats the ideal
    assert "makespan_over_ideal" in done.stdout
