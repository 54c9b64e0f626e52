"""A stack's signing keys: made once under its home, kept, and trusted by its own settings."""

from __future__ import annotations

from pathlib import Path

from taskcore.core import signing
from taskcore.core.settings import Settings
from taskerman_dev import secrets


def test_generate_makes_the_keys_once_and_the_settings_trust_them(tmp_path: Path) -> None:
    fields = secrets.generate(tmp_path)
    assert secrets.generate(tmp_path) == fields  # kept: a restarted stack agrees with its runners
    folder = tmp_path / "secrets"
    assert folder.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in folder.iterdir())
    settings = Settings(**fields)
    router, admin = signing.signer_for(settings), signing.signer_for(settings, admin=True)
    verifier = signing.verifier_for(settings)
    assert router is not None
    assert admin is not None
    assert verifier is not None
    assert router.key != admin.key
    for signer in (router, admin):
        headers = signer.sign("tasks.cluster.c.n", "t:n", b"{}")
        assert verifier.verify(headers, "tasks.cluster.c.n", "t:n", b"{}") == signer.key
    env = secrets.environ(tmp_path)
    assert set(env) == {
        "TASKERMAN_ROUTER_SEED_FILE",
        "TASKERMAN_ADMIN_SEED_FILE",
        "TASKERMAN_TRUSTED_ROUTER_KEYS",
    }
    assert Settings.from_env(env).trusted_router_keys == fields["trusted_router_keys"]
