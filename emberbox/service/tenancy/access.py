"""Who is calling: API keys to tenants, local mode, ownership checks and the audit log.

- A request with a key (``Authorization: Bearer KEY`` or ``X-API-Key: KEY``) is its
  key's tenant. The key is rate limited first (in memory), then looked up by id on every
  request, so a revoked key fails on its next request. ``Settings.api_key`` is an admin
  key of the built-in tenant ``local``.
- Local mode: no ``Settings.api_key``, no active key in the database, the server on
  loopback and the request too (its client and server addresses, and a Host that names
  this machine: ``policy.keyless_refusal``). A request without a key is then the
  built-in tenant (an admin). Once any key exists, a request without a valid one is
  refused.
- Admins see every tenant's objects; any other tenant's ids answer as unknown ids do.

The service has its own connection to the database (a second :class:`Store`), opened on
first use, so that checking keys never waits behind the manager's writes.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import anyio

from emberbox import errors
from emberbox.config import Settings
from emberbox.service.policy import keyless_refusal
from emberbox.service.tenancy.keys import parse_key, secret_matches
from emberbox.service.tenancy.ratelimit import RateLimiter
from emberbox.service.tenancy.sockets import SocketSlots
from emberbox.service.tenancy.tickets import TicketBook
from emberbox.store import LOCAL_TENANT_ID as LOCAL_TENANT_ID  # the built-in tenant
from emberbox.store import Store, sandboxes, tenants, utcnow
from emberbox.store.connection import Connection
from emberbox.store.database import database_target
from emberbox.store.tenants import AuditEntry as AuditEntry  # the API builds them

log = logging.getLogger(__name__)

ENV_KEY_ID = "env"  # the key id audited for Settings.api_key
TOUCH_INTERVAL_S = 60.0  # last_used_at is written at most this often per key
AUDIT_PRUNE_INTERVAL_S = 600.0  # the audit log is pruned at most this often
# Wrong keys per client address: a burst, then one a second (then 429 without a lookup).
FAILED_AUTH_BURST = 20
FAILED_AUTH_PER_S = 1.0
Kind = Literal["sandbox", "snapshot"]
_TABLES: dict[Kind, str] = {"sandbox": "sandboxes", "snapshot": "snapshots"}

MISSING_KEY = "missing API key: send Authorization: Bearer <key> (or X-API-Key: <key>)"
WRONG_KEY = "wrong, unknown or revoked API key"


@dataclass(frozen=True)
class Principal:
    """The caller: a tenant, whether it is an admin, and the key it used."""

    tenant_id: str
    tenant_name: str
    admin: bool
    key_id: str | None  # None in local mode

    def sees(self, owner: str | None) -> bool:
        return owner is not None and (self.admin or owner == self.tenant_id)


LOCAL = Principal(LOCAL_TENANT_ID, LOCAL_TENANT_ID, admin=True, key_id=None)


class Tenancy:
    """Authentication, rate limits, ownership and audit for one server."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self.limiter = RateLimiter(
            settings.rate_limit_per_s, settings.rate_limit_burst, clock=clock
        )
        secret = settings.api_key.get_secret_value() if settings.api_key is not None else ""
        self._env_key = secret.encode() if secret else None
        self.failures = RateLimiter(FAILED_AUTH_PER_S, FAILED_AUTH_BURST, clock=clock)
        # Browsers open terminals with these instead of a key (docs/console.md).
        self.tickets = TicketBook(settings.pty_ticket_ttl_s, settings.pty_tickets_max, clock=clock)
        self.sockets = SocketSlots(settings.tenant_max_websockets)  # open WebSockets
        self._clock = clock
        self._store: Store | None = None
        self._opening = anyio.Lock()
        self._touched: dict[str, float] = {}
        self._pruned_at: float | None = None

    async def store(self) -> Store:
        """The tenancy connection, opened (and the schema migrated) on first use."""
        async with self._opening:
            if self._store is None or self._store.closed:
                # A cluster's PostgreSQL (database_url) when set, else the SQLite file.
                self._store = await Store.open(database_target(self._settings))
            return self._store

    async def close(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            await store.close()

    # -- authentication --------------------------------------------------------------------

    async def authenticate(
        self,
        token: str | None,
        client: str = "",
        *,
        server: str = "",
        host_header: str | None = None,
    ) -> Principal:
        """The caller of a request that sent ``token`` (None: no key) from the address
        ``client`` to the address ``server`` (the connection's; "" for a Unix socket),
        naming ``host_header`` as its Host. Unauthorized or RateLimited otherwise."""
        if token:
            return await self._verify(token, client)
        if self._env_key is not None:
            raise errors.Unauthorized(MISSING_KEY)
        refusal = keyless_refusal(
            self._settings, client=client, server=server, host_header=host_header
        )
        if refusal is not None:
            raise errors.Unauthorized(f"{MISSING_KEY}; {refusal}")
        if self._settings.mode == "production":  # never fall back to keyless admin
            raise errors.Unauthorized(f"{MISSING_KEY}; production mode needs keys")
        store = await self.store()
        if await store.call(tenants.any_active_key):
            raise errors.Unauthorized(MISSING_KEY)
        return LOCAL

    async def _verify(self, token: str, client: str) -> Principal:
        """The key is looked up first: a valid key is never refused for failures of
        others behind the same address; only wrong keys are charged to, and locked out
        by, the address (a malformed one costs no lookup)."""
        if self._env_key is not None and hmac.compare_digest(token.encode(), self._env_key):
            self._limit(ENV_KEY_ID)
            return Principal(LOCAL_TENANT_ID, LOCAL_TENANT_ID, admin=True, key_id=ENV_KEY_ID)
        locked_s = self.failures.wait(client)
        principal = None
        if locked_s <= 0 or parse_key(token) is not None:
            principal = await self._lookup(token)
        if principal is None or principal.key_id is None:
            wait_s = locked_s if locked_s > 0 else self.failures.take(client)
            if wait_s > 0:  # guessing keys from this address
                raise errors.RateLimited(
                    f"too many failed authentications from {client or 'this client'}; "
                    f"retry in {wait_s:.2f} s",
                    retry_after_s=wait_s,
                    quota="failed_auth",
                )
            raise errors.Unauthorized(WRONG_KEY)
        self._limit(principal.key_id)  # only now: nobody can spend another key's budget
        return principal

    async def _lookup(self, token: str) -> Principal | None:
        """The principal of a well-formed, known, unrevoked key with the right secret."""
        parsed = parse_key(token)
        if parsed is None:
            return None
        key_id, secret = parsed
        store = await self.store()
        found = await store.call(lambda conn: tenants.key_with_tenant(conn, key_id))
        if found is None:
            return None
        key, tenant = found
        if key.revoked_at is not None or not secret_matches(secret, key.key_hash):
            return None
        await self._touch(store, key_id)
        return Principal(tenant.id, tenant.name, tenant.admin, key_id)

    def _limit(self, key_id: str) -> None:
        wait_s = self.limiter.take(key_id)
        if wait_s > 0:
            rate, burst = self._settings.rate_limit_per_s, self._settings.rate_limit_burst
            raise errors.RateLimited(
                f"rate limit exceeded for key {key_id}: at most {rate:g} requests/s "
                f"(bursts of {burst}); retry in {wait_s:.2f} s",
                retry_after_s=wait_s,
                quota="rate_limit_per_s",
            )

    async def _touch(self, store: Store, key_id: str) -> None:
        now = self._clock()
        last = self._touched.get(key_id)
        if last is not None and now - last < TOUCH_INTERVAL_S:
            return
        self._touched[key_id] = now
        at = utcnow()
        try:
            await store.call(lambda conn: tenants.touch_key(conn, key_id, at))
        except Exception:  # bookkeeping: never fail the request for it
            log.exception("could not record the use of key %s", key_id)

    # -- ownership -------------------------------------------------------------------------

    async def check_owner(self, principal: Principal, kind: Kind, object_id: str) -> None:
        """NotFound, worded as for an unknown id, unless ``principal`` may see it."""
        if principal.admin:
            return
        store = await self.store()
        table = _TABLES[kind]
        owner = await store.call(lambda conn: tenants.owner_of(conn, table, object_id))
        if not principal.sees(owner):
            raise errors.NotFound(f"no {kind} {object_id}", **{f"{kind}_id": object_id})

    # -- audit -----------------------------------------------------------------------------

    async def audit(self, entry: AuditEntry) -> None:
        """Append to the audit log (its detail cut to a byte limit, old entries pruned
        now and then); a failure is logged, never raised."""
        try:
            store = await self.store()
            await store.call(lambda conn: tenants.insert_audit(conn, entry))
            await self._prune_audit(store)
        except Exception:
            log.exception("could not write the audit log entry %s", entry)

    async def _prune_audit(self, store: Store) -> None:
        """At most every AUDIT_PRUNE_INTERVAL_S (audited writes are what makes the store
        grow): audit entries past ``audit_retention_days`` and beyond ``audit_max_rows``;
        exec log entries likewise; rows of sandboxes ended ``ended_sandbox_retention_days``
        ago that no snapshot names."""
        now = self._clock()
        if self._pruned_at is not None and now - self._pruned_at < AUDIT_PRUNE_INTERVAL_S:
            return
        self._pruned_at = now
        settings, at = self._settings, utcnow()

        def prune(conn: Connection) -> tuple[int, int, int]:
            audit = tenants.prune_audit(
                conn,
                before=at - timedelta(days=settings.audit_retention_days),
                keep_rows=settings.audit_max_rows,
            )
            ended, execs = sandboxes.prune_history(
                conn,
                ended_before=at - timedelta(days=settings.ended_sandbox_retention_days),
                execs_before=at - timedelta(days=settings.exec_log_retention_days),
                max_execs=settings.exec_log_max_rows,
            )
            return audit, ended, execs

        audit, ended, execs = await store.call(prune)
        if audit or ended or execs:
            log.info(
                "retention: pruned %d audit entries, %d ended sandboxes, %d exec log entries",
                audit,
                ended,
                execs,
            )

    async def audit_log(
        self, *, tenant: str | None = None, action: str | None = None, limit: int = 100
    ) -> list[tuple[AuditEntry, str]]:
        """Entries, newest first, with their tenant's name; ``tenant`` is a name or id."""
        store = await self.store()
        return await store.call(lambda conn: read_audit(conn, tenant, action, limit))


def read_audit(
    conn: Connection, tenant: str | None, action: str | None, limit: int
) -> list[tuple[AuditEntry, str]]:
    """(Blocking; the server and ``emberbox audit``) audit entries with tenant names."""
    names = {row.id: row.name for row in tenants.list_tenants(conn)}
    tenant_id = None
    if tenant is not None:
        by_name = {name: tid for tid, name in names.items()}
        tenant_id = by_name.get(tenant, tenant)
    entries = tenants.list_audit(conn, tenant_id=tenant_id, action=action, limit=limit)
    return [(entry, names.get(entry.tenant_id, entry.tenant_id)) for entry in entries]
