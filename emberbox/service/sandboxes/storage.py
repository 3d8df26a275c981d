"""Room on the host's disk for the data dir (the database, overlays, console logs).

New work is refused with StorageFull (HTTP 507) while the data dir's file system has
less than ``min_free_disk_mib`` free, so that running sandboxes and the database keep
the space that is left. (The store reports SQLITE_FULL and ENOSPC as StorageFull.)
"""

from __future__ import annotations

import os

from emberbox import errors
from emberbox.config import Settings

MIB = 1 << 20


def free_mib(settings: Settings) -> int:
    """Free space (for unprivileged writers) on the data dir's file system. Blocking."""
    stat = os.statvfs(settings.data_dir)
    return stat.f_bavail * stat.f_frsize // MIB


async def require_free_space(settings: Settings, what: str) -> None:
    """StorageFull unless the data dir has at least ``min_free_disk_mib`` free."""
    wanted = settings.min_free_disk_mib
    if wanted <= 0:
        return
    free = free_mib(settings)  # one statvfs: microseconds, no thread needed
    if free < wanted:
        raise errors.StorageFull(
            f"{what} refused: the data dir {settings.data_dir} has {free} MiB free, "
            f"less than min_free_disk_mib={wanted}; free some space",
            free_mib=free,
            min_free_disk_mib=wanted,
        )
