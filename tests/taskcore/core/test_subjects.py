"""Names encode into subject tokens reversibly and without collisions; subjects and durables parse back."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from taskcore.core import subjects
from taskcore.core.errors import InvalidName
from taskcore.core.subjects import (
    decode_token,
    encode_token,
    node_subject,
    parse_node_subject,
    runner_durable,
)

SAFE_TOKEN = re.compile(r"[A-Za-z0-9_=-]+")

TRICKY = [
    "a",
    "A",
    "node-1",
    "node_1",
    "a.b",
    "a..b",
    ".",
    "cassandra:geo_counter",
    "host:9042",
    "a b",
    " ",
    "  lead and trail  ",
    "tab\there",
    "new\nline",
    "=",
    "==",
    "=3D",
    "=2E",
    "a=2Eb",
    "~",
    "runner~x",
    "*",
    ">",
    "tasks.cluster.*.>",
    "a/b\\c",
    "ñandú",
    "Größe",
    "日本語のノード",
    "🙂",
    "🏳️‍🌈 flag",
    "e\u0301",  # e + combining acute
    "\u00e9",  # precomposed é: a different name from the line above
    "\x00nul",
    "x" * 5000,
    "🙂" * 1000,
]


@pytest.mark.parametrize("name", TRICKY)
def test_round_trip(name: str) -> None:
    token = encode_token(name)
    assert decode_token(token) == name


@pytest.mark.parametrize("name", TRICKY)
def test_token_uses_only_safe_characters(name: str) -> None:
    token = encode_token(name)
    assert SAFE_TOKEN.fullmatch(token), token
    for forbidden in ".*> \t\n~:/\\":
        assert forbidden not in token


def test_known_encodings() -> None:
    assert encode_token("node-1_A") == "node-1_A"
    assert encode_token("a.b") == "a=2Eb"
    assert encode_token("x:y z") == "x=3Ay=20z"
    assert encode_token("=") == "=3D"
    assert encode_token("ñ") == "=C3=B1"
    assert encode_token("🙂") == "=F0=9F=99=82"


def test_tricky_names_never_collide() -> None:
    tokens = {name: encode_token(name) for name in TRICKY}
    assert len(set(tokens.values())) == len(TRICKY)
    for a, b in itertools.combinations(TRICKY, 2):
        assert tokens[a] != tokens[b], (a, b)


def test_random_names_round_trip_and_never_collide() -> None:
    alphabet = "aZ09_-=.:~*> \t/é日🙂\u0301"
    rng = random.Random(20240601)
    names = {"".join(rng.choices(alphabet, k=rng.randint(1, 12))) for _ in range(3000)}
    seen: dict[str, str] = {}
    for name in names:
        token = encode_token(name)
        assert SAFE_TOKEN.fullmatch(token), (name, token)
        assert decode_token(token) == name
        assert token not in seen, (name, seen.get(token))
        seen[token] = name
    assert len(seen) == len(names)


def test_long_name_round_trips() -> None:
    name = "cluster:" + "ü.🙂 " * 3000
    token = encode_token(name)
    assert decode_token(token) == name
    assert "." not in token


def test_empty_name_is_invalid() -> None:
    with pytest.raises(InvalidName, match="empty"):
        encode_token("")


@pytest.mark.parametrize(
    "token",
    [
        "",  # empty
        "a.b",  # a dot splits subjects
        "a b",  # whitespace
        "a~b",  # not in the token alphabet
        "*",
        ">",
        "=",  # dangling escape
        "=4",  # short escape
        "ab=",
        "=zz",  # not hex
        "=3d",  # lower-case hex is never produced
        "=C3",  # an incomplete UTF-8 sequence
        "=FF",  # never valid UTF-8
        "=F0=9F=99",  # a truncated emoji
    ],
)
def test_malformed_tokens_are_invalid(token: str) -> None:
    with pytest.raises(InvalidName, match="token"):
        decode_token(token)


@pytest.mark.parametrize(
    ("cluster", "node"),
    [
        ("demo:web", "node-1"),
        ("cassandra:geo_counter", "10.0.0.1:9042"),
        ("a.b.c", "d.e"),
        ("spaces in cluster", "ünïcödé 🙂"),
        ("*", ">"),
        ("=", "~"),
    ],
)
def test_node_subject_round_trip(cluster: str, node: str) -> None:
    subject = node_subject(cluster, node)
    assert subject.startswith(f"{subjects.CLUSTER_PREFIX}.")
    assert subject.count(".") == 3
    assert not re.search(r"[\s*>]", subject)
    assert parse_node_subject(subject) == (cluster, node)


def test_node_subject_shape() -> None:
    assert node_subject("demo:web", "node-1") == "tasks.cluster.demo=3Aweb.node-1"
    assert subjects.dead_subject("demo:web", "node 1") == "tasks.dead.demo=3Aweb.node=201"


def test_node_subjects_do_not_collide_when_dots_move() -> None:
    assert node_subject("a.b", "c") != node_subject("a", "b.c")
    assert parse_node_subject(node_subject("a.b", "c")) == ("a.b", "c")
    assert parse_node_subject(node_subject("a", "b.c")) == ("a", "b.c")


def test_node_subject_rejects_empty_names() -> None:
    with pytest.raises(InvalidName):
        node_subject("", "n")
    with pytest.raises(InvalidName):
        node_subject("c", "")


@pytest.mark.parametrize(
    "subject",
    [
        "tasks.global",
        "tasks.cluster.c",
        "tasks.cluster.c.n.extra",
        "tasks.dead.c.n",
        "other.cluster.c.n",
        "tasks.cluster.c.a b",
        "tasks.cluster.c.=G0",
        "tasks.cluster..n",
    ],
)
def test_parse_node_subject_rejects_other_subjects(subject: str) -> None:
    with pytest.raises(InvalidName):
        parse_node_subject(subject)


def test_runner_durable_keeps_underscore_splits_apart() -> None:
    assert runner_durable("a_b", "c") != runner_durable("a", "b_c")
    assert runner_durable("a~b", "c") != runner_durable("a", "b~c")
    assert runner_durable("a", "b") == runner_durable("a", "b")


def test_runner_durable_pairs_never_collide() -> None:
    names = ["a", "b", "a_b", "b_c", "c", "a~b", "b~c", "a.b", "a b", "runner", "~", "_"]
    durables = {(c, n): runner_durable(c, n) for c in names for n in names}
    assert len(set(durables.values())) == len(durables)


def test_runner_durable_is_a_valid_consumer_name() -> None:
    for cluster, node in [("demo:web", "node-1"), ("c.c", "n n"), ("*", ">"), ("🙂", "\t")]:
        durable = runner_durable(cluster, node)
        assert re.fullmatch(r"[A-Za-z0-9_=~-]+", durable), durable


def test_runner_durable_of_huge_names_is_bounded_and_distinct() -> None:
    huge = "c" * 10_000
    first = runner_durable(huge, "node-1")
    second = runner_durable(huge, "node-2")
    unicode_huge = runner_durable("🙂" * 5000, "ñ" * 5000)
    for durable in (first, second, unicode_huge):
        assert len(durable) <= 255
        assert durable.startswith("runner~")
        assert re.fullmatch(r"[A-Za-z0-9_=~-]+", durable), durable
    assert first != second
    assert first == runner_durable(huge, "node-1")


def test_work_msg_id() -> None:
    assert subjects.work_msg_id("abcd-ef123", "node-1") == "abcd-ef123:node-1"
