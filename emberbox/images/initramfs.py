"""The initramfs we generate: busybox, the virtio modules in dependency order, an init.

Debian's cloud kernel builds virtio as modules, so before the root disk can be mounted
the init loads them in the order their own ``depends=`` fields (what depmod writes to
``modules.dep``) require: ``virtio_ring`` before ``virtio`` before the transports.
The archive is written by our own cpio "newc" writer, uncompressed: the kernel unpacks
it fastest that way, which matters under software emulation.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from emberbox.errors import ImageBuildError
from emberbox.images import foreign
from emberbox.vmm.base import PROBE_MARKER  # what the init prints for the KVM probe

# What every guest needs, whatever the VMM: PCI transport (QEMU q35), MMIO transport
# (QEMU microvm, Firecracker), disk, agent channels (virtio-serial, vsock), entropy, net.
GUEST_MODULES = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio-rng",
    "vmw_vsock_virtio_transport",
    "virtio_net",
    "overlay",  # emberbox.overlay: a read-only shared root under a per-VM scratch disk
)

# The guest agent (the package emberbox/guest) is installed as AGENT_DIR/AGENT_PACKAGE
# and runs as a module, with AGENT_DIR on its PYTHONPATH.
AGENT_DIR = "/opt/emberbox"
AGENT_PACKAGE = "emberbox_guest"
_DEPENDS = re.compile(rb"(?:^|\x00)depends=([^\x00]*)\x00")


def module_depends(ko: bytes) -> list[str]:
    """The ``depends=`` list from a module's .modinfo strings."""
    match = _DEPENDS.search(ko)
    if not match or not match.group(1):
        return []
    return [name.decode() for name in match.group(1).split(b",") if name]


def _normalise(name: str) -> str:
    return name.replace("-", "_")


def index_modules(modules_dir: Path) -> dict[str, Path]:
    """Module name (dashes folded to underscores) → .ko path, for a kernel's tree."""
    return {_normalise(p.name.removesuffix(".ko")): p for p in modules_dir.rglob("*.ko")}


def resolve_order(wanted: Iterable[str], depends: dict[str, list[str]]) -> list[str]:
    """Every wanted module and its dependencies, each after all it depends on.

    ``depends`` maps a (normalised) module name to its dependencies; a name missing
    from it is an error naming the module.
    """
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = _normalise(name)
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ImageBuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in depends:
            raise ImageBuildError(f"kernel module {name!r} not found (needed by {chain})")
        state[name] = "visiting"
        for dep in depends[name]:
            visit(dep, (*chain, name))
        state[name] = "done"
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def module_plan(modules_dir: Path, wanted: Iterable[str] = GUEST_MODULES) -> list[Path]:
    """The .ko files to load, in load order."""
    index = index_modules(modules_dir)
    depends: dict[str, list[str]] = {}
    pending = [_normalise(w) for w in wanted]
    while pending:
        name = pending.pop()
        if name in depends or name not in index:
            continue
        depends[name] = [_normalise(d) for d in module_depends(index[name].read_bytes())]
        pending.extend(depends[name])
    return [index[name] for name in resolve_order(wanted, depends)]


def render_init(
    modules: list[str], agent_dir: str = AGENT_DIR, agent_package: str = AGENT_PACKAGE
) -> str:
    """The initramfs /init: load modules, mount the root disk, hand over to the agent.

    ``emberbox.probe`` on the kernel command line makes it print a marker and power off
    instead (used to check that an accelerator can boot a guest at all). The agent starts
    as ``python3 -m agent_package`` with ``agent_dir`` as its PYTHONPATH, which commands
    do not inherit: the agent gives them an environment of their own.
    """
    foreign_start = _foreign_start(agent_package)
    loads = "\n".join(
        f'insmod /lib/modules/{name}.ko || echo "init: insmod {name} failed"' for name in modules
    )
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
{loads}
if grep -q emberbox.probe /proc/cmdline; then
    echo {PROBE_MARKER} > /dev/ttyS0
    poweroff -f
fi
root=/dev/vda
for arg in $(cat /proc/cmdline); do
    case "$arg" in emberbox.root=*) root="${{arg#emberbox.root=}}" ;; esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
{_MOUNT_OVERLAY}
if [ -z "$overlay" ] && ! mount -t ext4 -o rw,noatime "$root" /newroot; then
    echo "init: cannot mount root disk $root"
    poweroff -f
fi
umount /proc /sys
mount --move /dev /newroot/dev
{foreign_start}
export PYTHONPATH={agent_dir}
exec switch_root /newroot /usr/bin/python3 -u -m {agent_package}
"""


def _foreign_start(agent_package: str) -> str:
    """A root disk with the agent's own runtime (an imported image, emberbox/images/
    foreign.py) runs the agent through that runtime's loader, not the image's python3."""
    env = " ".join(f"{k}={v}" for k, v in foreign.agent_env().items())
    argv = " ".join(foreign.agent_argv(agent_package))
    return f"""if [ -x /newroot{foreign.RUNTIME_DIR}/bin/python3 ]; then
    export {env}
    exec switch_root /newroot {argv}
fi"""


# ``emberbox.overlay=<dev>`` (the Firecracker driver sets it): the root disk is the image's,
# shared read-only by every VM, and <dev> is this VM's empty ext4 scratch disk. Mount the
# root read-only (noload: no journal replay, nothing written), the scratch writable, and
# boot an overlayfs of the two, so every write lands in the scratch. Both mounts stay
# under the new root, hidden by switch_root, still holding the overlay up.
_MOUNT_OVERLAY = """overlay=
for arg in $(cat /proc/cmdline); do
    case "$arg" in emberbox.overlay=*) overlay="${arg#emberbox.overlay=}" ;; esac
done
if [ -n "$overlay" ]; then
    i=0
    while [ ! -b "$overlay" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
    mkdir -p /base /scratch
    if ! mount -t ext4 -o ro,noload "$root" /base \\
        || ! mount -t ext4 -o rw,noatime,noinit_itable "$overlay" /scratch \\
        || ! mkdir -p /scratch/upper /scratch/work \\
        || ! mount -t overlay overlay \\
            -o lowerdir=/base,upperdir=/scratch/upper,workdir=/scratch/work /newroot; then
        echo "init: cannot mount root disk $root under scratch disk $overlay"
        poweroff -f
    fi
fi"""


@dataclass
class CpioWriter:
    """A minimal cpio "newc" archive writer (what the kernel's initramfs unpacker reads)."""

    _out: bytearray
    _ino: int = 1

    @classmethod
    def new(cls) -> CpioWriter:
        return cls(bytearray())

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        encoded = name.encode() + b"\x00"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        self._out += b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
        self._out += encoded
        self._out += b"\x00" * (-(110 + len(encoded)) % 4)
        self._out += data
        self._out += b"\x00" * (-len(data) % 4)
        self._ino += 1

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self._out += b"\x00" * (-len(self._out) % 512)
        return bytes(self._out)


def build_initramfs(busybox: Path, modules: list[Path], dest: Path) -> list[str]:
    """Write the initramfs archive to ``dest``; the loaded module names, in order."""
    if not busybox.is_file():
        raise ImageBuildError(f"{busybox} not found: install the busybox-static package")
    names = [_normalise(p.name.removesuffix(".ko")) for p in modules]
    cpio = CpioWriter.new()
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        cpio.directory(d)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for name, path in zip(names, modules, strict=True):
        cpio.file(f"lib/modules/{name}.ko", path.read_bytes())
    cpio.file("init", render_init(names).encode(), 0o755)
    dest.write_bytes(cpio.finish())
    return names
