"""A dead letter is bounded: a long payload is kept truncated with its size and digest, a long
reason is cut, and the encoded letter always fits in a NATS message."""

from __future__ import annotations

import hashlib
import os

import msgspec
import pytest

from taskcore.bus import deadletter
from taskcore.core.model import DeadLetter

NATS_MAX_PAYLOAD = 1024 * 1024


def _letter(data: bytes, reason: str = "undecodable") -> DeadLetter:
    return deadletter.letter(
        data=data, subject="tasks.global", deliveries=1, reason=reason, task_id="t1", cluster="c1"
    )


def test_a_small_payload_is_kept_whole() -> None:
    letter = _letter(b'{"action": "test:sleep"}')
    assert letter.payload == '{"action": "test:sleep"}'
    assert not letter.payload_truncated
    assert letter.payload_size is None
    assert letter.payload_sha256 is None
    assert (letter.task_id, letter.cluster, letter.node) == ("t1", "c1", "")
    assert letter.source_subject == "tasks.global"
    assert letter.deliveries == 1


def test_a_payload_at_the_bound_is_kept_whole() -> None:
    letter = _letter(b"x" * deadletter.PAYLOAD_LIMIT)
    assert not letter.payload_truncated
    assert len(letter.payload) == deadletter.PAYLOAD_LIMIT


@pytest.mark.parametrize(
    "data",
    [os.urandom(600_000), b"\x01" * 900_000, "é".encode() * 400_000],
    ids=["random", "control-bytes", "multibyte"],
)
def test_a_large_payload_is_truncated_with_its_size_and_digest(data: bytes) -> None:
    letter = _letter(data, reason="r" * 100_000)
    assert letter.payload_truncated
    assert letter.payload_size == len(data)
    assert letter.payload_sha256 == hashlib.sha256(data).hexdigest()
    assert letter.payload == data[: deadletter.PAYLOAD_LIMIT].decode(errors="replace")
    assert len(letter.reason) == deadletter.REASON_LIMIT
    assert letter.reason.endswith(deadletter.CUT)
    assert len(msgspec.json.encode(letter)) < NATS_MAX_PAYLOAD


def test_a_short_reason_is_kept() -> None:
    assert _letter(b"{}", reason="r" * deadletter.REASON_LIMIT).reason == "r" * deadletter.REASON_LIMIT


def test_a_letter_written_before_the_bound_still_decodes() -> None:
    old = (
        b'{"task_id": "t1", "cluster": "c1", "node": "n1", "reason": "x", "deliveries": 3, '
        b'"payload": "{}", "dead_at": 1.0}'
    )
    letter = msgspec.json.decode(old, type=DeadLetter)
    assert not letter.payload_truncated
    assert letter.payload_size is None
    assert letter.payload_sha256 is None


def test_the_refusal_names_the_letter_its_size_and_digest() -> None:
    letter = _letter(b"y" * 100_000)
    e = deadletter.TruncatedPayload(7, letter)
    assert (e.seq, e.size, e.sha256) == (7, 100_000, letter.payload_sha256)
    assert "dead letter 7" in str(e)
    assert "100000" in str(e)
    assert "truncated" in str(e)
