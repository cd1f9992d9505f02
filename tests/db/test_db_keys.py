"""API keys on both backends: the token is shown once, only a salted hash is kept."""

from __future__ import annotations

import hashlib
from datetime import UTC

import pytest
from sqlalchemy import text

from caviar.db.keys import TOKEN_PREFIX, authenticate, create_key, revoke_key
from caviar.db.session import session_scope


@pytest.fixture
def key(migrated_url) -> tuple[str, str]:
    """The id and token of alice's new key."""
    with session_scope(migrated_url) as session:
        api_key, token = create_key(session, "alice", "laptop")
        return api_key.id, token


def test_token_names_the_key_and_only_a_salted_hash_is_stored(migrated_url, key):
    key_id, token = key
    assert token.startswith(f"{TOKEN_PREFIX}{key_id}_")
    secret = token.removeprefix(f"{TOKEN_PREFIX}{key_id}_")
    assert len(secret) >= 43
    with session_scope(migrated_url) as session:
        row = session.execute(text("SELECT * FROM caviar_api_keys")).mappings().one()
    assert (row["id"], row["owner"], row["name"]) == (key_id, "alice", "laptop")
    assert row["hash"] == hashlib.sha256((row["salt"] + secret).encode()).hexdigest()
    assert not any(secret in str(value) or token in str(value) for value in row.values())


def test_keys_get_distinct_ids_salts_and_secrets(migrated_url):
    with session_scope(migrated_url) as session:
        (a, token_a), (b, token_b) = (create_key(session, "alice", n) for n in ("a", "b"))
        assert len({a.id, b.id}) == len({a.salt, b.salt}) == len({token_a, token_b}) == 2


def test_authenticate_returns_the_key_and_records_its_use(migrated_url, key):
    key_id, token = key
    with session_scope(migrated_url) as session:
        api_key = authenticate(session, token)
        assert api_key is not None
        assert (api_key.id, api_key.owner) == (key_id, "alice")
    with session_scope(migrated_url) as session:
        api_key = authenticate(session, token)
        assert api_key is not None
        first_use = api_key.last_used_at
    assert first_use is not None and first_use.tzinfo is UTC
    with session_scope(migrated_url) as session:
        api_key = authenticate(session, token)
        assert api_key is not None and api_key.last_used_at is not None
        assert api_key.last_used_at > first_use


def test_bad_tokens_authenticate_nobody(migrated_url, key):
    key_id, token = key
    secret = token.removeprefix(f"{TOKEN_PREFIX}{key_id}_")
    bad = [
        f"{token}x",  # wrong secret
        f"{TOKEN_PREFIX}{'0' * 24}_{secret}",  # unknown id
        f"{TOKEN_PREFIX}{key_id}_",
        f"{TOKEN_PREFIX}{key_id}",
        f"{key_id}_{secret}",
        f"Bearer {token}",
        f"{TOKEN_PREFIX}{key_id.upper()}_{secret}",
        f"{TOKEN_PREFIX}{'0' * 1000}_{secret}",
        TOKEN_PREFIX,
        "",
        "cav_é_ü",
    ]
    with session_scope(migrated_url) as session:
        assert [authenticate(session, t) for t in bad] == [None] * len(bad)
        assert authenticate(session, token) is not None


def test_revoked_keys_authenticate_nobody(migrated_url, key):
    key_id, token = key
    with session_scope(migrated_url) as session:
        assert not revoke_key(session, key_id, "mallory")
        assert not revoke_key(session, "0" * 24, "alice")
        assert authenticate(session, token) is not None
    with session_scope(migrated_url) as session:
        assert revoke_key(session, key_id, "alice")
    with session_scope(migrated_url) as session:
        assert authenticate(session, token) is None
        assert revoke_key(session, key_id, "alice")  # revoking again is harmless
