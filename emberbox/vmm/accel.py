"""Choosing QEMU's accelerator: KVM when it really boots a guest, else TCG.

``/dev/kvm`` existing is not proof: under some nested hypervisors it opens fine and a
Linux guest then hangs forever. So ``auto`` boots the image's own kernel once under KVM
with ``emberbox.probe`` on its command line (the initramfs prints a marker and powers
off) and gives it a bounded time. The verdict is cached per (QEMU version, host kernel,
guest kernel) so the probe runs once per host, not once per sandbox.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import time

from emberbox.config import Settings
from emberbox.vmm.base import PROBE_MARKER, BootFiles
from emberbox.vmm.host import KvmVerdict, kvm_device_usable
from emberbox.vmm.qemu.argv import Accel, kernel_cmdline, machine_args

log = logging.getLogger("emberbox.accel")


def probe_argv(binary: str, guest: BootFiles) -> list[str]:
    """A KVM boot of the guest kernel that only prints the probe marker."""
    return [
        binary,
        "-machine", *machine_args("kvm"),
        "-smp", "1", "-m", "256M",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(guest.kernel),
        "-initrd", str(guest.initrd),
        "-append", kernel_cmdline("kvm", ("emberbox.probe",)),
        "-serial", "stdio",
    ]  # fmt: skip


def probe_kvm_boot(binary: str, guest: BootFiles, timeout_s: float) -> KvmVerdict:
    """Boot the guest under KVM and wait for the marker (at most ``timeout_s``)."""
    started = time.monotonic()
    try:
        proc = subprocess.run(
            probe_argv(binary, guest),
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"").decode(errors="replace").strip().splitlines()[-1:]
        last = f" (last console line: {tail[0]!r})" if tail else ""
        return KvmVerdict(False, f"a KVM guest did not finish booting within {timeout_s:g} s{last}")
    output = proc.stdout.decode(errors="replace")
    if PROBE_MARKER in output:
        return KvmVerdict(True, f"a KVM guest booted in {time.monotonic() - started:.2f} s")
    err = proc.stderr.decode(errors="replace").strip()[-300:]
    return KvmVerdict(False, f"KVM guest boot failed (exit {proc.returncode}): {err}")


def _cache_key(qemu_version: str, guest: BootFiles) -> str:
    kernel_id = f"{guest.kernel.stat().st_size}:{guest.kernel.stat().st_mtime_ns}"
    blob = json.dumps([qemu_version, platform.release(), kernel_id])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_accel(
    settings: Settings, qemu_version: str, guest: BootFiles | None
) -> tuple[Accel, str]:
    """The accelerator to use and why (``settings.accel`` of auto, kvm or tcg)."""
    if settings.accel != "auto":
        return settings.accel, f"accel={settings.accel} set in settings"
    device = kvm_device_usable()
    if not device.usable:
        return "tcg", device.reason
    if guest is None:
        return "tcg", "no guest image to probe KVM with"
    verdict = cached_probe(settings, qemu_version, guest)
    return ("kvm" if verdict.usable else "tcg"), verdict.reason


def cached_probe(settings: Settings, qemu_version: str, guest: BootFiles) -> KvmVerdict:
    cache = settings.cache_dir / "kvm-probe.json"
    key = _cache_key(qemu_version, guest)
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return KvmVerdict(bool(saved["usable"]), str(saved["reason"]))
    except (OSError, ValueError, KeyError):
        pass
    log.info("probing whether KVM can boot a guest (at most %g s)", settings.kvm_probe_timeout_s)
    verdict = probe_kvm_boot(settings.qemu_binary, guest, settings.kvm_probe_timeout_s)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "usable": verdict.usable, "reason": verdict.reason}))
    tmp.replace(cache)
    return verdict
