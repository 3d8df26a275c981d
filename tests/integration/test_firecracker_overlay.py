"""The in-guest overlay the Firecracker driver boots with, proven in a real guest (issue #16).

No Firecracker guest boots on these hosts (nested KVM, see ../shared/firecracker/README.md),
so the guest side of "a read-only shared rootfs plus a per-VM scratch drive" is proven
under QEMU (q35, TCG) with the very same initramfs and kernel flag: emberbox's QEMU driver
runs a QEMU that attaches the image's rootfs READ-ONLY (as Firecracker's
``is_read_only``) and one scratch drive per VM (made by the Firecracker driver's own
``make_scratch``); the command line carries ``emberbox.overlay=/dev/vdb`` as the Firecracker
driver sets it. The QEMU binary given to the driver is a small wrapper script that adds
those two things to the driver's own command line, so the product's QEMU path is unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from emberbox.agent_client.client import AgentClient
from emberbox.agent_client.spec import ExecSpec
from emberbox.images.registry import ImageInfo
from emberbox.service.vm.boot import connect_agent
from emberbox.vmm.base import VM, VMConfig
from emberbox.vmm.firecracker import api as fc_api
from emberbox.vmm.firecracker.files import make_scratch
from emberbox.vmm.qemu.driver import QemuDriver

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None or shutil.which("debugfs") is None,
        reason="needs qemu-system-x86_64 and debugfs (make setup)",
    ),
]

OVERLAY_ARG = f"{fc_api.OVERLAY_BOOT_ARG}={fc_api.SCRATCH_DEVICE}"

# The driver's QEMU, plus: the root disk's format node read-only, and <scratch dir>/<vm id>.ext4
# as a second virtio disk (vdb). QEMU's -name names the VM (``emberbox-<id>,process=...``).
WRAPPER = """#!/bin/bash
args=() prev= vm=
for a in "$@"; do
    if [ "$prev" = "-name" ]; then vm="${a%%,*}"; vm="${vm#emberbox-}"; fi
    case "$a" in *node-name=root,*) a="${a//cache.no-flush=on/read-only=on}" ;; esac
    args+=("$a"); prev="$a"
done
if [ -n "$vm" ]; then
    args+=(-drive "file=__DIR__/$vm.ext4,format=raw,if=none,id=scratch,cache=none")
    args+=(-device "virtio-blk-pci,drive=scratch")
fi
exec qemu-system-x86_64 "${args[@]}"
"""

PROBE = (
    "grep ' / ' /proc/mounts | cut -d' ' -f3; cat /sys/block/vda/ro /sys/block/vdb/ro; "
    "cat /root/hello 2>/dev/null || echo absent; "
    "echo hello-$1 > /root/hello && sync && cat /root/hello; "
    "touch /usr/bin/python3 && echo touched"
)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fco", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _fingerprint(base: Path) -> tuple[int, int, int, str]:
    """Inode, size, mtime and the first 4 MiB (superblock: mount count, last mount time;
    group descriptors): a rw mount or a write through the VM would change it."""
    st = base.stat()
    with open(base, "rb") as f:
        head = hashlib.sha256(f.read(4 << 20)).hexdigest()
    return st.st_ino, st.st_size, st.st_mtime_ns, head


def _debugfs_cat(image: Path, path: str) -> str:
    out = subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(image)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return out.stdout


async def _boot(driver: QemuDriver, config: VMConfig) -> tuple[VM, AgentClient]:
    vm = await driver.start(config)
    try:
        agent, _ = await connect_agent(
            vm, timeout_s=180, hostname=config.vm_id, sandbox_id=config.vm_id
        )
    except BaseException:
        print(f"--- console of {config.vm_id} ---\n{vm.console_tail()}")
        await vm.kill()
        raise
    return vm, agent


def test_two_guests_boot_one_read_only_base_through_their_own_scratch(
    short_tmp: Path, default_image: ImageInfo
) -> None:
    """Two guests share the image's rootfs, attached read-only: each sees an overlay root,
    its writes (also over a base file) land in its own scratch drive, neither sees the
    other's, and the base file keeps its bytes and mtime."""
    base = default_image.files.rootfs
    before = _fingerprint(base)
    wrapper = short_tmp / "qemu-overlay"
    wrapper.write_text(WRAPPER.replace("__DIR__", str(short_tmp)))
    wrapper.chmod(0o755)
    driver = QemuDriver("tcg", binary=str(wrapper))
    configs = [
        VMConfig(
            vm_id=f"ovl{n}",
            work_dir=short_tmp / f"vm{n}",
            guest=default_image.files,
            memory_mib=256,
            kernel_args=(OVERLAY_ARG,),
        )
        for n in ("a", "b")
    ]
    for config in configs:
        make_scratch(short_tmp / f"{config.vm_id}.ext4", 256)

    async def run() -> list[str]:
        booted: list[tuple[VM, AgentClient]] = []
        try:
            for config in configs:
                booted.append(await _boot(driver, config))
            outputs = []
            for (_, agent), name in zip(booted, ("a", "b"), strict=True):
                result = await agent.exec(
                    ExecSpec(cmd=["/bin/sh", "-c", PROBE, "probe", name], timeout_s=60)
                )
                assert result.exit_code == 0, result
                outputs.append(result.stdout.decode())
            return outputs
        finally:
            for vm, agent in booted:
                await agent.aclose()
                await vm.kill()

    out_a, out_b = asyncio.run(run())
    for out, name in ((out_a, "a"), (out_b, "b")):
        # root fs type; vda (the base) read-only, vdb (scratch) writable; no earlier hello
        # (b does not see a's); its own write; a base file's mtime changed in the overlay.
        assert out.split() == ["overlay", "1", "0", "absent", f"hello-{name}", "touched"], out

    assert _debugfs_cat(short_tmp / "ovla.ext4", "/upper/root/hello") == "hello-a\n"
    assert _debugfs_cat(short_tmp / "ovlb.ext4", "/upper/root/hello") == "hello-b\n"
    assert _fingerprint(base) == before
