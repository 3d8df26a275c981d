"""Runs INSIDE a guest (uploaded by test_guest.py): write garbage to the agent's channel.

``open``: open the agent's virtio-serial port directly (the agent holds it: EBUSY).
``steal``: take the agent's own descriptor of the port with pidfd_getfd(2) (root may) and
write garbage on it, as a compromised guest could; the host must refuse the stream.
"""

from __future__ import annotations

import ctypes
import os
import sys

SYS_PIDFD_GETFD = 438  # x86_64
GARBAGE = os.urandom(4096) + b"\xff" * 4096 + b'{"id": 1, "op": "exec"}\n' * 64


def ports() -> list[str]:
    return sorted("/dev/" + name for name in os.listdir("/dev") if name.startswith("vport"))


def open_directly() -> None:
    for port in ports():
        try:
            fd = os.open(port, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            print(port, exc.strerror)
            continue
        print(port, "opened; wrote", os.write(fd, GARBAGE))
        os.close(fd)


def steal() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(1)
    for name in os.listdir("/proc/1/fd"):
        try:
            target = os.readlink(f"/proc/1/fd/{name}")
        except OSError:
            continue
        if target.startswith("/dev/vport"):
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            print(target, "stolen as", fd, os.strerror(ctypes.get_errno()), flush=True)
            if fd >= 0:
                os.write(fd, GARBAGE)


if __name__ == "__main__":
    open_directly() if sys.argv[1] == "open" else steal()
