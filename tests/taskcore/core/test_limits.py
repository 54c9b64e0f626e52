"""Every bound of core/limits.py, at its edge: the largest allowed input decodes, one more is one
InvalidTask that names the field and the bound."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from taskcore.core import limits, signing, subjects
from taskcore.core.errors import InvalidTask
from taskcore.core.model import Task, WorkItem, decode_task, decode_work_item, peek_task_id
from taskcore.core.signing import Signer
from taskerman_dev.actions import SleepArgs


def _task(**fields: Any) -> bytes:
    raw: dict[str, Any] = {"action": "test:sleep", "cluster_name": "c"}
    raw.update(fields)
    return json.dumps(raw).encode()


def _refused(data: bytes, field: str | None, *words: str) -> InvalidTask:
    with pytest.raises(InvalidTask) as info:
        decode_task(data)
    assert info.value.field == field, info.value
    for word in words:
        assert word in str(info.value)
    return info.value


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _deep_args(depth: int) -> bytes:
    """A task whose action_args hold lists nested `depth` deep (beyond what json.dumps can write)."""
    deep = b"[" * depth + b"1" + b"]" * depth
    return (
        b'{"action": "test:sleep", "cluster_name": "c", "taskerman_params": {"action_args": {"x": '
        + deep
        + b"}}}"
    )


def test_json_depth_skips_strings_and_stops_early() -> None:
    assert limits.json_depth(b'{"a": [1, {"b": "[[[[{{{{"}]}') == 3
    assert limits.json_depth(b'"\\"[[["') == 0
    assert limits.json_depth(b"[" * 100_000, stop_above=32) == 33


def test_action_args_nesting_is_bounded_before_decoding() -> None:
    ok = decode_task(_task(taskerman_params={"action_args": {"x": _nested(limits.MAX_ARGS_DEPTH - 1)}}))
    assert ok.action_args
    for depth in (limits.MAX_ARGS_DEPTH, 2_000, 5_000):
        _refused(_deep_args(depth), None, str(limits.MAX_JSON_DEPTH), "flatten")


def test_work_item_nesting_is_bounded_before_decoding() -> None:
    item = b'{"task": ' + _deep_args(5_000) + b', "node": "n", "routed_at": 0}'
    with pytest.raises(InvalidTask, match="nests deeper"):
        decode_work_item(item)


def test_payload_size_is_bounded() -> None:
    filler = "x" * (limits.MAX_PAYLOAD_BYTES + 1)
    _refused(_task(owner=filler), None, str(limits.MAX_PAYLOAD_BYTES), "bytes")


def test_action_args_size_is_bounded() -> None:
    decode_task(_task(taskerman_params={"action_args": {"x": "a" * (limits.MAX_ARGS_BYTES - 100)}}))
    data = _task(taskerman_params={"action_args": {"x": "a" * limits.MAX_ARGS_BYTES}})
    _refused(data, "taskerman_params.action_args", str(limits.MAX_ARGS_BYTES), "file or URL")


@pytest.mark.parametrize("field", ["cluster_name", "destnode"])
def test_name_token_length_is_bounded(field: str) -> None:
    decode_task(_task(**{field: "a" * limits.MAX_NAME_CHARS}))
    decode_task(_task(**{field: "." * (limits.MAX_NAME_TOKEN // 3)}))  # 3 token characters each
    _refused(_task(**{field: "." * (limits.MAX_NAME_TOKEN // 3 + 1)}), field, str(limits.MAX_NAME_TOKEN))
    _refused(_task(**{field: "😀" * 512}), field, "subject token of 6144")
    _refused(_task(**{field: "a" * (limits.MAX_NAME_CHARS + 1)}), field, str(limits.MAX_NAME_CHARS))


def test_destnode_of_5000_characters_is_refused() -> None:
    _refused(_task(destnode="d" * 5_000), "destnode", "512")


def test_every_explicit_node_is_checked() -> None:
    _refused(_task(nodes=["n1", "😀" * 512]), "nodes[1]", "subject token")


def test_the_longest_names_make_a_subject_well_under_the_control_line() -> None:
    name = "é" * (limits.MAX_NAME_TOKEN // 6)  # two UTF-8 bytes each: 6 token characters
    task = decode_task(_task(cluster_name=name, nodes=[name], task_id="t" * limits.MAX_TASK_ID_CHARS))
    subject = subjects.node_subject(task.cluster_name, task.nodes[0])
    msg_id = subjects.work_msg_id(task.task_id, task.nodes[0])
    signed = Signer(signing.new_seed()).sign(subject, msg_id, b"{}")  # the router's headers
    headers = sum(len(k) + len(v) + 4 for k, v in signed.items())
    assert len(subject) + len(msg_id) + headers < 3_500
    assert subjects.token_length(name) == len(subjects.encode_token(name))


def test_task_id_is_bounded_in_characters_and_encoded() -> None:
    decode_task(_task(task_id="t" * limits.MAX_TASK_ID_CHARS))
    _refused(_task(task_id="t" * (limits.MAX_TASK_ID_CHARS + 1)), "task_id", str(limits.MAX_TASK_ID_CHARS))
    _refused(_task(task_id="😀" * 60), "task_id", str(limits.MAX_TASK_ID_TOKEN))


@pytest.mark.parametrize(
    ("field", "bound"),
    [("action", limits.MAX_ACTION_CHARS), ("owner", limits.MAX_OWNER_CHARS)],
)
def test_labels_are_bounded(field: str, bound: int) -> None:
    value = "a:" + "b" * (bound - 2) if field == "action" else "o" * bound
    decode_task(_task(**{field: value}))
    _refused(_task(**{field: value + "b"}), field, str(bound))


def test_explicit_nodes_allow_a_10000_node_benchmark_and_are_bounded() -> None:
    assert len(decode_task(_task(nodes=[f"node-{i:05d}" for i in range(10_000)])).nodes) == 10_000
    assert limits.MAX_NODES >= 10_000
    tiny = ["n"] * (limits.MAX_NODES + 1)
    _refused(_task(nodes=tiny), "nodes", str(limits.MAX_NODES))


@pytest.mark.parametrize("value", [10**9, 10**30])
def test_limit_is_bounded(value: int) -> None:
    assert decode_task(_task(limit=limits.MAX_LIMIT)).limit == limits.MAX_LIMIT
    _refused(_task(limit=value), "limit", str(limits.MAX_LIMIT))


def test_max_failures_is_bounded() -> None:
    data = _task(taskerman_params={"max_failures": limits.MAX_FAILURES})
    assert decode_task(data).taskerman_params.max_failures == limits.MAX_FAILURES
    for bad in (-1, limits.MAX_FAILURES + 1):
        _refused(_task(taskerman_params={"max_failures": bad}), "taskerman_params.max_failures")


@pytest.mark.parametrize("seconds", [-5, limits.MAX_SLEEP_SECONDS + 1, 1e30])
def test_test_sleep_refuses_negative_and_absurd_sleeps(seconds: float) -> None:
    with pytest.raises(msgspec.ValidationError, match="seconds"):
        msgspec.convert({"seconds": seconds}, SleepArgs)
    assert msgspec.convert({"seconds": limits.MAX_SLEEP_SECONDS}, SleepArgs).seconds == 3600


def test_peek_task_id_reads_what_it_can() -> None:
    assert peek_task_id(b'{"action": "nope:x", "cluster_name": "c", "task_id": "valid-01"}') == "valid-01"
    assert peek_task_id(b'{"task_id": "has space"}') == ""
    assert peek_task_id(b'{"task_id": 5}') == ""
    assert peek_task_id(b"[1, 2]") == ""
    assert peek_task_id(b"not json") == ""
    assert peek_task_id(b'{"task": "x", "node": "n02", "routed_at": 0}', in_item=True) == ""
    assert peek_task_id(b'{"task": {"task_id": "p1"}}', in_item=True) == "p1"
    assert peek_task_id(b'{"task_id": "deep", "x": ' + b"[" * 5_000 + b"]" * 5_000 + b"}") == ""


def test_work_item_node_token_is_bounded() -> None:
    task = Task(action="test:sleep", cluster_name="c", task_id="t")
    item = WorkItem(task=task, node="😀" * 100, routed_at=0)
    with pytest.raises(InvalidTask) as info:
        decode_work_item(msgspec.json.encode(item))
    assert info.value.field == "node"


def test_work_item_needs_its_task_id() -> None:
    item = WorkItem(task=Task(action="test:sleep", cluster_name="c"), node="n", routed_at=0)
    with pytest.raises(InvalidTask) as info:
        decode_work_item(msgspec.json.encode(item))
    assert info.value.field == "task.task_id"
