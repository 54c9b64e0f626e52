"""The record of a stack, `$TASKERMAN_HOME/stack.json`: what was started, and whether it still runs."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import msgspec

from taskcore.core.errors import TaskermanError
from taskcore.core.settings import Settings
from taskcore.runtime import procs
from taskerman_dev import demo_fleet

CLUSTER = "demo:web"
STACK_FILE = "stack.json"
CLUSTER_SIZE = 3  # --cluster-mode: nats-servers, ZooKeeper servers, and so stream replicas


class StackProcess(msgspec.Struct, kw_only=True):
    """One process the stack started."""

    name: str
    pid: int
    command: list[str]
    cluster: str | None = None
    node: str | None = None
    member: int | None = None  # cluster mode: the server's place (1-based) in the stack's nats_url / zk_hosts
    log: str | None = None
    state_dir: str | None = None  # demo services: their pidfile lives here (their pid changes on restart)
    start_ticks: int | None = None  # tells the recorded pid from a later reuse of the same number
    started_at: float = 0.0


class Stack(msgspec.Struct, kw_only=True):
    """The contents of `stack.json`."""

    home: str
    nats_url: str  # every server's URL, comma-separated (the form of TASKERMAN_NATS_URL)
    zk_hosts: str
    created_at: float
    cluster_mode: bool = False
    admin_seed_file: str | None = None  # signs `dlq replay`'s work items (taskerman_dev.secrets)
    nats_creds: str | None = None  # the admin's NATS user, for the CLI on this machine
    zk_auth: str | None = None  # the admin's ZooKeeper identity, for the CLI (taskcore/coord/acl.py)
    zk_acl: list[str] = []  # the ACL every znode is created with
    processes: list[StackProcess] = []


class StackError(TaskermanError):
    """Starting the stack failed; the message says what and where to look."""


def absolute(settings: Settings) -> Settings:
    """The settings with `home` made absolute, so every child agrees on it."""
    return msgspec.structs.replace(settings, home=settings.home.resolve())


def stack_path(settings: Settings) -> Path:
    """Where the stack's record lives."""
    return settings.home / STACK_FILE


def load_stack(settings: Settings) -> Stack | None:
    """The recorded stack, or None when there is none (an unreadable record is reported and ignored)."""
    path = stack_path(settings)
    try:
        return msgspec.json.decode(path.read_bytes(), type=Stack)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as e:
        print(f"taskerman dev: ignoring unreadable {path}: {e}", file=sys.stderr)
        return None


def save(settings: Settings, stack: Stack) -> None:
    """Write the record atomically."""
    path = stack_path(settings)
    tmp = path.with_name(f".{STACK_FILE}.{os.getpid()}")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(stack)) + b"\n")
    tmp.replace(path)


def current_pid(proc: StackProcess) -> int:
    """The process's pid now: a demo service's comes from its pidfile, since a restart changes it."""
    if proc.state_dir is not None:
        pid = demo_fleet.read_pid(Path(proc.state_dir))
        if pid is not None:
            return pid
    return proc.pid


def is_alive(proc: StackProcess) -> bool:
    """Whether the recorded process (not some later one that reuses its pid) still runs."""
    if proc.state_dir is not None and demo_fleet.read_pid(Path(proc.state_dir)) is not None:
        return True
    return recorded_alive(proc)


def recorded_alive(proc: StackProcess) -> bool:
    """Whether the pid recorded at start still runs as the same process."""
    return procs.alive(proc.pid, proc.start_ticks)


def is_running(settings: Settings) -> bool:
    """Whether any process of the recorded stack still runs."""
    stack = load_stack(absolute(settings))
    return stack is not None and any(is_alive(p) for p in stack.processes)


def with_stack_servers(settings: Settings, env: Mapping[str, str]) -> Settings:
    """The settings with the running stack's NATS URLs and ZooKeeper hosts wherever `env` leaves
        `TASKERMAN_NATS_URL` / `TASKERMAN_ZK_HOSTS` unset, so the CLI reaches a `dev up --cluster-mode`
        stack (or one on non-default ports) without exports, its admin seed where
        `TASKERMAN_ADMIN_SEED_FILE` is unset (`dlq replay` signs with it) and its admin NATS user where
        `TASKERMAN_NATS_CREDS` is unset (the developer's own stack), and its ZooKeeper identity and ACL
    likewise; unchanged when no stack runs under
        home."""
    if not stack_path(settings).is_file():
        return settings
    stack = load_stack(settings)
    if stack is None or not any(is_alive(p) for p in stack.processes):
        return settings
    return msgspec.structs.replace(
        settings,
        nats_url=env.get("TASKERMAN_NATS_URL", stack.nats_url),
        zk_hosts=env.get("TASKERMAN_ZK_HOSTS", stack.zk_hosts),
        admin_seed_file=settings.admin_seed_file
        if env.get("TASKERMAN_ADMIN_SEED_FILE") or not stack.admin_seed_file
        else Path(stack.admin_seed_file),
        nats_creds=settings.nats_creds
        if env.get("TASKERMAN_NATS_CREDS") or not stack.nats_creds
        else Path(stack.nats_creds),
        zk_auth=settings.zk_auth
        if env.get("TASKERMAN_ZK_AUTH") or not stack.zk_auth
        else Path(stack.zk_auth),
        zk_acl=settings.zk_acl if env.get("TASKERMAN_ZK_ACL") else tuple(stack.zk_acl),
    )


def display_name(name: object, member: object) -> str:
    """The name, with a cluster member's index (`nats-server-2`)."""
    return f"{name}-{member}" if member is not None else str(name)
