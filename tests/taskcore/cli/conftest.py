"""CLI tests against real processes use the end-to-end fixtures (see tests/scheduler/conftest.py)."""

from __future__ import annotations

from tests.scheduler.conftest import js, nats_fresh, settings, stack, status, zk

__all__ = ["js", "nats_fresh", "settings", "stack", "status", "zk"]
