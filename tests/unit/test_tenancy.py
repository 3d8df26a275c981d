"""Tenancy without VMs: key format and hashing, token buckets, quota arithmetic, key
checks against a real SQLite database, and the HTTP layer's headers (over the fakes)."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from emberbox import errors
from emberbox.api import create_app
from emberbox.config import Settings
from emberbox.service.tenancy import keys, quotas
from emberbox.service.tenancy.access import FAILED_AUTH_BURST, LOCAL, Tenancy
from emberbox.service.tenancy.ratelimit import RateLimiter, TokenBucket
from emberbox.store import LOCAL_TENANT_ID, tenants, utcnow
from emberbox.store.db import connect
from tests.support.fakes_manager import FakeManager, FakeRegistry

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")


@pytest.fixture
def db(settings: Settings) -> Iterator[sqlite3.Connection]:
    """The data dir's database, as `emberbox keys` opens it."""
    conn = connect(settings.db_path)
    yield conn
    conn.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- key format ------------------------------------------------------------------------------


def test_keys_parse_and_only_their_secret_matches_the_hash() -> None:
    """A made key parses back into its id and secret; the stored hash is the secret's
    SHA-256 and matches only that secret."""
    key, key_id, key_hash = keys.make_key()
    parsed = keys.parse_key(key)
    assert parsed is not None and parsed[0] == key_id
    secret = parsed[1]
    assert len(secret) == 64 and secret not in key_hash
    assert key_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert keys.secret_matches(secret, key_hash)
    assert not keys.secret_matches(secret[:-1] + ("0" if secret[-1] != "0" else "1"), key_hash)
    assert keys.make_key()[0] != key


@pytest.mark.parametrize(
    "text",
    ["", "eb_", "eb_abc_def", "xx_0123456789ab_" + "0" * 64, "eb_0123456789ab_" + "0" * 63,
     "eb_0123456789AB_" + "0" * 64, " eb_0123456789ab_" + "0" * 64, "eb_0123456789ab_" + "g" * 64],
)  # fmt: skip
def test_malformed_keys_do_not_parse(text: str) -> None:
    """Anything but eb_<12 hex>_<64 hex> is refused before the database is asked."""
    assert keys.parse_key(text) is None


def test_create_and_revoke_keys_store_only_hashes(db: sqlite3.Connection) -> None:
    """create_key makes the tenant once (quotas, admin), revoke works by id or by tenant
    name, and the secret is in no table; each change is audited."""
    first = keys.create_key(db, "alice", quotas={"max_sandboxes": 2})
    second = keys.create_key(db, "alice", admin=True)
    assert first.tenant_created and not second.tenant_created
    assert second.tenant.id == first.tenant.id and second.tenant.admin
    assert second.tenant.overrides() == {"max_sandboxes": 2}
    dump = "\n".join(db.iterdump())
    assert first.key.split("_")[2] not in dump and second.key.split("_")[2] not in dump
    assert keys.revoke(db, first.key_id) == [first.key_id]
    assert keys.revoke(db, first.key_id) == []
    assert keys.revoke(db, "alice") == [second.key_id]
    assert not tenants.any_active_key(db)
    with pytest.raises(errors.NotFound, match="nobody"):
        keys.revoke(db, "nobody")
    actions = [e.action for e in tenants.list_audit(db)]
    assert actions == ["key.revoke", "key.revoke", "key.create", "key.create"]
    with pytest.raises(errors.InvalidRequest, match="built-in"):
        keys.create_key(db, LOCAL_TENANT_ID)


# --- token buckets ---------------------------------------------------------------------------


def test_bucket_allows_a_burst_then_the_rate() -> None:
    """burst requests pass at once, the next waits 1/rate s; time refills it."""
    bucket = TokenBucket(rate_per_s=10.0, burst=5, tokens=5.0, updated=0.0)
    assert [bucket.take(0.0) for _ in range(5)] == [0.0] * 5
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.05) == pytest.approx(0.05)
    assert bucket.take(0.1) == 0.0
    assert bucket.take(100.0) == 0.0 and bucket.tokens == pytest.approx(4.0)  # capped


