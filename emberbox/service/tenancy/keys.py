"""API keys: their format, hashing, and creating and revoking them (``emberbox keys``).

A key is ``eb_<key id>_<secret>``: 12 hex digits that name the key's row and 64 hex
digits (256 random bits) of secret. The store keeps the SHA-256 of the secret, never the
secret: a secret this long needs no slow hash, and a request is checked with one lookup
by id and a constant-time comparison. The key is printed once, when created.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from emberbox import errors
from emberbox.store import tenants
from emberbox.store.connection import Connection
from emberbox.store.db import transaction
from emberbox.store.records import LOCAL_TENANT_ID, utcnow
from emberbox.store.tenants import AuditEntry, KeyRow, TenantRow

KEY_ID_BYTES = 6
SECRET_BYTES = 32
_KEY_PATTERN = re.compile(r"eb_([0-9a-f]{12})_([0-9a-f]{64})")
# The same key spelt for E2B SDKs, which want ``e2b_<hex>`` (docs/e2b.md).
_E2B_PATTERN = re.compile(r"e2b_([0-9a-f]{12})([0-9a-f]{64})")
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


@dataclass(frozen=True)
class NewKey:
    """A key just made: ``key`` is shown once and stored nowhere."""

    key: str
    key_id: str
    tenant: TenantRow
    tenant_created: bool


def make_key() -> tuple[str, str, str]:
    """A fresh ``(key, key_id, hash of its secret)``."""
    key_id = secrets.token_hex(KEY_ID_BYTES)
    secret = secrets.token_hex(SECRET_BYTES)
    return f"eb_{key_id}_{secret}", key_id, hash_secret(secret)


def parse_key(text: str) -> tuple[str, str] | None:
    """``(key_id, secret)`` of a well-formed key, else None."""
    found = _KEY_PATTERN.fullmatch(text) or _E2B_PATTERN.fullmatch(text)
    return (found.group(1), found.group(2)) if found else None


def e2b_form(key: str) -> str:
    """``eb_ID_SECRET`` as ``e2b_IDSECRET``: the same key, in the shape E2B SDKs accept."""
    parsed = parse_key(key)
    if parsed is None:
        raise errors.InvalidRequest("not an emberbox API key")
    return f"e2b_{parsed[0]}{parsed[1]}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, key_hash: str) -> bool:
    """Constant-time: the time taken does not tell how much of the hash matched."""
    return hmac.compare_digest(hash_secret(secret), key_hash)


def check_tenant_name(name: str) -> None:
    if not _NAME_PATTERN.fullmatch(name):
        raise errors.InvalidRequest(
            f"invalid tenant name {name!r}: 1-64 characters of letters, digits, ._@- "
            "(starting with a letter or digit)"
        )
    if name == LOCAL_TENANT_ID:
        raise errors.InvalidRequest(f"{name!r} is the built-in tenant's name; choose another")


def create_key(
    conn: Connection,
    name: str,
    *,
    admin: bool = False,
    quotas: dict[str, int] | None = None,
) -> NewKey:
    """A new key for tenant ``name``, made (with ``admin`` and ``quotas``) when new; for an
    existing tenant, ``admin=True`` and the given quotas update it. Audited."""
    check_tenant_name(name)
    quotas = dict(quotas or {})
    unknown = set(quotas) - set(tenants.QUOTA_NAMES)
    if unknown:
        raise errors.InvalidRequest(f"unknown quotas {sorted(unknown)}")
    key, key_id, key_hash = make_key()
    now = utcnow()
    with transaction(conn):
        tenant = tenants.tenant_by_name(conn, name)
        created = tenant is None
        if tenant is None:
            tenant = TenantRow(
                id="tn-" + secrets.token_hex(KEY_ID_BYTES),
                name=name,
                admin=admin,
                created_at=now,
                **quotas,
            )
            tenants.insert_tenant(conn, tenant)
        else:
            tenants.update_tenant(conn, tenant.id, admin=True if admin else None, quotas=quotas)
            tenant = tenants.get_tenant(conn, tenant.id) or tenant
        tenants.insert_key(conn, KeyRow(key_id, tenant.id, key_hash, now))
        detail = {"tenant": name, "admin": tenant.admin, "quotas": tenant.overrides()}
        tenants.insert_audit(
            conn, AuditEntry(LOCAL_TENANT_ID, "key.create", "ok", now, None, key_id, detail)
        )
    return NewKey(key, key_id, tenant, created)


def revoke(conn: Connection, key_id_or_name: str) -> list[str]:
    """Revoke one key (by id) or every key of a tenant (by name); returns the key ids
    revoked now. NotFound when the argument names neither. Audited."""
    now = utcnow()
    with transaction(conn):
        keys = tenants.list_keys(conn)
        chosen = [k.id for k in keys if k.id == key_id_or_name]
        if not chosen:
            tenant = tenants.tenant_by_name(conn, key_id_or_name)
            if tenant is None:
                raise errors.NotFound(f"no key or tenant {key_id_or_name!r} (see `keys list`)")
            chosen = [k.id for k in keys if k.tenant_id == tenant.id]
        revoked = tenants.revoke_keys(conn, chosen, now)
        for key_id in revoked:
            entry = AuditEntry(LOCAL_TENANT_ID, "key.revoke", "ok", now, None, key_id)
            tenants.insert_audit(conn, entry)
    return revoked
