"""Signed work items, the pure part: what is signed, what verifies, and the secure defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskcore.core import signing
from taskcore.core.settings import Settings
from taskcore.core.signing import SignatureError, Signer, SigningConfigError, Verifier

ROUTER = Signer(signing.new_seed())
OTHER = Signer(signing.new_seed())
SUBJECT = "tasks.cluster.demo=3Aweb.node-1"
MSG_ID = "t1:node-1"
PAYLOAD = b'{"task":{"action":"test:sleep"},"node":"node-1"}'

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


def test_a_signed_item_verifies_and_names_its_key() -> None:
    headers = ROUTER.sign(SUBJECT, MSG_ID, PAYLOAD)
    assert set(headers) == {signing.SIGNATURE_HEADER, signing.KEY_HEADER}
    assert headers[signing.KEY_HEADER] == ROUTER.key
    assert ROUTER.key.startswith("U")
    assert Verifier([ROUTER.key]).verify(headers, SUBJECT, MSG_ID, PAYLOAD) == ROUTER.key


@given(subject=texts, msg_id=texts, payload=st.binary(max_size=200), other=st.binary(max_size=200))
def test_any_other_payload_fails(subject: str, msg_id: str, payload: bytes, other: bytes) -> None:
    headers = ROUTER.sign(subject, msg_id, payload)
    verifier = Verifier([ROUTER.key])
    assert verifier.verify(headers, subject, msg_id, payload) == ROUTER.key
    if other != payload:
        with pytest.raises(SignatureError, match=r"^signature: .*altered after signing"):
            verifier.verify(headers, subject, msg_id, other)


@given(subject=texts, msg_id=texts, other=texts)
def test_another_subject_or_id_fails(subject: str, msg_id: str, other: str) -> None:
    headers = ROUTER.sign(subject, msg_id, PAYLOAD)
    verifier = Verifier([ROUTER.key])
    if other != subject:
        with pytest.raises(SignatureError, match="replayed to another node's subject"):
            verifier.verify(headers, other, msg_id, PAYLOAD)
    if other != msg_id:
        with pytest.raises(SignatureError):
            verifier.verify(headers, subject, other, PAYLOAD)


def test_field_boundaries_cannot_shift() -> None:
    """("a", "bc") and ("ab", "c") are different items: lengths are part of what is signed."""
    assert signing.signed_bytes("a", "bc", b"") != signing.signed_bytes("ab", "c", b"")
    assert signing.signed_bytes("a", "", b"b") != signing.signed_bytes("a", "b", b"")
    headers = ROUTER.sign("a", "bc", b"x")
    with pytest.raises(SignatureError):
        Verifier([ROUTER.key]).verify(headers, "ab", "c", b"x")


def test_unsigned_untrusted_and_keyless_items_fail_with_what_to_do() -> None:
    verifier = Verifier([ROUTER.key])
    with pytest.raises(SignatureError, match=r"^signature: the work item is not signed.*only the router"):
        verifier.verify({}, SUBJECT, MSG_ID, PAYLOAD)
    with pytest.raises(SignatureError, match="not signed"):
        verifier.verify(None, SUBJECT, MSG_ID, PAYLOAD)
    forged = OTHER.sign(SUBJECT, MSG_ID, PAYLOAD)
    with pytest.raises(
        SignatureError, match=f"signed by key '{OTHER.key}', which this runner does not trust"
    ):
        verifier.verify(forged, SUBJECT, MSG_ID, PAYLOAD)
    # a forger naming the trusted key over its own signature
    mixed = {**forged, signing.KEY_HEADER: ROUTER.key}
    with pytest.raises(SignatureError, match="does not match"):
        verifier.verify(mixed, SUBJECT, MSG_ID, PAYLOAD)
    keyless = {signing.SIGNATURE_HEADER: forged[signing.SIGNATURE_HEADER]}
    with pytest.raises(SignatureError, match="no Taskerman-Key header"):
        verifier.verify(keyless, SUBJECT, MSG_ID, PAYLOAD)
    garbled = {**ROUTER.sign(SUBJECT, MSG_ID, PAYLOAD), signing.SIGNATURE_HEADER: "%%%not base64"}
    with pytest.raises(SignatureError, match="does not match"):
        verifier.verify(garbled, SUBJECT, MSG_ID, PAYLOAD)


def test_rotation_trusts_every_listed_key() -> None:
    verifier = Verifier([ROUTER.key, OTHER.key])
    for signer in (ROUTER, OTHER):
        assert verifier.verify(signer.sign(SUBJECT, MSG_ID, PAYLOAD), SUBJECT, MSG_ID, PAYLOAD) == signer.key


@pytest.mark.parametrize(
    "key",
    [
        "",
        "not a key",
        "U" * 56,  # right length, bad checksum
        signing.new_seed().decode()[:56],  # a seed's start is no public key
    ],
)
def test_a_bad_trusted_key_is_a_clear_error(key: str) -> None:
    with pytest.raises(SigningConfigError, match="is not a public nkey"):
        Verifier([ROUTER.key, key])


def test_a_flipped_character_breaks_the_checksum() -> None:
    flipped = ROUTER.key[:-3] + ("A" if ROUTER.key[-3] != "A" else "B") + ROUTER.key[-2:]
    with pytest.raises(SigningConfigError):
        signing.parse_public_key(flipped)


def test_seed_files(tmp_path: Path) -> None:
    key = signing.write_seed(tmp_path / "keys" / "router.nk")
    path = tmp_path / "keys" / "router.nk"
    assert path.stat().st_mode & 0o777 == 0o600
    assert Signer.load(path).key == key
    with pytest.raises(FileExistsError):
        signing.write_seed(path)
    seed = path.read_bytes().strip()
    creds = tmp_path / "user.creds"  # the layout of a NATS creds file
    creds.write_bytes(
        b"-----BEGIN NATS USER JWT-----\neyJ0eXAi.e30.sig\n------END NATS USER JWT------\n\n"
        b"-----BEGIN USER NKEY SEED-----\n" + seed + b"\n------END USER NKEY SEED------\n"
    )
    assert signing.public_key(signing.read_seed(creds)) == key
    junk = tmp_path / "junk"
    junk.write_text("SOMETHING ELSE\n")
    with pytest.raises(SigningConfigError, match="holds no nkey seed"):
        signing.read_seed(junk)
    with pytest.raises(SigningConfigError, match="cannot read the seed file"):
        signing.read_seed(tmp_path / "missing")


def test_secure_by_default(tmp_path: Path) -> None:
    with pytest.raises(SigningConfigError, match=r"TASKERMAN_ROUTER_SEED_FILE.*TASKERMAN_INSECURE=1"):
        signing.signer_for(Settings())
    with pytest.raises(SigningConfigError, match=r"TASKERMAN_TRUSTED_ROUTER_KEYS.*TASKERMAN_INSECURE=1"):
        signing.verifier_for(Settings())
    assert signing.signer_for(Settings(insecure=True)) is None
    assert signing.verifier_for(Settings(insecure=True)) is None
    key = signing.write_seed(tmp_path / "r.nk")
    settings = Settings(router_seed_file=tmp_path / "r.nk", trusted_router_keys=(key,), insecure=True)
    signer, verifier = signing.signer_for(settings), signing.verifier_for(settings)
    assert signer is not None  # keys given: used, insecure or not
    assert verifier is not None
    assert verifier.verify(signer.sign(SUBJECT, MSG_ID, PAYLOAD), SUBJECT, MSG_ID, PAYLOAD) == key


def test_settings_carry_the_keys_to_children(tmp_path: Path) -> None:
    env = {
        "TASKERMAN_ROUTER_SEED_FILE": str(tmp_path / "r.nk"),
        "TASKERMAN_ADMIN_SEED_FILE": str(tmp_path / "a.nk"),
        "TASKERMAN_TRUSTED_ROUTER_KEYS": f" {ROUTER.key}, {OTHER.key} ,",
        "TASKERMAN_INSECURE": "1",
    }
    settings = Settings.from_env(env)
    assert settings.router_seed_file == tmp_path / "r.nk"
    assert settings.admin_seed_file == tmp_path / "a.nk"
    assert settings.trusted_router_keys == (ROUTER.key, OTHER.key)
    assert settings.insecure
    assert Settings.from_env(settings.env()) == settings
    assert Settings.from_env(Settings().env()) == Settings()
    with pytest.raises(ValueError, match="TASKERMAN_INSECURE='maybe': use 1"):
        Settings.from_env({"TASKERMAN_INSECURE": "maybe"})