def test_limiter_keeps_keys_apart_and_drops_full_buckets() -> None:
    """One key's flood does not touch another's bucket; the table stays bounded."""
    clock = Clock()
    limiter = RateLimiter(20.0, 3, clock=clock, max_buckets=4)
    assert [limiter.take("a") for _ in range(3)] == [0.0] * 3
    assert limiter.take("a") > 0
    assert limiter.take("b") == 0.0
    for name in ("c", "d", "e", "f"):
        limiter.take(name)
    assert len(limiter) <= 4
    clock.now += 1.0
    assert limiter.take("a") == 0.0


# --- quota arithmetic ------------------------------------------------------------------------


def test_limits_come_from_overrides_then_settings(settings: Settings) -> None:
    """A tenant's own quotas win; the built-in tenant has none."""
    tenant = tenants.TenantRow("tn-1", "a", False, utcnow(), max_vcpus=1)
    limits = quotas.limits_for(settings, tenant)
    assert limits == quotas.TenantLimits(
        max_sandboxes=settings.tenant_max_sandboxes,
        max_vcpus=1,
        max_memory_mib=settings.tenant_max_memory_mib,
        max_snapshots=settings.tenant_max_snapshots,
    )
    local = tenants.TenantRow(LOCAL_TENANT_ID, "local", True, utcnow(), max_vcpus=1)
    assert quotas.limits_for(settings, local) is None


@pytest.mark.parametrize(
    ("usage", "vcpus", "memory", "quota"),
    [
        (tenants.Usage(sandboxes=2), 1, 64, "max_sandboxes"),
        (tenants.Usage(sandboxes=1, vcpus=3), 2, 64, "max_vcpus"),
        (tenants.Usage(sandboxes=1, memory_mib=900), 1, 200, "max_memory_mib"),
    ],
)
def test_the_first_quota_passed_is_named(
    usage: tenants.Usage, vcpus: int, memory: int, quota: str
) -> None:
    """QuotaExceeded names the quota in its message and details."""
    limits = quotas.TenantLimits(max_sandboxes=2, max_vcpus=4, max_memory_mib=1024, max_snapshots=1)
    with pytest.raises(errors.QuotaExceeded) as caught:
        quotas.check_sandbox(limits, usage, vcpus, memory)
    assert caught.value.details["quota"] == quota and quota in caught.value.message
    quotas.check_sandbox(limits, tenants.Usage(1, 2, 512), 2, 512)  # exactly full: fits
    with pytest.raises(errors.QuotaExceeded, match="max_snapshots=1"):
        quotas.check_snapshot(limits, tenants.Usage(snapshots=1))


# --- authentication against the database ---------------------------------------------------


async def test_local_mode_until_a_key_exists(settings: Settings, db: sqlite3.Connection) -> None:
    """No key anywhere: a keyless caller is the built-in admin; once a key exists it is
    refused, the key works, and after revocation the key fails on its next use."""
    tenancy = Tenancy(settings)
    try:
        assert await tenancy.authenticate(None) == LOCAL
        made = keys.create_key(db, "alice")
        with pytest.raises(errors.Unauthorized, match="missing API key"):
            await tenancy.authenticate(None)
        principal = await tenancy.authenticate(made.key)
        assert (principal.tenant_name, principal.admin, principal.key_id) == (
            "alice",
            False,
            made.key_id,
        )
        wrong = made.key[:-1] + ("0" if made.key[-1] != "0" else "1")
        for bad in (wrong, "nonsense", "eb_000000000000_" + "0" * 64):
            with pytest.raises(errors.Unauthorized):
                await tenancy.authenticate(bad)
        keys.revoke(db, made.key_id)
        with pytest.raises(errors.Unauthorized, match="revoked"):
            await tenancy.authenticate(made.key)
        assert await tenancy.authenticate(None) == LOCAL  # no active key left
        used = tenants.key_with_tenant(db, made.key_id)
        assert used is not None and used[0].last_used_at is not None
    finally:
        await tenancy.close()


