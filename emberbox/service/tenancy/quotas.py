"""Per-tenant quotas: the arithmetic (pure) and where each limit comes from.

A tenant's limit is its own override (set with ``emberbox keys create --max-...``) or the
Settings default (``tenant_max_*``). Live sandboxes (creating or running) count; paused
ones hold no CPU or memory and are checked again when they resume. The built-in tenant
has only the server-wide limits (``max_sandboxes`` ...): it is the operator's.
"""

from __future__ import annotations

from dataclasses import dataclass

from emberbox import errors
from emberbox.config import Settings
from emberbox.store.records import LOCAL_TENANT_ID
from emberbox.store.tenants import TenantRow, Usage


@dataclass(frozen=True)
class TenantLimits:
    max_sandboxes: int
    max_vcpus: int
    max_memory_mib: int
    max_snapshots: int


def limits_for(settings: Settings, tenant: TenantRow | None) -> TenantLimits | None:
    """The tenant's limits; None for the built-in tenant (no tenant quota)."""
    if tenant is None or tenant.id == LOCAL_TENANT_ID:
        return None
    overrides = tenant.overrides()
    return TenantLimits(
        max_sandboxes=overrides.get("max_sandboxes", settings.tenant_max_sandboxes),
        max_vcpus=overrides.get("max_vcpus", settings.tenant_max_vcpus),
        max_memory_mib=overrides.get("max_memory_mib", settings.tenant_max_memory_mib),
        max_snapshots=overrides.get("max_snapshots", settings.tenant_max_snapshots),
    )


def check_sandbox(limits: TenantLimits, usage: Usage, vcpus: int, memory_mib: int) -> None:
    """QuotaExceeded (naming the quota) unless one more sandbox of this shape fits."""
    wanted = (
        ("max_sandboxes", usage.sandboxes, 1, limits.max_sandboxes, "live sandboxes"),
        ("max_vcpus", usage.vcpus, vcpus, limits.max_vcpus, "vCPUs"),
        ("max_memory_mib", usage.memory_mib, memory_mib, limits.max_memory_mib, "MiB of memory"),
    )
    for quota, used, more, limit, what in wanted:
        if used + more > limit:
            raise errors.QuotaExceeded(
                f"tenant quota {quota}={limit} exceeded: the tenant holds {used} {what} "
                f"and this sandbox needs {more} more; kill or pause a sandbox first",
                quota=quota,
                limit=limit,
                used=used,
            )


def check_snapshot(limits: TenantLimits, usage: Usage) -> None:
    if usage.snapshots + 1 > limits.max_snapshots:
        raise errors.QuotaExceeded(
            f"tenant quota max_snapshots={limits.max_snapshots} exceeded: the tenant holds "
            f"{usage.snapshots} snapshots and paused sandboxes; delete or resume one first",
            quota="max_snapshots",
            limit=limits.max_snapshots,
            used=usage.snapshots,
        )
