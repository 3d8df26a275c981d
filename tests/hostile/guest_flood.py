"""Runs INSIDE a guest (uploaded by test_floods.py): flood the host with valid frames.

A child fills the exec's output window (the test's HTTP client does not read, so the
host stops acknowledging and the agent falls quiet), then the script takes the agent's
own descriptor of its port with pidfd_getfd(2), as a compromised guest could, and
writes well-formed EVENT frames for every request id up to ``argv[1]`` forever. The
host must end this sandbox with a protocol violation instead of queueing them.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import sys
import time

SYS_PIDFD_GETFD = 438  # x86_64
EVENT = 3


def frame(kind: int, rid: int, payload: bytes) -> bytes:
    return b"EB" + struct.pack(">BII", kind, rid, len(payload)) + payload


def steal() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(1)
    for name in os.listdir("/proc/1/fd"):
        try:
            target = os.readlink(f"/proc/1/fd/{name}")
        except OSError:
            continue
        if target.startswith("/dev/vport"):
            fd = int(libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0))
            if fd >= 0:
                return fd
    raise SystemExit("no agent port found")


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:  # the agent made the port nonblocking
            select.select([], [fd], [])


def main() -> None:
    if os.fork() == 0:
        chunk = b"x" * 65536
        while True:
            os.write(1, chunk)
    time.sleep(float(sys.argv[2]))
    fd = steal()
    rounds = b"".join(frame(EVENT, rid, b"{}") * 200 for rid in range(1, int(sys.argv[1]) + 1))
    while True:
        write_all(fd, rounds)


if __name__ == "__main__":
    main()
