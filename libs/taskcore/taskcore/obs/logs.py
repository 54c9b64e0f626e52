"""Structured logs: one line per event, carrying the current task id, node and trace id. JSON when
stderr is not a terminal (or TASKERMAN_LOG_FORMAT=json), readable text otherwise."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Iterator

from taskcore.obs import tracing

_task_id: contextvars.ContextVar[str] = contextvars.ContextVar("task_id", default="")
_node: contextvars.ContextVar[str] = contextvars.ContextVar("node", default="")


@contextlib.contextmanager
def task_context(task_id: str, node: str = "") -> Iterator[None]:
    """Log lines inside carry this task id and node."""
    t1, t2 = _task_id.set(task_id), _node.set(node)
    try:
        yield
    finally:
        _task_id.reset(t1)
        _node.reset(t2)


class ContextFilter(logging.Filter):
    """Stamps every record with the current task id, node and trace id."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.task_id = _task_id.get()
        record.node = _node.get()
        record.trace_id = tracing.current_trace_id()
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "service": self.service,
            "pid": record.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("task_id", "node", "trace_id"):
            if value := getattr(record, key, ""):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {service}[%(process)d] %(name)s: %(message)s")
        self.converter = time.localtime

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(f"{k}={v}" for k in ("task_id", "node", "trace_id") if (v := getattr(record, k, "")))
        return f"{line} [{ids}]" if ids else line


def configure(service: str) -> None:
    """Configure the root logger for a service process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    want_json = os.environ.get("TASKERMAN_LOG_FORMAT", "").lower() == "json" or not sys.stderr.isatty()
    if os.environ.get("TASKERMAN_LOG_FORMAT", "").lower() == "text":
        want_json = False
    handler.setFormatter(JsonFormatter(service) if want_json else TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("TASKERMAN_LOG_LEVEL", "INFO"))
    logging.getLogger("aiozk").setLevel(logging.WARNING)
