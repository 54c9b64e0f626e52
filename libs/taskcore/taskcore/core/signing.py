"""Signed work items: a runner acts only on what a key it trusts signed.

Whoever can publish on a node's subject could otherwise make its runner restart or wipe the node.
So the router signs every work item it publishes, with an Ed25519 key in NATS' own nkey format
(the `nkeys` package), over the subject, the message id and the exact payload bytes, and puts the
signature and its public key in two headers. A runner verifies both against its trusted keys (a
list, so a new key can be trusted before the old one is retired) before it decodes anything: an
item signed by a key it does not trust, altered after signing, published to another node's subject
or under another id, or not signed at all, is refused with a reason that starts `signature: `.

What is signed is unambiguous: a domain tag, then the subject and the message id each prefixed by
its length, then the payload. Other headers (trace context) are not signed: they steer no action.

Keys reach every component through `Settings`: the router's seed file (`TASKERMAN_ROUTER_SEED_FILE`),
the admin's (`TASKERMAN_ADMIN_SEED_FILE`, for `dlq replay`), the trusted public keys
(`TASKERMAN_TRUSTED_ROUTER_KEYS`). Without them a router or runner refuses to start, unless
`TASKERMAN_INSECURE=1` says on purpose that it may run unsigned (`signer_for`, `verifier_for`).
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import nacl.exceptions
import nacl.signing
import nkeys

from taskcore.core.errors import TaskermanError
from taskcore.core.settings import Settings

SIGNATURE_HEADER = "Taskerman-Signature"
KEY_HEADER = "Taskerman-Key"
DOMAIN = b"taskerman work item v1\x00"  # what is signed is a work item and nothing else
PUBLIC_KEY_LENGTH = 56  # base32 of prefix byte + 32 key bytes + 2 checksum bytes
SEED_ENV, ADMIN_SEED_ENV, TRUSTED_ENV, INSECURE_ENV = (
    "TASKERMAN_ROUTER_SEED_FILE",
    "TASKERMAN_ADMIN_SEED_FILE",
    "TASKERMAN_TRUSTED_ROUTER_KEYS",
    "TASKERMAN_INSECURE",
)


class SignatureError(TaskermanError):
    """A work item's signature is missing, untrusted or does not match: it must never run. The
    message starts with `signature: ` and says what was wrong and what to do."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"signature: {problem}")


class SigningConfigError(TaskermanError):
    """A seed file or trusted key cannot be used, or a component that must sign or verify has no key."""


def new_seed() -> bytes:
    """A fresh random nkey seed (a user key: `SU…`, its public key `U…`)."""
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def public_key(seed: bytes) -> str:
    """The public key (the key id in `Taskerman-Key`) of a seed."""
    return bytes(nkeys.from_seed(seed).public_key).decode()


def write_seed(path: Path) -> str:
    """Create a new seed file at `path`, readable by its owner only (never over an existing file:
    FileExistsError); returns its public key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    seed = new_seed()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(seed + b"\n")
    return public_key(seed)


def read_seed(path: Path) -> bytes:
    """The seed in `path`: an nkey seed file (`nk -gen user`), or a NATS creds file holding one."""
    try:
        text = path.read_bytes()
    except OSError as e:
        raise SigningConfigError(f"cannot read the seed file {path}: {e.strerror or e}") from e
    for line in text.split():
        if line.startswith(b"S"):
            try:
                nkeys.from_seed(line)
            except (nkeys.NkeysError, ValueError):
                continue
            return line
    raise SigningConfigError(
        f"{path} holds no nkey seed (a line `SU…`); create a seed file with `taskerman keys new FILE`"
    )


def parse_public_key(key: str) -> nacl.signing.VerifyKey:
    """The verifying key of a public nkey (`U…`, or any other nkey role); a clear error when it is none."""
    problem = f"{key!r} is not a public nkey (56 characters of base32, e.g. `U…`; see `taskerman keys show`)"
    if len(key) != PUBLIC_KEY_LENGTH:
        raise SigningConfigError(problem)
    try:
        raw = base64.b32decode(key)
    except (binascii.Error, ValueError):
        raise SigningConfigError(problem) from None
    body, checksum = raw[:-2], raw[-2:]
    if not nkeys.valid_public_prefix_byte(body[0]) or nkeys.crc16_checksum(body) != checksum:
        raise SigningConfigError(problem)
    return nacl.signing.VerifyKey(body[1:])


def signed_bytes(subject: str, msg_id: str, payload: bytes) -> bytes:
    """Exactly what is signed: the domain tag, subject and message id (each length-prefixed, so no
    two (subject, id, payload) triples give the same bytes), then the payload."""
    s, m = subject.encode(), msg_id.encode()
    return b"".join((DOMAIN, struct.pack(">I", len(s)), s, struct.pack(">I", len(m)), m, payload))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Signs work items with one seed; `key` is its public key."""

    def __init__(self, seed: bytes) -> None:
        try:
            self._pair = nkeys.from_seed(seed)
        except (nkeys.NkeysError, ValueError) as e:
            raise SigningConfigError(f"not an nkey seed: {e}") from None
        self.key = bytes(self._pair.public_key).decode()

    @classmethod
    def load(cls, path: Path) -> Signer:
        return cls(read_seed(path))

    def sign(self, subject: str, msg_id: str, payload: bytes) -> dict[str, str]:
        """The headers that carry the signature of this item."""
        signature = self._pair.sign(signed_bytes(subject, msg_id, payload))
        return {SIGNATURE_HEADER: _b64(signature), KEY_HEADER: self.key}


