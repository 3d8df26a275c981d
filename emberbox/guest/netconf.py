"""The guest's network interface, set at hello (standard library only: ioctls, no `ip`).

The host says ``"network": {"address", "prefix", "gateway", "dns"}`` to configure the
one NIC, or ``"network": null`` to take it down (a sandbox without network, perhaps
forked from a snapshot of one with). No ``network`` key: leave it as it is. IPv6 stays
off either way. The guest's own settings are not what keeps a sandbox in: the host's
namespace and rules are (a root user in the guest can change all of this).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
from typing import Any

SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
SIOCSIFADDR, SIOCSIFNETMASK = 0x8916, 0x891C
SIOCADDRT, SIOCDELRT = 0x890B, 0x890C
IFF_UP = 0x1
RTF_UP, RTF_GATEWAY = 0x1, 0x2
RTENTRY = "@L16s16s16sHhLPhPLLH"  # struct rtentry (LP64)
RTENTRY_SIZE = 120
SYS_NET = "/sys/class/net"
RESOLV_CONF = "/etc/resolv.conf"


def interface() -> str | None:
    """The NIC's name (the one interface that is not loopback), if there is one."""
    try:
        names = sorted(n for n in os.listdir(SYS_NET) if n != "lo")
    except OSError:
        return None
    return "eth0" if "eth0" in names else (names[0] if names else None)


def apply(config: dict[str, Any] | None) -> None:
    """Configure the NIC as ``config`` says, or take it down (None)."""
    name = interface()
    if name is None:
        if config is not None:
            raise OSError(errno.ENODEV, "no network interface in this VM")
        return
    _ipv6_off(name)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        if config is None:
            with contextlib.suppress(OSError):
                _ioctl_addr(sock, SIOCSIFADDR, name, None)  # no address: removes it
            _set_up(sock, name, False)
            return
        address, prefix, gateway, dns = _fields(config)
        _set_up(sock, name, True)
        _ioctl_addr(sock, SIOCSIFADDR, name, address)
        _ioctl_addr(sock, SIOCSIFNETMASK, name, _netmask(prefix))
        _default_route(sock, gateway)
    if dns:
        _write_resolv_conf(dns)


def _fields(config: dict[str, Any]) -> tuple[str, int, str, list[str]]:
    address, prefix = config.get("address"), config.get("prefix")
    gateway, dns = config.get("gateway"), config.get("dns") or []
    if not isinstance(prefix, int) or not 0 < prefix <= 32:
        raise ValueError(f"bad prefix {prefix!r}")
    for value in (address, gateway, *dns):
        if not isinstance(value, str):
            raise ValueError(f"bad address {value!r}")
        socket.inet_aton(value)  # raises OSError when malformed
    return str(address), prefix, str(gateway), [str(d) for d in dns]


def _sockaddr(address: str | None) -> bytes:
    """A sockaddr_in (None: 0.0.0.0, the "any" address)."""
    packed = bytes(4) if address is None else socket.inet_aton(address)
    return struct.pack("HH4s8x", socket.AF_INET, 0, packed)


def _ioctl_addr(sock: socket.socket, request: int, name: str, address: str | None) -> None:
    fcntl.ioctl(sock, request, struct.pack("16s", name.encode()) + _sockaddr(address) + bytes(8))


def _set_up(sock: socket.socket, name: str, up: bool) -> None:
    ifreq = fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack("16sH22x", name.encode(), 0))
    flags = struct.unpack_from("16sH", ifreq)[1]
    flags = flags | IFF_UP if up else flags & ~IFF_UP
    fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", name.encode(), flags))


def _netmask(prefix: int) -> str:
    return socket.inet_ntoa(struct.pack("!I", (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF))


def _rtentry(gateway: str | None, flags: int) -> bytes:
    zero = _sockaddr(None)
    entry = struct.pack(RTENTRY, 0, zero, _sockaddr(gateway), zero, flags, 0, 0, 0, 0, 0, 0, 0, 0)
    return entry + bytes(RTENTRY_SIZE - len(entry))


def _default_route(sock: socket.socket, gateway: str) -> None:
    """Replace any default route with one via ``gateway``."""
    for _ in range(8):
        try:
            fcntl.ioctl(sock, SIOCDELRT, _rtentry(None, RTF_UP))
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise
            break
    fcntl.ioctl(sock, SIOCADDRT, _rtentry(gateway, RTF_UP | RTF_GATEWAY))


def _ipv6_off(name: str) -> None:
    for key in (f"{name}/disable_ipv6", "default/disable_ipv6"):
        with (
            contextlib.suppress(OSError),
            open(f"/proc/sys/net/ipv6/conf/{key}", "w", encoding="ascii") as out,
        ):
            out.write("1\n")


def _write_resolv_conf(dns: list[str]) -> None:
    tmp = RESOLV_CONF + ".emberbox"
    with open(tmp, "w", encoding="ascii") as out:
        out.write("".join(f"nameserver {server}\n" for server in dns))
    os.replace(tmp, RESOLV_CONF)
