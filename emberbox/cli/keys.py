"""``emberbox keys create|list|revoke`` and ``emberbox audit``: tenants, API keys and the
audit log, straight in the data dir's database (``EMBERBOX_DATA_DIR``), or a cluster's
PostgreSQL when ``EMBERBOX_DATABASE_URL`` is set.

They work while the server runs: it looks keys up on every request, so a new key works
and a revoked one fails from the next request on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Column, Table

from emberbox.cli.common import Json, clean_errors, err_console, load_settings, print_json
from emberbox.service.tenancy import keys
from emberbox.service.tenancy.access import read_audit
from emberbox.store import open_database, tenants
from emberbox.store.connection import Connection

app = typer.Typer(help="Create, list and revoke API keys (tenants)", no_args_is_help=True)

_out = Console()

Quota = Annotated[int | None, typer.Option(min=0, show_default=False)]


@contextmanager
def _database() -> Iterator[Connection]:
    settings = load_settings()
    with clean_errors(), open_database(settings) as conn:
        yield conn


@app.command()
def create(
    name: Annotated[str, typer.Option("--name", help="The tenant (made if new)")],
    admin: Annotated[bool, typer.Option("--admin", help="Sees every tenant's objects")] = False,
    max_sandboxes: Quota = None,
    max_vcpus: Quota = None,
    max_memory_mib: Quota = None,
    max_snapshots: Quota = None,
    e2b: Annotated[
        bool, typer.Option("--e2b", help="Print it as e2b_<hex>, for E2B SDKs (docs/e2b.md)")
    ] = False,
) -> None:
    """Make a key for tenant NAME and print it (once: only its hash is kept). Quotas not
    given are the server's tenant_max_* settings."""
    given = {
        "max_sandboxes": max_sandboxes,
        "max_vcpus": max_vcpus,
        "max_memory_mib": max_memory_mib,
        "max_snapshots": max_snapshots,
    }
    quotas = {quota: value for quota, value in given.items() if value is not None}
    with _database() as conn:
        made = keys.create_key(conn, name, admin=admin, quotas=quotas)
    what = "new tenant" if made.tenant_created else "tenant"
    role = " (admin)" if made.tenant.admin else ""
    err_console.print(
        f"key {made.key_id} for {what} {made.tenant.name}{role}; it is shown only now:",
        markup=False,
    )
    print(keys.e2b_form(made.key) if e2b else made.key)


@app.command("list")
def list_(as_json: Json = False) -> None:
    """List keys with their tenant, quotas and use (never the secrets)."""
    with _database() as conn:
        found = tenants.list_keys(conn)
        by_id = {tenant.id: tenant for tenant in tenants.list_tenants(conn)}
    if as_json:
        rows = [
            {
                "id": key.id,
                "tenant": by_id[key.tenant_id].name,
                "admin": by_id[key.tenant_id].admin,
                "quotas": by_id[key.tenant_id].overrides(),
                "created_at": _when(key.created_at),
                "last_used_at": _when(key.last_used_at),
                "revoked_at": _when(key.revoked_at),
            }
            for key in found
        ]
        print_json(json.dumps(rows))
        return
    table = Table("TENANT", "ADMIN", "QUOTAS", "CREATED", "LAST USED", "REVOKED")
    table.columns.insert(0, Column("KEY ID", no_wrap=True, min_width=12))
    for key in found:
        tenant = by_id[key.tenant_id]
        quotas = ", ".join(f"{k}={v}" for k, v in tenant.overrides().items()) or "defaults"
        table.add_row(
            key.id,
            tenant.name,
            "yes" if tenant.admin else "",
            quotas,
            _when(key.created_at),
            _when(key.last_used_at) or "never",
            _when(key.revoked_at) or "",
        )
    _out.print(table)


@app.command()
def revoke(
    key: Annotated[str, typer.Argument(help="A key id, or a tenant name (all its keys)")],
) -> None:
    """Revoke a key (or every key of a tenant); requests with it fail from now on."""
    with _database() as conn:
        revoked = keys.revoke(conn, key)
    if not revoked:
        err_console.print(f"{key}: nothing to revoke (already revoked)", markup=False)
        return
    err_console.print(f"revoked {', '.join(revoked)}", markup=False)


def audit(
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="Only this tenant (name or id)")
    ] = None,
    action: Annotated[
        str | None, typer.Option("--action", help="Only this action, e.g. sandbox.exec")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many")] = 50,
    as_json: Json = False,
) -> None:
    """Show the audit log, newest first: who did what, when, and how it ended."""
    with _database() as conn:
        found = read_audit(conn, tenant, action, limit)
    if as_json:
        rows = [
            {
                "id": entry.id,
                "at": _when(entry.at),
                "tenant": name,
                "key_id": entry.key_id,
                "action": entry.action,
                "target_id": entry.target_id,
                "detail": entry.detail,
                "outcome": entry.outcome,
            }
            for entry, name in found
        ]
        print_json(json.dumps(rows))
        return
    table = Table(
        Column("AT (UTC)", no_wrap=True),
        "TENANT",
        Column("KEY", no_wrap=True),
        Column("ACTION", no_wrap=True),
        Column("TARGET", no_wrap=True),
        "OUTCOME",
        "DETAIL",
    )
    for entry, name in found:
        table.add_row(
            _when(entry.at),
            name,
            entry.key_id or "",
            entry.action,
            entry.target_id or "",
            entry.outcome,
            json.dumps(entry.detail)[:80],
        )
    _out.print(table)


def _when(value: datetime | None) -> str | None:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else None


__all__ = ["app", "audit"]
