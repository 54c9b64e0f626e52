"""One settings object, built from the environment; no module-level globals."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import msgspec

from taskcore.core.model import MAX_RETRIES


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Connection and tuning settings shared by every component."""

    nats_url: str = "nats://127.0.0.1:4222"
    zk_hosts: str = "127.0.0.1:2181"
    zk_chroot: str = "/taskerman"
    zk_session_timeout: float = 10.0
    home: Path = Path(".taskerman")
    ack_wait: float = 30.0
    duplicate_window: float = 3600.0
    # The server's cap on deliveries of one work item. The runner enforces each task's own
    # retry_count below it and dead-letters itself; this cap is the backstop (advisory path).
    max_deliver: int = MAX_RETRIES + 2
    status_retention: float = 7 * 86400.0  # tracking records expire this long after their last change
    events_retention: float = 30 * 86400.0  # the audit trail keeps its own retention
    metrics_port: int = 0  # > 0: serve Prometheus metrics on this port
    metrics_addr: str = "127.0.0.1"
    breaker_threshold: int = 5
    breaker_window: float = 600.0
    breaker_cooldown: float = 0.0  # > 0: the breaker half-opens after this many seconds
    # Signed work items (core/signing.py): the router's and the admin's nkey seed files, and the
    # public keys runners trust to have signed an item (several, for rotation).
    router_seed_file: Path | None = None
    admin_seed_file: Path | None = None
    trusted_router_keys: tuple[str, ...] = ()
    insecure: bool = False  # run without keys (unsigned work items): only on purpose, with a warning
    # The nkey seed file (or NATS creds file) this process connects to NATS with: its role's user
    # (bus/permissions.py). None: connect without credentials, which a secured server refuses.
    nats_creds: Path | None = None
    # ZooKeeper digest ACLs (coord/acl.py): the file with this process's `user:password`, and the
    # ACL of every znode it creates, entries `<user>:<digest>=<perms>`. Neither: world-accessible.
    zk_auth: Path | None = None
    zk_acl: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read `TASKERMAN_*` variables; anything unset keeps its default."""
        env = os.environ if env is None else env
        d = cls()
        return cls(
            nats_url=env.get("TASKERMAN_NATS_URL", d.nats_url),
            zk_hosts=env.get("TASKERMAN_ZK_HOSTS", d.zk_hosts),
            zk_chroot=env.get("TASKERMAN_ZK_CHROOT", d.zk_chroot),
            zk_session_timeout=float(env.get("TASKERMAN_ZK_SESSION_TIMEOUT", d.zk_session_timeout)),
            home=Path(env.get("TASKERMAN_HOME", str(d.home))),
            ack_wait=float(env.get("TASKERMAN_ACK_WAIT", d.ack_wait)),
            max_deliver=int(env.get("TASKERMAN_MAX_DELIVER", d.max_deliver)),
            duplicate_window=float(env.get("TASKERMAN_DUPLICATE_WINDOW", d.duplicate_window)),
            metrics_port=int(env.get("TASKERMAN_METRICS_PORT", d.metrics_port)),
            metrics_addr=env.get("TASKERMAN_METRICS_ADDR", d.metrics_addr),
            status_retention=float(env.get("TASKERMAN_STATUS_RETENTION", d.status_retention)),
            events_retention=float(env.get("TASKERMAN_EVENTS_RETENTION", d.events_retention)),
            breaker_threshold=int(env.get("TASKERMAN_BREAKER_THRESHOLD", d.breaker_threshold)),
            breaker_window=float(env.get("TASKERMAN_BREAKER_WINDOW", d.breaker_window)),
            breaker_cooldown=float(env.get("TASKERMAN_BREAKER_COOLDOWN", d.breaker_cooldown)),
            router_seed_file=_path(env.get("TASKERMAN_ROUTER_SEED_FILE")),
            admin_seed_file=_path(env.get("TASKERMAN_ADMIN_SEED_FILE")),
            trusted_router_keys=_keys(env.get("TASKERMAN_TRUSTED_ROUTER_KEYS", "")),
            insecure=_flag("TASKERMAN_INSECURE", env.get("TASKERMAN_INSECURE", "")),
            nats_creds=_path(env.get("TASKERMAN_NATS_CREDS")),
            zk_auth=_path(env.get("TASKERMAN_ZK_AUTH")),
            zk_acl=_keys(env.get("TASKERMAN_ZK_ACL", "")),
        )

    def env(self) -> dict[str, str]:
        """The variables that reproduce these settings in a child process."""
        return {
            "TASKERMAN_NATS_URL": self.nats_url,
            "TASKERMAN_ZK_HOSTS": self.zk_hosts,
            "TASKERMAN_ZK_CHROOT": self.zk_chroot,
            "TASKERMAN_ZK_SESSION_TIMEOUT": str(self.zk_session_timeout),
            "TASKERMAN_HOME": str(self.home),
            "TASKERMAN_ACK_WAIT": str(self.ack_wait),
            "TASKERMAN_MAX_DELIVER": str(self.max_deliver),
            "TASKERMAN_DUPLICATE_WINDOW": str(self.duplicate_window),
            "TASKERMAN_STATUS_RETENTION": str(self.status_retention),
            "TASKERMAN_EVENTS_RETENTION": str(self.events_retention),
            "TASKERMAN_BREAKER_THRESHOLD": str(self.breaker_threshold),
            "TASKERMAN_BREAKER_WINDOW": str(self.breaker_window),
            "TASKERMAN_BREAKER_COOLDOWN": str(self.breaker_cooldown),
            "TASKERMAN_ROUTER_SEED_FILE": str(self.router_seed_file or ""),
            "TASKERMAN_ADMIN_SEED_FILE": str(self.admin_seed_file or ""),
            "TASKERMAN_TRUSTED_ROUTER_KEYS": ",".join(self.trusted_router_keys),
            "TASKERMAN_INSECURE": "1" if self.insecure else "0",
            "TASKERMAN_NATS_CREDS": str(self.nats_creds or ""),
            "TASKERMAN_ZK_AUTH": str(self.zk_auth or ""),
            "TASKERMAN_ZK_ACL": ",".join(self.zk_acl),
        }


def _path(raw: str | None) -> Path | None:
    """A file setting: unset or empty is none."""
    return Path(raw) if raw and raw.strip() else None


def _keys(raw: str) -> tuple[str, ...]:
    """A comma-separated list, blanks dropped (each key is checked where it is used)."""
    return tuple(k.strip() for k in raw.split(",") if k.strip())


def _flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name}={raw!r}: use 1 (on) or 0 (off)")
