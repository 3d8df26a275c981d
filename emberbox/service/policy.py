"""What the server refuses to start with (safe by default), and what it only warns about.

"A key" is ``EMBERBOX_API_KEY`` or an active key in the database (``emberbox keys create``).

- Listening beyond loopback without a key: refused (anyone reaching the port could run
  code). On loopback without a key: local mode, allowed with a warning.
- ``mode=production``: refuses to run without a key, with a data dir that other users
  can read, or (as root) with QEMU left running as root (TCG is refused there too, by
  driver selection).
"""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

from emberbox.config import Settings
from emberbox.errors import HostError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def host_name(host_header: str) -> str:
    """The name of a ``Host`` header: no port, no brackets, lower case, no final dot."""
    name = host_header.strip().lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    return name.rstrip(".")


def host_allowed(host_header: str | None, settings: Settings) -> bool:
    """Whether keyless mode answers a request that names ``host_header`` as its Host:
    localhost names, loopback addresses, ``settings.host`` and ``allowed_hosts``. Any
    other name is a page of another site whose DNS points at us (DNS rebinding)."""
    if host_header is None:  # HTTP/1.0 without Host: no browser sends that
        return True
    name = host_name(host_header)
    if name == "localhost" or name.endswith(".localhost") or is_loopback(name):
        return True
    allowed = {
        settings.host.lower(),
        *(entry.lower().rstrip(".") for entry in settings.allowed_hosts),
    }
    return name in allowed


def keyless_refusal(
    settings: Settings, *, client: str, server: str, host_header: str | None
) -> str | None:
    """Why a request without a key may not be served as the local tenant (None: it may).
    ``client`` and ``server`` are the connection's two addresses ("" for a Unix socket):
    both must be loopback, whatever ``settings.host`` says (a factory started on 0.0.0.0
    never ran :func:`check_serving`)."""
    if not is_loopback(settings.host):
        return "keys are needed beyond loopback"
    for what, address in (("client", client), ("server address", server)):
        if address and not is_loopback(address):
            return f"keys are needed beyond loopback (the {what} {address} is not loopback)"
    if not host_allowed(host_header, settings):
        return (
            f"keyless mode does not answer for Host {str(host_header)[:100]!r} "
            "(list it in EMBERBOX_ALLOWED_HOSTS)"
        )
    return None


def check_serving(settings: Settings, *, db_keys: bool = False) -> list[str]:
    """Raise HostError for a configuration the server must not run with; else the
    warnings to log. ``db_keys``: the database holds an active API key."""
    env_key = settings.api_key is not None and bool(settings.api_key.get_secret_value())
    keyed = env_key or db_keys
    if not keyed and not is_loopback(settings.host):
        raise HostError(
            f"refusing to listen on {settings.host} without an API key: anyone who reaches "
            "the port could run code; create one with `emberbox keys create --name NAME` "
            "or set EMBERBOX_API_KEY (or listen on 127.0.0.1)"
        )
    if settings.mode == "production":
        if not keyed:
            raise HostError(
                "production mode needs an API key: create one with "
                "`emberbox keys create --name NAME` or set EMBERBOX_API_KEY"
            )
        if os.geteuid() == 0 and not settings.vmm_user:
            raise HostError(
                "production mode refuses to run QEMU as root: set EMBERBOX_VMM_USER to an "
                "unprivileged user (scripts/setup.sh creates emberbox-vmm)"
            )
        loose = _others_can_read(settings.data_dir)
        if loose:
            raise HostError(
                f"production mode refuses data dir {loose}: other users can read it "
                f"(chmod 700 {loose})"
            )
    if not keyed:
        return [
            "local mode (no API key): every local user and process can use this server; "
            "`emberbox keys create --name NAME` makes keys required"
        ]
    return []


def _others_can_read(data_dir: Path) -> Path | None:
    """The data dir, or its nearest existing parent that will become it, if world- or
    group-accessible."""
    path = data_dir
    while not path.exists() and path != path.parent:
        path = path.parent
    if path != data_dir:
        return None  # it will be created 0700 by the store
    mode = path.stat().st_mode
    return data_dir if mode & (stat.S_IRWXG | stat.S_IRWXO) else None
