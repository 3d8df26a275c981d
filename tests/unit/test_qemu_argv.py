"""QEMU command lines are built by pure functions: checked here without a VM."""

from __future__ import annotations

from pathlib import Path

import pytest

from emberbox.errors import HostError
from emberbox.vmm.base import GuestFiles, VMConfig
from emberbox.vmm.qemu import build_argv, overlay_argv, parse_version

GUEST = GuestFiles(
    Path("/img/vmlinuz"), Path("/img/vmlinux"), Path("/img/initrd"), Path("/img/root")
)


def config(**kw: object) -> VMConfig:
    return VMConfig(vm_id="abc", work_dir=Path("/vms/abc"), guest=GUEST, **kw)  # type: ignore[arg-type]


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_tcg_uses_q35_with_pci_devices() -> None:
    """Under TCG the machine is q35 with virtio-pci devices (microvm hangs there)."""
    argv = build_argv("qemu-system-x86_64", "tcg", config())
    assert option(argv, "-machine") == ["q35,accel=tcg,memory-backend=mem"]
    assert "virtio-blk-pci,drive=root" in option(argv, "-device")
    assert "virtio-serial-pci,id=vser" in option(argv, "-device")


def test_kvm_uses_microvm_with_acpi_and_mmio() -> None:
    """Under KVM the machine is microvm with ACPI, so Debian's kernel finds virtio-mmio."""
    argv = build_argv("qemu-system-x86_64", "kvm", config())
    machine = option(argv, "-machine")[0]
    assert machine.startswith("microvm,accel=kvm") and "acpi=on" in machine
    assert option(argv, "-cpu") == ["host"]
    assert "virtio-blk-device,drive=root" in option(argv, "-device")


def test_shape_disk_and_private_sockets() -> None:
    """vCPUs, memory, the overlay disk and every socket live in the VM's work dir."""
    argv = build_argv("qemu", "tcg", config(vcpus=2, memory_mib=768, kernel_args=("x=1",)))
    assert option(argv, "-smp") == ["2"] and option(argv, "-m") == ["768M"]
    assert option(argv, "-drive")[0].startswith("file=/vms/abc/overlay.qcow2,")
    chardevs = option(argv, "-chardev")
    assert any("path=/vms/abc/agent.sock" in c for c in chardevs)
    assert any("path=/vms/abc/console.sock" in c for c in chardevs)
    assert option(argv, "-qmp") == ["unix:/vms/abc/qmp.sock,server=on,wait=off"]
    assert option(argv, "-append")[0].endswith(" x=1")
    assert "-no-reboot" in argv and "-nodefaults" in argv
    assert "/img/root" not in " ".join(argv)  # the image is only the overlay's backing file


def test_overlay_is_backed_by_the_raw_image() -> None:
    """The overlay is qcow2 over the raw ext4 image, so the image is never written."""
    assert overlay_argv("qemu-img", Path("/img/root"), Path("/vms/a/o.qcow2")) == [
        "qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/img/root", "/vms/a/o.qcow2",
    ]  # fmt: skip


def test_version_parsing() -> None:
    """The version comes from QEMU's banner; anything else is a HostError."""
    assert parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)") == "7.2.22"
    with pytest.raises(HostError):
        parse_version("command not found")


def test_restore_argv_maps_the_template_copy_on_write_and_waits_for_state() -> None:
    """A clone maps the template's RAM file privately and waits (`-incoming defer`);
    every VM's RAM backend is named `mem`, so any VM's state loads into any other."""
    template = config(memory_file=Path("/t/memory"))
    clone = build_argv("qemu-system-x86_64", "tcg", template, incoming=True, shared=False)
    (backend,) = option(clone, "-object")
    assert backend.startswith("memory-backend-file,id=mem,")
    assert "mem-path=/t/memory" in backend and backend.endswith("share=off")
    assert option(clone, "-incoming") == ["defer"]
    maker = build_argv("qemu-system-x86_64", "tcg", template)
    assert option(maker, "-object")[0].endswith("share=on") and "-incoming" not in maker
    plain = build_argv("qemu-system-x86_64", "tcg", config())
    assert option(plain, "-object")[0].startswith("memory-backend-ram,id=mem,")


def test_qemu_runs_under_its_seccomp_sandbox() -> None:
    """Every VM gets QEMU's seccomp filter; snapshots use fd: URIs, so spawn=deny holds."""
    (sandbox,) = option(build_argv("qemu-system-x86_64", "tcg", config()), "-sandbox")
    assert sandbox.split(",") == [
        "on",
        "obsolete=deny",
        "elevateprivileges=deny",
        "spawn=deny",
        "resourcecontrol=deny",
    ]