async def test_env_key_and_non_loopback_hosts(tmp_path: Path) -> None:
    """EMBERBOX_API_KEY is the built-in tenant's admin key and makes keys required; a
    server beyond loopback never serves a keyless request."""
    keyed = Tenancy(Settings(data_dir=tmp_path / "a", api_key="s3cret"))
    open_host = Tenancy(Settings(data_dir=tmp_path / "b", host="0.0.0.0"))
    try:
        principal = await keyed.authenticate("s3cret")
        assert principal.admin and principal.tenant_id == LOCAL_TENANT_ID
        assert principal.key_id == "env"
        with pytest.raises(errors.Unauthorized):
            await keyed.authenticate(None)
        with pytest.raises(errors.Unauthorized, match="beyond loopback"):
            await open_host.authenticate(None)
    finally:
        await keyed.close()
        await open_host.close()


async def test_a_flooding_key_is_rate_limited(settings: Settings, db: sqlite3.Connection) -> None:
    """Past its burst a key gets RateLimited with a retry time; another key is
    unaffected."""
    clock = Clock()
    small = settings.model_copy(update={"rate_limit_per_s": 2.0, "rate_limit_burst": 3})
    tenancy = Tenancy(small, clock=clock)
    a, b = keys.create_key(db, "a"), keys.create_key(db, "b")
    try:
        for _ in range(3):
            await tenancy.authenticate(a.key)
        with pytest.raises(errors.RateLimited) as caught:
            await tenancy.authenticate(a.key)
        assert caught.value.retry_after_s == pytest.approx(0.5)
        assert caught.value.status_code == 429
        assert (await tenancy.authenticate(b.key)).tenant_name == "b"
        clock.now += 0.5
        assert (await tenancy.authenticate(a.key)).tenant_name == "a"
    finally:
        await tenancy.close()


async def test_forged_keys_spend_the_guessers_budget_not_the_named_keys(
    settings: Settings, db: sqlite3.Connection
) -> None:
    """A wrong secret under another key's id charges the client's failure bucket, never
    that key's: the key keeps working while the guesser gets 429 failed_auth (without a
    database lookup) once past FAILED_AUTH_BURST."""
    clock = Clock()
    small = settings.model_copy(update={"rate_limit_per_s": 1.0, "rate_limit_burst": 2})
    tenancy = Tenancy(small, clock=clock)
    victim = keys.create_key(db, "victim")
    forged = f"eb_{victim.key_id}_" + "0" * 64
    try:
        for _ in range(FAILED_AUTH_BURST):
            with pytest.raises(errors.Unauthorized):
                await tenancy.authenticate(forged, "10.9.9.9")
        with pytest.raises(errors.RateLimited) as caught:
            await tenancy.authenticate(forged, "10.9.9.9")
        assert caught.value.details["quota"] == "failed_auth"
        for _ in range(2):  # the victim's whole burst is still there
            assert (await tenancy.authenticate(victim.key, "10.1.1.1")).tenant_name == "victim"
        with pytest.raises(errors.Unauthorized):  # another client may still try
            await tenancy.authenticate(forged, "10.2.2.2")
    finally:
        await tenancy.close()


async def test_production_never_serves_keyless(tmp_path: Path) -> None:
    """In production mode, no key anywhere is a 401, not the built-in admin."""
    tenancy = Tenancy(Settings(data_dir=tmp_path / "p", mode="production"))
    try:
        with pytest.raises(errors.Unauthorized, match="production mode needs keys"):
            await tenancy.authenticate(None)
    finally:
        await tenancy.close()


# --- the HTTP layer (fake manager) -----------------------------------------------------------


def _app(settings: Settings, tmp_path: Path) -> tuple[object, FakeManager]:
    registry = FakeRegistry(tmp_path / "images")
    manager = FakeManager(settings, registry)
    return create_app(settings, manager, registry=registry), manager  # type: ignore[arg-type]


