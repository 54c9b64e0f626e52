"""Pattern targets: which known clusters a schedule pattern matches."""

from __future__ import annotations

from taskerman_scheduler.targets import matching


def test_matching_clusters() -> None:
    known = ["cassandra:b", "cassandra:a", "Cassandra:X", "redis:a", "cassandra:a"]
    assert matching("cassandra:*", known) == ["cassandra:a", "cassandra:b"]
    assert matching("*:a", known) == ["cassandra:a", "redis:a"]
    assert matching("nothing", known) == []
