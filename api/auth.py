"""API keys: made by `swav-service create-key`, checked on every /v1 request.

A key is `swav_` + 43 URL-safe characters (32 random bytes). Only its sha256 is stored:
the key has 256 bits of entropy, so a plain hash cannot be brute-forced and needs no salt
or slow KDF. The key's first 13 characters (`swav_` + 8) are its `prefix`, stored in clear
to find the row and to tell keys apart in listings; the digest of the presented key is then
compared with `hmac.compare_digest`, also when no row matched (against a dummy digest), so
the answer takes the same time whether the prefix exists or the key is revoked. Missing,
unknown and revoked keys all get the same 401.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from swav_service.models import ApiKey, new_id, utcnow

KEY_SCHEME = "swav_"
PREFIX_CHARS = len(KEY_SCHEME) + 8
KEY_BYTES = 32
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
LOCAL_TENANT = "local"  # every request's tenant when authentication is off
_DUMMY_DIGEST = hashlib.sha256(b"no such key").hexdigest()


class ApiKeyError(ValueError):
    """A key operation that cannot be done (bad tenant name, unknown key to revoke)."""


def hash_key(key: str) -> str:
    """The stored form of a key: its sha256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_prefix(key: str) -> str:
    return key[:PREFIX_CHARS]


def check_tenant_name(tenant: str) -> str:
    """`tenant` if it is 1-100 letters, digits, `.`, `_` or `-` (starting alphanumeric)."""
    if not TENANT_PATTERN.fullmatch(tenant):
        raise ApiKeyError(
            f"tenant {tenant[:100]!r} is not valid: use 1-100 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit"
        )
    return tenant


def create_key(session: Session, tenant: str, name: str | None = None) -> tuple[ApiKey, str]:
    """A new key for `tenant`: (its committed row, the key itself, shown only now)."""
    check_tenant_name(tenant)
    if name is not None and len(name) > 200:
        raise ApiKeyError("name: at most 200 characters")
    for _ in range(5):  # a prefix collision (1 in 2**48 per pair) draws a new key
        key = KEY_SCHEME + secrets.token_urlsafe(KEY_BYTES)
        row = ApiKey(
            id=new_id("key"), tenant=tenant, name=name, prefix=key_prefix(key),
            key_hash=hash_key(key),
        )
        session.add(row)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            continue
        return row, key
    raise RuntimeError("could not draw an unused key prefix")


def find_keys(session: Session, id_or_prefix: str) -> Sequence[ApiKey]:
    """Keys whose id or prefix is `id_or_prefix` (a prefix may be given without `swav_`)."""
    prefixes = {id_or_prefix, KEY_SCHEME + id_or_prefix}
    return session.scalars(
        select(ApiKey).where(or_(ApiKey.id == id_or_prefix, ApiKey.prefix.in_(prefixes)))
    ).all()


def revoke_key(session: Session, id_or_prefix: str) -> ApiKey:
    """Revoke one key by id or prefix (already revoked: unchanged); ApiKeyError if none."""
    rows = find_keys(session, id_or_prefix)
    if len(rows) != 1:
        raise ApiKeyError(f"no API key with id or prefix {id_or_prefix!r}; see list-keys")
    row = rows[0]
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def list_keys(session: Session, tenant: str | None = None) -> Sequence[ApiKey]:
    statement = select(ApiKey).order_by(ApiKey.tenant, ApiKey.created_at)
    if tenant is not None:
        statement = statement.where(ApiKey.tenant == tenant)
    return session.scalars(statement).all()


def authenticate(session: Session, key: str) -> str | None:
    """The tenant of a valid, unrevoked key; None for any other string.

    One indexed lookup by prefix, then a constant-time comparison of digests that runs
    whether or not a row was found, so timing does not tell which case failed.
    """
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == key_prefix(key)))
    matches = hmac.compare_digest(hash_key(key), row.key_hash if row else _DUMMY_DIGEST)
    if row is None or not matches or row.revoked_at is not None:
        return None
    return row.tenant
