"""Observability: structured logs, W3C tracing carried in NATS headers, and OpenTelemetry metrics."""

__all__ = ["logs", "metrics", "tracing"]