class Verifier:
    """Verifies work items against a set of trusted public keys (several: rotation)."""

    def __init__(self, trusted: Iterable[str]) -> None:
        self._keys = {k: parse_public_key(k) for k in trusted}
        if not self._keys:
            raise SigningConfigError(f"no trusted keys given: set {TRUSTED_ENV}")

    @property
    def trusted(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def verify(self, headers: Mapping[str, str] | None, subject: str, msg_id: str, payload: bytes) -> str:
        """The key that signed this item; SignatureError when no trusted key did."""
        headers = headers or {}
        encoded, key = headers.get(SIGNATURE_HEADER), headers.get(KEY_HEADER)
        if not encoded:
            raise SignatureError(
                f"the work item is not signed (no {SIGNATURE_HEADER} header): only the router may "
                "publish work items, and it signs them; it was not run. If your router runs without "
                f"{SEED_ENV} (insecure mode), give it a seed whose public key this runner trusts "
                f"({TRUSTED_ENV}); otherwise find out who published it"
            )
        if not key:
            raise SignatureError(
                f"the work item has a signature but no {KEY_HEADER} header naming its key; it was not "
                "run. Only the router's own publishes are valid: find out who published it"
            )
        verify_key = self._keys.get(key)
        if verify_key is None:
            raise SignatureError(
                f"the work item is signed by key {key[:60]!r}, which this runner does not trust (it "
                f"trusts {len(self._keys)} key(s) in {TRUSTED_ENV}); it was not run. If that is your "
                f"router's new key, add it to {TRUSTED_ENV} on the runners and submit the task again; "
                "otherwise someone other than the router published it"
            )
        try:
            signature = _unb64(encoded)
            verify_key.verify(signed_bytes(subject, msg_id, payload), signature)
        except (binascii.Error, ValueError, nacl.exceptions.BadSignatureError):
            raise SignatureError(
                f"the signature by key {key} does not match this item's subject {subject[:200]!r}, "
                f"message id {msg_id[:200]!r} and {len(payload)}-byte payload: it was altered after "
                "signing, or replayed to another node's subject or under another id; it was not run. "
                "Do not replay it; if the task is genuine, submit it again"
            ) from None
        return key


def signer_for(settings: Settings, admin: bool = False) -> Signer | None:
    """The signer of a component that publishes work items: the router's seed
    (`settings.router_seed_file`), or with `admin` the admin's (`settings.admin_seed_file`, for
    `dlq replay`). None only in insecure mode without a seed: it then publishes unsigned items.
    Without a seed otherwise: SigningConfigError saying what to set."""
    path, env, whose = (
        (settings.admin_seed_file, ADMIN_SEED_ENV, "an admin")
        if admin
        else (settings.router_seed_file, SEED_ENV, "the router's")
    )
    if path is not None:
        return Signer.load(path)
    if settings.insecure:
        return None
    raise SigningConfigError(
        f"no signing key: set {env} to {whose} nkey seed file (create one with `taskerman keys new "
        f"FILE`; the runners must trust its public key, in {TRUSTED_ENV}), or set {INSECURE_ENV}=1 "
        "to publish unsigned work items on a network you trust"
    )


def verifier_for(settings: Settings) -> Verifier | None:
    """The verifier of a runner, from `settings.trusted_router_keys`. None only in insecure mode
    without keys: it then runs unsigned items. Without keys otherwise: SigningConfigError."""
    if settings.trusted_router_keys:
        return Verifier(settings.trusted_router_keys)
    if settings.insecure:
        return None
    raise SigningConfigError(
        f"no trusted keys: set {TRUSTED_ENV} to the router's public key(s), comma-separated (from "
        f"`taskerman keys show {{seed file}}`), or set {INSECURE_ENV}=1 to run unsigned work items on "
        "a network you trust"
    )
