"""The keys of a local stack (`taskerman dev up`, the demo, the tests, the benchmarks, chaos runs),
under `<home>/secrets/`: a router seed and an admin seed that sign work items, both public keys
trusted (`taskcore/core/signing.py`), and one NATS user seed per role (`nats-<role>.nk`), whose
public keys the stack's nats-server is configured with (`taskcore/bus/permissions.py`), and one
ZooKeeper digest identity per kind of client (`zk-service.pw` for the services and admin,
`zk-reader.pw` for operators and observers, `taskcore/coord/acl.py`). So every stack runs with
signed work items, least privilege on the bus, ZooKeeper closed to anonymous clients, and no key
is ever hard-wired.
The harness itself (the tests, the checker, the benchmark driver) connects as admin; each process
it starts connects as its own role (`role_env`).

The keys are made once per home and kept: a stack restarted under the same home, and every process
it spawns, agrees on them."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from taskcore.bus import permissions
from taskcore.coord import acl
from taskcore.core import signing
from taskcore.core.settings import Settings

SECRETS_DIR = "secrets"
ROUTER_SEED = "router.nk"
ADMIN_SEED = "admin.nk"  # `taskerman dlq replay` signs the work items it republishes with it
SIGNING_ENV = (signing.SEED_ENV, signing.ADMIN_SEED_ENV, signing.TRUSTED_ENV)
CREDS_ENV = "TASKERMAN_NATS_CREDS"
ZK_SERVICE, ZK_READER = "service", "reader"
# the ZooKeeper identity of each NATS role: operators and observers only read there (budgets,
# windows, freezes and breaker resets are the admin's)
ZK_IDENTITY = {
    "router": ZK_SERVICE,
    "runner": ZK_SERVICE,
    "scheduler": ZK_SERVICE,
    "admin": ZK_SERVICE,
    "operator": ZK_READER,
    "observer": ZK_READER,
}
HARNESS_ROLE = "admin"
# the role each service's script connects as
SCRIPT_ROLES = {
    "taskerman-router": "router",
    "taskerman-runner": "runner",
    "taskerman-scheduler": "scheduler",
}


def _key(path: Path) -> str:
    """The public key of the seed at `path`, made first when there is none."""
    try:
        return signing.write_seed(path)
    except FileExistsError:  # made before (or by a process racing us): keep it
        return signing.public_key(signing.read_seed(path))


def generate(home: Path) -> dict[str, Any]:
    """The signing settings of the stack under `home`, as `Settings` fields (`router_seed_file`,
    `admin_seed_file`, `trusted_router_keys`), its seeds made when missing: pass them to
    `Settings(...)` or `msgspec.structs.replace`, and `Settings.env()` carries them to every child."""
    folder = _folder(home)
    router, admin = folder / ROUTER_SEED, folder / ADMIN_SEED
    nats_users(home)
    return {
        "router_seed_file": router,
        "admin_seed_file": admin,
        "trusted_router_keys": (_key(router), _key(admin)),
        "nats_creds": folder / nats_seed_name(HARNESS_ROLE),
        "zk_auth": folder / zk_auth_name(HARNESS_ROLE),
        "zk_acl": (
            acl.entry(*_zk_identity(folder, ZK_SERVICE), acl.SERVICE_PERMS),
            acl.entry(*_zk_identity(folder, ZK_READER), acl.READER_PERMS),
        ),
    }


def zk_auth_name(role: str) -> str:
    """The file of the ZooKeeper identity `role` authenticates as."""
    return f"zk-{ZK_IDENTITY[role]}.pw"


def _zk_identity(folder: Path, user: str) -> tuple[str, str]:
    """(user, password) of a ZooKeeper identity, its file (`user:password`, 0600) made when missing."""
    path = folder / f"zk-{user}.pw"
    with contextlib.suppress(FileExistsError):  # made before (or by a process racing us): keep it
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{user}:{secrets.token_urlsafe(24)}\n")
    return acl.read_auth(path)


def _folder(home: Path) -> Path:
    folder = (home / SECRETS_DIR).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    return folder


def nats_seed_name(role: str) -> str:
    if role not in permissions.ROLES:
        raise ValueError(f"unknown NATS role {role!r}: one of {', '.join(permissions.ROLES)}")
    return f"nats-{role}.nk"


def nats_users(home: Path) -> dict[str, str]:
    """Role → public nkey of the stack's NATS users (their seeds made when missing): what its
    nats-server is configured with (`NatsServer(users=...)`)."""
    folder = _folder(home)
    return {role: _key(folder / nats_seed_name(role)) for role in permissions.ROLES}


def as_role(settings: Settings, role: str) -> Settings:
    """`settings` connecting as `role`: its seed next to the one the settings use (unchanged
    without credentials: an insecure stack)."""
    if settings.nats_creds is None:
        return settings
    folder = settings.nats_creds.parent
    nats_creds = folder / nats_seed_name(role)
    zk_auth = folder / zk_auth_name(role) if settings.zk_auth else None
    return msgspec.structs.replace(settings, nats_creds=nats_creds, zk_auth=zk_auth)


def role_env(env: Mapping[str, str], role: str) -> dict[str, str]:
    """A child's environment `env` connecting as `role` (its seed next to the one `env` names)."""
    out = dict(env)
    if creds := out.get(CREDS_ENV, "").strip():
        out[CREDS_ENV] = str(Path(creds).parent / nats_seed_name(role))
    if zk_auth := out.get(acl.AUTH_ENV, "").strip():
        out[acl.AUTH_ENV] = str(Path(zk_auth).parent / zk_auth_name(role))
    return out


def command_env(env: Mapping[str, str], argv: Sequence[str]) -> dict[str, str]:
    """The environment of the command `argv`: a service's script connects as its role, anything
    else as `env` says."""
    role = SCRIPT_ROLES.get(os.path.basename(argv[0])) if argv else None
    return role_env(env, role) if role else dict(env)


def environ(home: Path) -> dict[str, str]:
    """`generate(home)` as the environment variables that carry it (for a process started by hand)."""
    env = Settings(**generate(home)).env()
    return {name: env[name] for name in (*SIGNING_ENV, CREDS_ENV, acl.AUTH_ENV, acl.ACL_ENV)}
