"""Percentages of a task's node count. `limit` and `taskerman_params.max_failures` may say "25%" as
well as a number, as Ansible's `serial` / `max_fail_percentage` and SSM's rate and error limits do,
so one task reads right on a cluster of 8 and one of 800.

A percentage means nothing until the task's nodes are known, so the router resolves it once its
routing has found them (`of_nodes`: rounded down, at least 1) and the work items carry plain
numbers; a runner never sees a percentage. Integers keep their meaning on the wire, so a task that
uses none decodes everywhere as before."""

from __future__ import annotations

import re

from taskcore.core.errors import InvalidTask

Share = int | str  # a number of nodes, or a percentage of the task's nodes ("25%")

_PERCENT = re.compile(r"(\d{1,3})%")


def percent(value: str, field: str) -> int:
    """The 1..100 of "1%".."100%"; InvalidTask naming the field and the accepted forms otherwise."""
    m = _PERCENT.fullmatch(value.strip())
    if m is None:
        problem = f"{value!r} is neither a whole number nor a percentage of the task's nodes such as '25%'"
        raise InvalidTask(problem, field=field)
    n = int(m.group(1))
    if not 1 <= n <= 100:
        problem = f"{value!r}: a percentage of the task's nodes must be 1%..100% (or give a whole number)"
        raise InvalidTask(problem, field=field)
    return n


def check(value: Share, field: str) -> None:
    """Refuse a malformed or out-of-range percentage (numbers are bounded by the schema)."""
    if isinstance(value, str):
        percent(value, field)


def of_nodes(value: Share, nodes: int, field: str) -> int:
    """The number a share stands for on a task of `nodes` nodes: a number as it is, a percentage
    of the nodes rounded down, at least 1 (10% of 5 nodes is 1, not 0)."""
    if isinstance(value, int):
        return value
    return max(nodes * percent(value, field) // 100, 1)


def number(value: Share, field: str) -> int:
    """A share that must be resolved already (a work item's): the number, or InvalidTask."""
    if isinstance(value, str):
        raise InvalidTask(f"{value!r} must be a number here: the router resolves percentages", field=field)
    return value
