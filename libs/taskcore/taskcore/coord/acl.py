"""ZooKeeper digest ACLs: who may read and change what lives under the Taskerman chroot.

Every znode a Taskerman process creates (folders, holders, the breaker, cluster configs,
registrations, the chroot itself) carries the ACL of the settings' `zk_acl`, and the process
authenticates on every connection with the `user:password` of its `zk_auth` file. An ACL entry
is `<user>:<digest>=<perms>`, the digest ZooKeeper's own (`base64(sha1("user:password"))`), the
perms letters of `rwcda` (read, write, create, delete, admin): the stack's services hold `rwcda`,
readers (operators, dashboards) `r`. Nothing is granted to `world:anyone`: an anonymous client
can neither read, create, set nor delete anything there.

Digest authentication itself never fails in ZooKeeper (it only names the identity); a wrong
password shows as NoAuth on the first read, which `ZkSession` turns into ZkAuthError at start."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from pathlib import Path

from aiozk import ACL

from taskcore.core.errors import CredentialsError

PERMS = "rwcda"
PERM_NAMES = ("read", "write", "create", "delete", "admin")  # aiozk's ACL.make keywords, in PERMS order
SERVICE_PERMS = "rwcda"
PERM_NAMES = ("read", "write", "create", "delete", "admin")  # aiozk's ACL.make keywords, in PERMS order
READER_PERMS = "r"
AUTH_ENV = "TASKERMAN_ZK_AUTH"
ACL_ENV = "TASKERMAN_ZK_ACL"


class ZkAuthError(CredentialsError):
    """ZooKeeper credentials or ACL settings that cannot work; the message says which and how."""


def digest(user: str, password: str) -> str:
    """ZooKeeper's digest of an identity (DigestAuthenticationProvider)."""
    return base64.b64encode(hashlib.sha1(f"{user}:{password}".encode()).digest()).decode()


def entry(user: str, password: str, perms: str) -> str:
    """One `zk_acl` entry granting `perms` to the identity."""
    return f"{user}:{digest(user, password)}={perms}"


def parse(entries: Sequence[str]) -> list[ACL]:
    """The ACL of `zk_acl` entries; ZkAuthError naming a malformed one."""
    out = []
    for raw in entries:
        ident, sep, perms = raw.strip().rpartition("=")
        user, colon, hashed = ident.partition(":")
        if not sep or not colon or not user or not hashed or not perms or set(perms) - set(PERMS):
            raise ZkAuthError(
                f"{ACL_ENV}: {raw!r} is not an ACL entry: expected <user>:<digest>=<perms>, perms "
                f"from {PERMS!r} (`taskcore.coord.acl.entry(user, password, 'rwcda')` makes one)"
            )
        flags = {name: letter in perms for name, letter in zip(PERM_NAMES, PERMS, strict=True)}
        out.append(ACL.make(scheme="digest", id=f"{user}:{hashed}", **flags))
    return out


def read_auth(path: Path) -> tuple[str, str]:
    """(user, password) from a `zk_auth` file holding `user:password`."""
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise ZkAuthError(f"{AUTH_ENV}: cannot read {path}: {e.strerror or e}") from None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ZkAuthError(f"{AUTH_ENV}: {path} must hold one line `user:password`")
    return user, password
