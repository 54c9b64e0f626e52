"""One rooted exception tree; every error names what was wrong and where."""

from __future__ import annotations


class TaskermanError(Exception):
    """Base of every error Taskerman raises on purpose."""


class InvalidTask(TaskermanError):
    """A task failed validation; `field` names where, `problem` says what."""

    def __init__(self, problem: str, field: str | None = None) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)


class UnknownAction(InvalidTask):
    """The task names an action that is not installed."""


class InvalidName(TaskermanError):
    """A cluster or node name cannot be used (empty, or a subject token that does not decode)."""


class ActionFailed(TaskermanError):
    """An action step (pre_check, execute_action, post_check) reported failure."""

    def __init__(self, step: str, reason: str) -> None:
        self.step = step
        self.reason = reason
        super().__init__(f"{step} failed: {reason}")


class LeaseLost(TaskermanError):
    """The runner can no longer prove it holds its slot (session suspended or possibly expired)."""


class DiscoveryError(TaskermanError):
    """Discovery could not resolve a cluster's nodes."""


class ServerNotReady(TaskermanError):
    """A launched server (nats-server, ZooKeeper) did not become ready."""


class CredentialsError(TaskermanError):
    """NATS or ZooKeeper refused this process's credentials, or they could not be read."""
