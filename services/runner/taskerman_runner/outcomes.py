"""How an attempt of a work item ends. A failed attempt comes back after its backoff, a released
one after a short delay and uncounted; succeeded, retired and dead items are gone from the queue."""

from __future__ import annotations

import msgspec


class Succeeded(msgspec.Struct, frozen=True):
    """Every step passed; the item is acked."""


class Failed(msgspec.Struct, frozen=True):
    """The attempt failed at `step` and is counted; the item comes back after its backoff."""

    step: str
    reason: str


class Released(msgspec.Struct, frozen=True):
    """The attempt ended at `step` without the action failing; the item comes back, not counted."""

    step: str
    reason: str


class Retired(msgspec.Struct, frozen=True):
    """The task was stopped before this node acted; the item is acked unrun."""

    reason: str


class Dead(msgspec.Struct, frozen=True):
    """The item is in the dead-letter queue."""

    reason: str


Outcome = Succeeded | Failed | Released | Retired | Dead
