"""API keys: a token is shown once at creation; the database keeps only a salted hash of it.

A token reads `cav_<key id>_<secret>`. The key id is public (it names the key in listings and
logs); the secret is 32 random bytes, URL-safe base64, and is never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from sqlalchemy.orm import Session

from caviar.db.tables import ApiKey, utcnow

TOKEN_PREFIX = "cav_"
_KEY_ID = re.compile(r"[0-9a-f]{24}")
# Compared against when a token names no key, so unknown ids cost as much time as wrong secrets.
_DUMMY_SALT = secrets.token_hex(16)
_DUMMY_HASH = hashlib.sha256(_DUMMY_SALT.encode()).hexdigest()


def _hash(salt: str, secret: str) -> str:
    return hashlib.sha256((salt + secret).encode()).hexdigest()


def create_key(session: Session, owner: str, name: str) -> tuple[ApiKey, str]:
    """Add a key for `owner`; returns it and its token, which cannot be recovered later."""
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    key = ApiKey(
        id=secrets.token_hex(12), owner=owner, name=name, salt=salt, hash=_hash(salt, secret)
    )
    session.add(key)
    session.flush()
    return key, f"{TOKEN_PREFIX}{key.id}_{secret}"


def authenticate(session: Session, token: str) -> ApiKey | None:
    """The live key `token` belongs to, its `last_used_at` set to now; None for any bad token."""
    key_id, _, secret = token.removeprefix(TOKEN_PREFIX).partition("_")
    if not token.startswith(TOKEN_PREFIX) or not _KEY_ID.fullmatch(key_id) or not secret:
        return None
    key = session.get(ApiKey, key_id)
    salt, expected = (key.salt, key.hash) if key else (_DUMMY_SALT, _DUMMY_HASH)
    matches = hmac.compare_digest(_hash(salt, secret), expected)
    if key is None or not matches or key.revoked_at is not None:
        return None
    key.last_used_at = utcnow()
    return key


def revoke_key(session: Session, key_id: str, owner: str) -> bool:
    """Revoke `owner`'s key `key_id` (again is harmless); False when `owner` has no such key."""
    key = session.get(ApiKey, key_id)
    if key is None or key.owner != owner:
        return False
    key.revoked_at = key.revoked_at or utcnow()
    return True
