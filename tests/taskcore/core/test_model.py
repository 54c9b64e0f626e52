"""The task codec: the design's sample decodes; every bad input is one InvalidTask naming the field."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from taskcore.core.errors import InvalidTask
from taskcore.core.model import (
    MAX_RETRIES,
    Task,
    WorkItem,
    decode_task,
    decode_work_item,
    encode,
    parse_version,
    resolved,
    with_task_id,
)

# Verbatim from docs/architecture.md#wire-contract.
SAMPLE = """{"action": "cassandra_task:restart", "version": 1.2, "limit": 2,
 "cluster_name": "cassandra:geo_counter", "discovery": "aws_tags", "owner": "gsi", "task_id": "abcd-ef123",
 "taskerman_params": {"action_args": {"force": true}, "workqueue_args": {"retry_count": 3}},
 "nodes": [], "destnode": ""}"""


def _task_json(**fields: Any) -> bytes:
    raw: dict[str, Any] = {"action": "test:sleep", "cluster_name": "demo:web"}
    raw.update(fields)
    return json.dumps(raw).encode()


def test_design_sample_decodes() -> None:
    task = decode_task(SAMPLE)
    assert task.action == "cassandra_task:restart"
    assert task.version == 1.2
    assert task.limit == 2
    assert task.cluster_name == "cassandra:geo_counter"
    assert task.discovery == "aws_tags"
    assert task.owner == "gsi"
    assert task.task_id == "abcd-ef123"
    assert task.action_args == {"force": True}
    assert task.retry_count == 3
    assert task.nodes == ()
    assert task.destnode == ""
    assert parse_version(task.version) == (1, 2)


def test_design_sample_decodes_from_bytes_and_round_trips() -> None:
    task = decode_task(SAMPLE.encode())
    assert decode_task(encode(task)) == task


def test_minimal_task_gets_defaults() -> None:
    task = decode_task(_task_json())
    assert task.limit == 1
    assert task.version is None
    assert task.task_id == ""
    assert task.retry_count == 3
    assert task.action_args == {}
    assert task.nodes == ()


def test_unicode_names_decode() -> None:
    task = decode_task(_task_json(cluster_name="kafka:日本 🙂", nodes=["a.b:1", "ñ node"]))
    assert task.cluster_name == "kafka:日本 🙂"
    assert task.nodes == ("a.b:1", "ñ node")


@pytest.mark.parametrize(
    ("data", "field", "says"),
    [
        (b"\xff\xfe\x00garbage", None, "not valid JSON"),
        (b'{"action": "test:sleep", ', None, "not valid JSON"),
        (b"", None, "not valid JSON"),
        (b"[1, 2]", None, "Expected `object`"),
        (b'"a string"', None, "Expected `object`"),
        (b'{"cluster_name": "c"}', "action", "missing required field `action`"),
        (b'{"action": "test:sleep"}', "cluster_name", "missing required field `cluster_name`"),
        (_task_json(colour="red"), "colour", "unknown field `colour`"),
        (_task_json(taskerman_params={"sneaky": 1}), "taskerman_params.sneaky", "unknown field `sneaky`"),
        (
            _task_json(taskerman_params={"workqueue_args": {"retries": 2}}),
            "taskerman_params.workqueue_args.retries",
            "unknown field `retries`",
        ),
        (_task_json(limit="2"), "limit", "neither a whole number nor a percentage"),
        (_task_json(limit="150%"), "limit", "'150%': a percentage of the task's nodes must be 1%..100%"),
        (_task_json(limit="0%"), "limit", "must be 1%..100%"),
        (_task_json(limit="25 %"), "limit", "neither a whole number nor a percentage"),
        (
            _task_json(taskerman_params={"max_failures": "101%"}),
            "taskerman_params.max_failures",
            "must be 1%..100%",
        ),
        (_task_json(limit=1.5), "limit", "Expected `int"),
        (_task_json(limit=0), "limit", ">= 1"),
        (_task_json(limit=-3), "limit", ">= 1"),
        (_task_json(action="restart"), "action", "regex"),
        (_task_json(action="pack:"), "action", "regex"),
        (_task_json(action="rm -rf /:x"), "action", "regex"),
        (
            _task_json(taskerman_params={"workqueue_args": {"retry_count": MAX_RETRIES + 1}}),
            "taskerman_params.workqueue_args.retry_count",
            f"<= {MAX_RETRIES}",
        ),
        (
            _task_json(taskerman_params={"workqueue_args": {"retry_count": -1}}),
            "taskerman_params.workqueue_args.retry_count",
            ">= 0",
        ),
        (_task_json(cluster_name=""), "cluster_name", "length >= 1"),
        (_task_json(cluster_name="   "), "cluster_name", "must not be blank"),
        (_task_json(nodes=["n1", " \t"]), "nodes[1]", "must not be blank"),
        (_task_json(nodes=["n1", ""]), "nodes[1]", "length >= 1"),
        (_task_json(nodes="n1"), "nodes", "Expected `array`"),
        (_task_json(version="one.two"), "version", "expected MAJOR.MINOR"),
        (_task_json(version="1.2.3"), "version", "expected MAJOR.MINOR"),
        (_task_json(version=True), "version", "got `bool`"),
        (_task_json(task_id="has space"), "task_id", "regex"),
        (
            _task_json(taskerman_params={"action_args": []}),
            "taskerman_params.action_args",
            "Expected `object`",
        ),
    ],
)
def test_invalid_task_names_the_field(data: bytes, field: str | None, says: str) -> None:
    with pytest.raises(InvalidTask) as info:
        decode_task(data)
    err = info.value
    assert err.field == field
    assert says in err.problem
    assert says in str(err)
    if field is not None:
        assert str(err).startswith(f"{field}: ")
        assert "- at `$" not in err.problem  # the path lives in `field`, not in the message


def test_invalid_json_keeps_the_cause() -> None:
    with pytest.raises(InvalidTask) as info:
        decode_task(b"{not json")
    assert isinstance(info.value.__cause__, msgspec.DecodeError)


def test_versions_parse() -> None:
    assert parse_version(1.2) == (1, 2)
    assert parse_version("1.2") == (1, 2)
    assert parse_version("3") == (3, 0)
    assert parse_version(" 2.10 ") == (2, 10)
    with pytest.raises(InvalidTask) as info:
        parse_version("v1", field="min_version")
    assert info.value.field == "min_version"


def test_with_task_id_keeps_an_existing_id() -> None:
    task = decode_task(_task_json(task_id="abcd-ef123"))
    assert with_task_id(task) is task
    assert with_task_id(task).task_id == "abcd-ef123"


def test_with_task_id_generates_one_when_empty() -> None:
    task = decode_task(_task_json())
    first = with_task_id(task)
    second = with_task_id(task)
    assert first.task_id
    assert len(first.task_id) == 16
    assert first.task_id != second.task_id
    assert task.task_id == ""  # the original is frozen and untouched
    assert msgspec.structs.replace(first, task_id="") == task


def test_with_task_id_uses_the_given_id() -> None:
    task = decode_task(_task_json())
    assert with_task_id(task, "derived-1").task_id == "derived-1"


def test_decode_work_item() -> None:
    task = decode_task(SAMPLE)
    data = encode(WorkItem(task=task, node="10.0.0.1:9042", routed_at=1700000000.5))
    item = decode_work_item(data)
    assert item.task == task
    assert item.node == "10.0.0.1:9042"
    assert item.routed_at == 1700000000.5


def test_work_item_missing_node() -> None:
    data = json.dumps({"task": json.loads(SAMPLE), "routed_at": 1.0}).encode()
    with pytest.raises(InvalidTask) as info:
        decode_work_item(data)
    assert info.value.field == "node"
    assert "missing required field `node`" in info.value.problem


def test_work_item_names_nested_task_fields() -> None:
    bad_task = {"action": "test:sleep", "cluster_name": "c", "limit": 0}
    data = json.dumps({"task": bad_task, "node": "n", "routed_at": 1.0}).encode()
    with pytest.raises(InvalidTask) as info:
        decode_work_item(data)
    assert info.value.field == "task.limit"


def test_percentages_decode_and_resolve_against_the_node_count() -> None:
    task = decode_task(_task_json(limit="25%", taskerman_params={"max_failures": "10%"}))
    assert (task.limit, task.taskerman_params.max_failures) == ("25%", "10%")
    eight = resolved(task, 8)
    assert (eight.limit, eight.taskerman_params.max_failures) == (2, 1)  # 0.8 rounds down, to at least 1
    assert (eight.resolved_limit, eight.resolved_max_failures) == (2, 1)
    big = resolved(task, 1000)
    assert (big.limit, big.taskerman_params.max_failures) == (250, 100)
    assert resolved(decode_task(_task_json(limit=3)), 8).limit == 3  # numbers keep their meaning
    with pytest.raises(InvalidTask, match="the router resolves percentages"):
        _ = task.resolved_limit


def test_a_work_item_carries_resolved_numbers_only() -> None:
    task = decode_task(_task_json(limit="25%", task_id="t"))
    data = encode(WorkItem(task=task, node="n", routed_at=1.0))
    with pytest.raises(InvalidTask) as info:
        decode_work_item(data)
    assert info.value.field == "task.limit"
    assert decode_work_item(encode(WorkItem(task=resolved(task, 8), node="n", routed_at=1.0))).task.limit == 2


def test_work_item_checks_the_task_beyond_the_schema() -> None:
    bad_task = {"action": "test:sleep", "cluster_name": " "}
    data = json.dumps({"task": bad_task, "node": "n", "routed_at": 1.0}).encode()
    with pytest.raises(InvalidTask) as info:
        decode_work_item(data)
    assert info.value.field == "cluster_name"


def test_work_item_garbage() -> None:
    with pytest.raises(InvalidTask) as info:
        decode_work_item(b"\x00\x01")
    assert info.value.field is None
    assert "not valid JSON" in str(info.value)


def test_task_is_frozen() -> None:
    task = decode_task(_task_json())
    with pytest.raises(AttributeError):
        task.limit = 5  # type: ignore[misc]
    assert isinstance(task, Task)
