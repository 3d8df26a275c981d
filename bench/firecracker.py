"""Firecracker start and snapshot against the real binary, at two rootfs sizes (issue #16).

What one round measures, with the driver as the service uses it (no jailer):

* ``start``: the VM's files (a link to the rootfs, an empty sparse scratch), the process,
  every configuration request and InstanceStart;
* ``snapshot``: pause, snapshot create (Full), the disk saved into the snapshot (the
  scratch: only what the guest wrote), resume;
* ``restore``: a fresh process loading that snapshot (its files placed first).

At two rootfs sizes: the default image's (2 GiB) and the same filesystem in an 8 GiB
sparse file. Start and snapshot must not grow with the rootfs: ``*_8_over_2`` near 1.
``rootfs_copy_ms`` is what each start (and, with the VM paused, each snapshot) paid for
the per-VM sparse copy of the rootfs before the overlay, timed with that copy's loop.
No guest boots on nested KVM hosts (../shared/firecracker/README.md): a stuck guest
still starts, pauses, snapshots and loads, so these numbers are real; a guest's own
writes, which the scratch would hold, are not part of them.

Run alone: ``.venv/bin/python -m bench.firecracker [--quick]`` (prints the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from emberbox.config import Settings
from emberbox.images.build import ImageBuilder
from emberbox.vmm.base import BootFiles, VMConfig
from emberbox.vmm.firecracker.driver import FirecrackerDriver
from emberbox.vmm.firecracker.files import clone_file

BINARY = Path(__file__).resolve().parents[2] / "shared" / "firecracker" / "bin" / "firecracker"
SIZES_GIB = (2, 8)
MEMORY_MIB = 128


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


def _p50(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def _allocated_mib(directory: Path, skip: tuple[str, ...] = ()) -> float:
    total = sum(
        p.stat().st_blocks * 512 for p in directory.iterdir() if p.is_file() and p.name not in skip
    )
    return round(total / (1 << 20), 2)


def _bases(files: BootFiles, tmp: Path) -> dict[int, BootFiles]:
    """The image as is (2 GiB), and its filesystem in an 8 GiB sparse file."""
    big = tmp / "rootfs-8g.ext4"
    clone_file(files.rootfs, big)
    with open(big, "r+b") as f:
        f.truncate(8 << 30)
    return {2: files, 8: BootFiles(files.kernel, files.vmlinux, files.initrd, big)}


async def _round(
    driver: FirecrackerDriver, guest: BootFiles, tmp: Path, n: int
) -> dict[str, float]:
    def config(name: str) -> VMConfig:
        return VMConfig(vm_id=name, work_dir=tmp / name, guest=guest, memory_mib=MEMORY_MIB)

    started = time.perf_counter()
    vm = await driver.start(config(f"fcb{n}a"))
    try:
        start_ms = _ms(started)
        started = time.perf_counter()
        snap = await vm.snapshot(tmp / f"snap{n}")
        snapshot_ms = _ms(started)
    finally:
        await vm.kill()
    disk_mib = _allocated_mib(snap.directory, ("memory", "vmstate"))
    started = time.perf_counter()
    clone = await driver.restore(config(f"fcb{n}b"), snap)
    restore_ms = _ms(started)
    await clone.kill()
    shutil.rmtree(snap.directory, ignore_errors=True)
    return {
        "start_ms": start_ms,
        "snapshot_ms": snapshot_ms,
        "restore_ms": restore_ms,
        "snapshot_disk_mib": disk_mib,
    }


def _copy_ms(rootfs: Path, tmp: Path) -> float:
    """The per-VM copy of the rootfs each start (and, paused, each snapshot) made before
    the overlay, as the driver made it then (no reflinks on these hosts): every byte read,
    zero blocks left as holes."""
    dest = tmp / "copy.ext4"
    zero = bytes(1 << 16)
    started = time.perf_counter()
    with open(rootfs, "rb") as fin, open(dest, "wb") as fout:
        while chunk := fin.read(len(zero)):
            if chunk == zero[: len(chunk)]:
                fout.seek(len(chunk), os.SEEK_CUR)
            else:
                fout.write(chunk)
        fout.truncate()
    elapsed = _ms(started)
    dest.unlink()
    return elapsed


async def _measure(quick: bool, tmp: Path) -> dict[str, object]:
    image, _ = ImageBuilder(Settings()).build("default")
    driver = FirecrackerDriver(str(BINARY), socket_timeout_s=20)
    bases = _bases(image.files, tmp)
    runs = 2 if quick else 5
    result: dict[str, object] = {
        "binary": str(BINARY),
        "version": driver.version(),
        "runs": runs,
        "memory_mib": MEMORY_MIB,
    }
    p50s: dict[int, dict[str, float]] = {}
    for size, guest in bases.items():
        rounds = [await _round(driver, guest, tmp, n) for n in range(runs)]
        copies = [_copy_ms(guest.rootfs, tmp)]  # one: tens of seconds at 8 GiB
        p50s[size] = {key: _p50([r[key] for r in rounds]) for key in rounds[0]}
        p50s[size]["rootfs_copy_ms"] = _p50(copies)
        result[f"rootfs_{size}gib"] = p50s[size]
    for key in ("start_ms", "snapshot_ms", "restore_ms"):
        name = key.removesuffix("_ms")
        result[f"{name}_8_over_2"] = round(p50s[8][key] / p50s[2][key], 2)
    return result


def measure(quick: bool) -> dict[str, object]:
    """p50 start / snapshot / restore times (ms) per rootfs size, and their ratios."""
    tmp = Path(tempfile.mkdtemp(prefix="fcb", dir="/tmp"))  # short: unix socket paths
    try:
        return asyncio.run(_measure(quick, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 5")
    args = parser.parse_args()
    print(json.dumps(measure(args.quick), indent=2))


if __name__ == "__main__":
    main()
