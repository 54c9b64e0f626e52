"""Structured log lines carry the task id, node and trace id."""

from __future__ import annotations

import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from taskcore.obs import logs


def _record(msg: str) -> logging.LogRecord:
    record = logging.LogRecord("taskerman_runner.worker", logging.WARNING, __file__, 1, msg, (), None)
    assert logs.ContextFilter().filter(record)
    return record


def test_json_lines_carry_task_node_and_trace() -> None:
    tracer = TracerProvider().get_tracer(__name__)
    with logs.task_context("t-1", "node a.b"), tracer.start_as_current_span("run") as span:
        line = logs.JsonFormatter("taskerman-runner").format(_record("failed attempt=1"))
        trace_id = format(span.get_span_context().trace_id, "032x")
    out = json.loads(line)
    assert out["msg"] == "failed attempt=1"
    assert out["task_id"] == "t-1"
    assert out["node"] == "node a.b"
    assert out["trace_id"] == trace_id
    assert out["service"] == "taskerman-runner"
    assert out["level"] == "WARNING"


def test_outside_a_task_no_ids_are_invented() -> None:
    out = json.loads(logs.JsonFormatter("taskerman-router").format(_record("started")))
    assert "task_id" not in out
    assert "trace_id" not in out
    text = logs.TextFormatter("taskerman-router").format(_record("started"))
    assert text.endswith("started")


def test_text_lines_show_the_ids() -> None:
    with logs.task_context("t-2", "n1"):
        text = logs.TextFormatter("taskerman-runner").format(_record("succeeded"))
    assert "task_id=t-2" in text
    assert "node=n1" in text