async def test_both_headers_429_with_retry_after_and_health_exempt(
    settings: Settings, db: sqlite3.Connection, tmp_path: Path
) -> None:
    """Bearer and X-API-Key both work; a flood gets 429 RateLimited with a whole-second
    Retry-After; /healthz answers meanwhile."""
    small = settings.model_copy(update={"rate_limit_per_s": 1.0, "rate_limit_burst": 2})
    app, _ = _app(small, tmp_path)
    made = keys.create_key(db, "alice")
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        assert (await client.get("/v1/images")).status_code == 401
        bearer = {"Authorization": f"Bearer {made.key}"}
        assert (await client.get("/v1/images", headers=bearer)).status_code == 200
        x_key = {"X-API-Key": made.key}
        assert (await client.get("/v1/images", headers=x_key)).status_code == 200
        limited = await client.get("/v1/images", headers=x_key)
        assert limited.status_code == 429, limited.text
        assert limited.headers["Retry-After"] == "1"
        error = limited.json()["error"]
        assert error["type"] == "RateLimited" and "rate limit" in error["message"]
        assert (await client.get("/healthz")).status_code == 200
        malformed = await client.get("/v1/images", headers={"Authorization": "Basic x"})
        assert malformed.status_code == 401


async def test_actions_are_audited_and_the_log_is_for_admins(
    settings: Settings, db: sqlite3.Connection, tmp_path: Path
) -> None:
    """In local mode a create and an exec are audited with their outcome and argv; the
    log is served to admin keys only."""
    app, _ = _app(settings, tmp_path)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        created = (await client.post("/v1/sandboxes", json={})).json()
        run = await client.post(f"/v1/sandboxes/{created['id']}/exec", json={"cmd": ["echo", "hi"]})
        assert run.status_code == 200
        missing = await client.post("/v1/sandboxes/nope/exec", json={"cmd": ["true"]})
        assert missing.status_code == 404
        log = (await client.get("/v1/audit", params={"limit": 10})).json()["entries"]
        assert [(e["action"], e["outcome"]) for e in log] == [
            ("sandbox.exec", "NotFound"),
            ("sandbox.exec", "ok"),
            ("sandbox.create", "ok"),
        ]
        assert log[1]["detail"]["cmd"] == ["echo", "hi"] and log[1]["target_id"] == created["id"]
        assert log[2]["target_id"] == created["id"] and log[2]["tenant"] == "local"
        alice, root = keys.create_key(db, "alice"), keys.create_key(db, "root", admin=True)
        refused = await client.get("/v1/audit", headers={"X-API-Key": alice.key})
        assert refused.status_code == 401 and "admin" in refused.json()["error"]["message"]
        execs = await client.get(
            "/v1/audit", params={"action": "sandbox.exec"}, headers={"X-API-Key": root.key}
        )
        assert [e["action"] for e in execs.json()["entries"]] == ["sandbox.exec"] * 2


async def test_lifecycle_and_file_actions_are_audited(settings: Settings, tmp_path: Path) -> None:
    """Pause, resume, snapshot, snapshot delete, file write (its size, never its bytes)
    and kill each leave one entry naming their target."""
    app, _ = _app(settings, tmp_path)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        sandbox_id = (await client.post("/v1/sandboxes", json={})).json()["id"]
        url = f"/v1/sandboxes/{sandbox_id}"
        put = await client.put(f"{url}/files", params={"path": "/tmp/f"}, content=b"secret!")
        assert put.status_code == 200, put.text
        snapshot_id = (await client.post(f"{url}/snapshots")).json()["id"]
        for path in (f"{url}/pause", f"{url}/resume"):
            assert (await client.post(path)).status_code == 200
        assert (await client.delete(f"/v1/snapshots/{snapshot_id}")).status_code == 204
        assert (await client.delete(url)).status_code == 204
        log = (await client.get("/v1/audit")).json()["entries"]
    assert [(e["action"], e["target_id"]) for e in reversed(log)] == [
        ("sandbox.create", sandbox_id),
        ("file.write", sandbox_id),
        ("snapshot.create", sandbox_id),
        ("sandbox.pause", sandbox_id),
        ("sandbox.resume", sandbox_id),
        ("snapshot.delete", snapshot_id),
        ("sandbox.kill", sandbox_id),
    ]
    assert log[-2]["detail"] == {"path": "/tmp/f", "bytes": 7}
    assert "secret" not in str(log)
