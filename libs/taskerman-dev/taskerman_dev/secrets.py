"""The signing keys of a local stack (`taskerman dev up`, the demo, the tests, the benchmarks, chaos
runs): a router seed and an admin seed under `<home>/secrets/`, both public keys trusted, so every
stack runs with signed work items (`taskcore/core/signing.py`) and no key is ever hard-wired.

The keys are made once per home and kept: a stack restarted under the same home, and every process
it spawns, agrees on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taskcore.core import signing
from taskcore.core.settings import Settings

SECRETS_DIR = "secrets"
ROUTER_SEED = "router.nk"
ADMIN_SEED = "admin.nk"  # `taskerman dlq replay` signs the work items it republishes with it
SIGNING_ENV = (signing.SEED_ENV, signing.ADMIN_SEED_ENV, signing.TRUSTED_ENV)


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
    folder = (home / SECRETS_DIR).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    router, admin = folder / ROUTER_SEED, folder / ADMIN_SEED
    return {
        "router_seed_file": router,
        "admin_seed_file": admin,
        "trusted_router_keys": (_key(router), _key(admin)),
    }


def environ(home: Path) -> dict[str, str]:
    """`generate(home)` as the environment variables that carry it (for a process started by hand)."""
    env = Settings(**generate(home)).env()
    return {name: env[name] for name in SIGNING_ENV}
