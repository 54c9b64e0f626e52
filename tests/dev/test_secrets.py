"""A stack's keys: made once under its home, kept, trusted by its own settings; a NATS user per role."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskcore.bus import permissions
from taskcore.coord import acl
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
        "TASKERMAN_NATS_CREDS",
        "TASKERMAN_ZK_AUTH",
        "TASKERMAN_ZK_ACL",
    }
    assert Settings.from_env(env).trusted_router_keys == fields["trusted_router_keys"]
    assert Settings.from_env(env).zk_acl == fields["zk_acl"]


def test_each_role_has_its_own_nats_user_and_children_connect_as_theirs(tmp_path: Path) -> None:
    users = secrets.nats_users(tmp_path)
    assert set(users) == set(permissions.ROLES)
    assert len(set(users.values())) == len(users)  # one key per role
    assert all(key.startswith("U") for key in users.values())
    settings = Settings(**secrets.generate(tmp_path))
    assert settings.nats_creds is not None
    assert settings.nats_creds.name == "nats-admin.nk"  # the harness is admin
    observer = secrets.as_role(settings, "observer")
    assert observer.nats_creds == settings.nats_creds.parent / "nats-observer.nk"
    assert signing.public_key(signing.read_seed(observer.nats_creds)) == users["observer"]
    env = settings.env()
    runner = secrets.command_env(env, ["/venv/bin/taskerman-runner", "--node", "n1"])
    assert runner["TASKERMAN_NATS_CREDS"] == str(settings.nats_creds.parent / "nats-runner.nk")
    assert secrets.command_env(env, ["taskerman", "status"]) == env  # not a service: as it was
    assert secrets.as_role(Settings(), "runner") == Settings()  # insecure: nothing to change
    with pytest.raises(ValueError, match="unknown NATS role"):
        secrets.as_role(settings, "root")


def test_each_role_has_its_zookeeper_identity_and_the_acl_names_both(tmp_path: Path) -> None:
    fields = secrets.generate(tmp_path)
    assert set(secrets.ZK_IDENTITY) == set(permissions.ROLES)
    service = acl.read_auth(fields["zk_auth"])  # the harness is admin: the services' identity
    assert service[0] == secrets.ZK_SERVICE
    rules = {r.id.id.split(":")[0]: r.perms for r in acl.parse(fields["zk_acl"])}
    assert rules == {"service": 0b11111, "reader": 0b00001}  # rwcda, r
    settings = Settings(**fields)
    for role, identity in secrets.ZK_IDENTITY.items():
        as_role = secrets.as_role(settings, role)
        assert as_role.zk_auth is not None
        assert acl.read_auth(as_role.zk_auth)[0] == identity
        env = secrets.role_env(settings.env(), role)
        assert acl.read_auth(Path(env[acl.AUTH_ENV]))[0] == identity
    assert secrets.ZK_IDENTITY["operator"] == secrets.ZK_READER
