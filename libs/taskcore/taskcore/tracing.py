"""W3C trace context carried in NATS headers on every hop."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider


def setup(service_name: str) -> None:
    """Install an SDK tracer provider so spans get real ids (exporters come with observability)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider(resource=Resource.create({"service.name": service_name})))


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


def current_trace_id() -> str:
    """The current trace id as 32 hex digits, or "" outside a trace."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
