"""Which Firecracker the tests run, and whether a Firecracker guest can boot here.

The release binaries live in ``../shared/firecracker/bin`` beside the repository (CI's
fresh clone has them there too); without them, ``firecracker`` on PATH. A Firecracker VM
test needs more than the binary: a KVM on which a guest boots. Nested KVM on these hosts
opens fine and then never boots a guest (the shared README), which the cached KVM boot
probe (emberbox/vmm/accel.py) already knows; such a host skips the VM tests with that
reason, never passes them.
"""

from __future__ import annotations

from emberbox.config import Settings
from emberbox.vmm.accel import resolve_accel
from emberbox.vmm.base import BootFiles
from emberbox.vmm.firecracker.driver import firecracker_usable
from emberbox.vmm.qemu.driver import QemuDriver
from tests.support.paths import REPO

SHARED_BIN = REPO.parent / "shared" / "firecracker" / "bin"


def firecracker_binary() -> str:
    """The shared release binary when present, else ``firecracker`` (PATH)."""
    shared = SHARED_BIN / "firecracker"
    return str(shared) if shared.is_file() else "firecracker"


def vm_skip_reason(settings: Settings, guest: BootFiles) -> str | None:
    """Why Firecracker VM tests cannot run here, or None when a guest can boot."""
    binary = firecracker_binary()
    usable, why = firecracker_usable(binary)
    if not usable:
        return f"Firecracker VM tests need a binary ({SHARED_BIN} or PATH) and usable KVM: {why}"
    auto = settings.model_copy(update={"accel": "auto"})
    accel, reason = resolve_accel(auto, QemuDriver("tcg", settings.qemu_binary).version(), guest)
    if accel != "kvm":
        return f"{binary} found, but no guest boots on this host's KVM: {' '.join(reason.split())}"
    return None
