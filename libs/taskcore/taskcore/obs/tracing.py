"""Tracing: W3C trace context carried in NATS headers on every hop, and span export — OTLP when the
standard `OTEL_EXPORTER_OTLP_*` variables are set, otherwise a local JSON-lines file under the
stack's home that `taskerman trace` renders, so debugging needs nothing else running."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import msgspec
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

log = logging.getLogger(__name__)
SPAN_FILE = "traces/spans.jsonl"
OTLP_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


class SpanRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One finished span as stored in the local span file."""

    trace_id: str
    span_id: str
    parent_id: str = ""
    name: str
    service: str
    start: float
    end: float
    status: str = "UNSET"
    attributes: dict[str, str | int | float | bool] = {}
    links: list[str] = []  # trace ids this span links to (a replay links to the original trace)


class JsonLinesExporter(SpanExporter):
    """Appends finished spans to a JSON-lines file, one `write` per line so that processes sharing
    the file never interleave within a line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = b"".join(msgspec.json.encode(to_record(s)) + b"\n" for s in spans)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, lines)
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release: every export opens and closes the file."""


def to_record(span: ReadableSpan) -> SpanRecord:
    ctx = span.get_span_context()
    attrs = {k: v for k, v in (span.attributes or {}).items() if isinstance(v, str | int | float | bool)}
    return SpanRecord(
        trace_id=format(ctx.trace_id, "032x") if ctx else "",
        span_id=format(ctx.span_id, "016x") if ctx else "",
        parent_id=format(span.parent.span_id, "016x") if span.parent else "",
        name=span.name,
        service=str(span.resource.attributes.get("service.name", "")),
        start=(span.start_time or 0) / 1e9,
        end=(span.end_time or 0) / 1e9,
        status=span.status.status_code.name,
        attributes=attrs,
        links=[format(link.context.trace_id, "032x") for link in span.links],
    )


def _exporter(home: Path | None) -> SpanExporter | None:
    if any(os.environ.get(v) for v in OTLP_VARS):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
                OTLPSpanExporter,
            )
        except ImportError:
            log.warning("OTEL_EXPORTER_OTLP_* is set but the OTLP exporter is not installed")
            return None
        return OTLPSpanExporter()
    if home is None:
        return None
    return JsonLinesExporter(home / SPAN_FILE)


def setup(service_name: str, home: Path | None = None) -> None:
    """Install the tracer provider once per process, exporting as the environment says."""
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    exporter = _exporter(home)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)


def shutdown() -> None:
    """Flush spans still buffered (call before a process exits)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


def read_spans(home: Path) -> list[SpanRecord]:
    """Every span in the local span file (a torn last line is skipped)."""
    path = home / SPAN_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        try:
            out.append(msgspec.json.decode(line, type=SpanRecord))
        except msgspec.DecodeError:
            continue
    return out


def tracer(name: str) -> trace.Tracer:
    """A tracer for one module."""
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers with the current context's `traceparent` (and `tracestate`) added."""
    out = dict(headers or {})
    inject(out)
    return out


def extract_context(headers: dict[str, str] | None) -> Context:
    """The remote context carried by a message's headers (empty when there is none)."""
    return extract(headers or {})


def current_span_id() -> str:
    """The current span id as 16 hex digits, or "" outside a trace."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.span_id, "016x") if ctx.is_valid else ""


def link_to(trace_id: str, span_id: str) -> list[trace.Link]:
    """A link to a span of another trace (e.g. from a replay to the original), if both ids parse."""
    try:
        ctx = trace.SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True)
    except ValueError:
        return []
    return [trace.Link(ctx)] if ctx.is_valid else []


def current_trace_id() -> str:
    """The current trace id as 32 hex digits, or "" outside a trace."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
