"""QEMU command lines are built by pure functions: checked here without a VM."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from emberbox.config import Settings
from emberbox.errors import HostError
from emberbox.service.sandboxes.orphans import mentions_path, referenced_children
from emberbox.vmm.base import BootFiles, VMConfig
from emberbox.vmm.qemu.argv import (
    LINUXBOOT_ROM,
    MACHINE_REVISION,
    DiskLayer,
    HostFds,
    build_argv,
    overlay_argv,
)
from emberbox.vmm.qemu.driver import HostLimits, QemuDriver, parse_version
from emberbox.vmm.select import choose_driver

GUEST = BootFiles(
    Path("/img/vmlinuz"), Path("/img/vmlinux"), Path("/img/initrd"), Path("/img/root")
)
FDS = HostFds(
    qmp=10,
    agent=11,
    console=12,
    kernel=13,
    initrd=14,
    disk=(
        DiskLayer(15, "qcow2", "/vms/abc/overlay.qcow2"),
        DiskLayer(16, "qcow2", "layer1"),
        DiskLayer(17, "raw", "layer2"),
    ),
)


def config(**kw: object) -> VMConfig:
    return VMConfig(vm_id="abc", work_dir=Path("/vms/abc"), guest=GUEST, **kw)  # type: ignore[arg-type]


def argv_of(
    accel: str = "tcg", fds: HostFds = FDS, *, incoming: bool = False, **kw: object
) -> list[str]:
    return build_argv("qemu-system-x86_64", accel, config(**kw), fds, incoming=incoming)  # type: ignore[arg-type]


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_tcg_uses_q35_with_pci_devices() -> None:
    """Under TCG the machine is q35 with virtio-pci devices (microvm hangs there)."""
    argv = argv_of("tcg")
    assert option(argv, "-machine") == ["q35,accel=tcg,sata=off,smbus=off,memory-backend=mem"]
    assert "virtio-blk-pci,drive=root,werror=report,rerror=report" in option(argv, "-device")
    assert "virtio-serial-pci,id=vser" in option(argv, "-device")


def test_kvm_uses_microvm_with_acpi_and_mmio() -> None:
    """Under KVM the machine is microvm with ACPI, so Debian's kernel finds virtio-mmio."""
    argv = argv_of("kvm")
    machine = option(argv, "-machine")[0]
    assert machine.startswith("microvm,accel=kvm") and "acpi=on" in machine
    assert option(argv, "-cpu") == ["host"]
    assert "virtio-blk-device,drive=root,werror=report,rerror=report" in option(argv, "-device")


def test_shape_and_sockets_are_passed_listening_fds() -> None:
    """vCPUs and memory as asked; QMP, agent and console are sockets the host listens
    on and passes as fds (QEMU binds nothing); QMP is a control monitor on its chardev."""
    argv = argv_of(vcpus=2, memory_mib=768, kernel_args=("x=1",))
    assert option(argv, "-smp") == ["2"] and option(argv, "-m") == ["768M"]
    chardevs = option(argv, "-chardev")
    assert "socket,id=qmp,fd=10,server=on,wait=off" in chardevs
    assert "socket,id=agent,fd=11,server=on,wait=off" in chardevs
    assert "socket,id=console,fd=12,server=on,wait=off" in chardevs
    assert option(argv, "-mon") == ["chardev=qmp,mode=control"]
    assert "-qmp" not in argv and not any("path=" in c for c in chardevs)
    assert option(argv, "-append")[0].endswith(" x=1")
    assert "-no-reboot" in argv and "-nodefaults" in argv


def test_guest_user_space_is_not_randomised_under_tcg_only() -> None:
    """TCG finds translated code by guest virtual address: its guests boot with
    norandmaps (every process's code at the same addresses, translated once); KVM
    guests keep ASLR."""
    tcg = option(argv_of("tcg"), "-append")[0].split()
    kvm = option(argv_of("kvm"), "-append")[0].split()
    assert "norandmaps" in tcg
    assert "norandmaps" not in kvm
    assert set(tcg) - {"norandmaps"} == set(kvm)


def test_qemu_opens_no_host_path() -> None:
    """Kernel and initrd are /proc/self/fd links and disks are fd sets: no path of ours
    is in the argv except the overlay's, as an fd label (attach and the orphan sweep
    find a VM's QEMU by its work dir)."""
    argv = argv_of()
    assert option(argv, "-kernel") == ["/proc/self/fd/13"]
    assert option(argv, "-initrd") == ["/proc/self/fd/14"]
    paths = [
        a for a in argv[1:] if "/" in a and "/dev/fdset/" not in a and "/proc/self/fd/" not in a
    ]
    assert paths == ["fd=15,set=1,opaque=/vms/abc/overlay.qcow2"]
    assert "/img/" not in " ".join(argv) and "-drive" not in argv


def test_backing_chain_is_explicit_and_read_only_below_the_overlay() -> None:
    """Every layer is its own node with its backing named, so QEMU never follows a
    backing file name; only the top overlay is writable."""
    argv = argv_of()
    assert option(argv, "-add-fd") == [
        "fd=17,set=3,opaque=layer2",
        "fd=16,set=2,opaque=layer1",
        "fd=15,set=1,opaque=/vms/abc/overlay.qcow2",
    ]
    assert option(argv, "-blockdev") == [
        "driver=file,node-name=layer2-file,filename=/dev/fdset/3,read-only=on",
        "driver=raw,node-name=layer2,file=layer2-file,read-only=on",
        "driver=file,node-name=layer1-file,filename=/dev/fdset/2,read-only=on",
        "driver=qcow2,node-name=layer1,file=layer1-file,backing=layer2,read-only=on",
        "driver=file,node-name=root-file,filename=/dev/fdset/1,cache.no-flush=on",
        "driver=qcow2,node-name=root,file=root-file,backing=layer1,cache.no-flush=on",
    ]


def test_option_values_escape_commas() -> None:
    """A comma in a label cannot inject QEMU options."""
    fds = replace(FDS, disk=(DiskLayer(15, "raw", "/vms/a,b/overlay"),))
    assert option(argv_of(fds=fds), "-add-fd") == ["fd=15,set=1,opaque=/vms/a,,b/overlay"]


def test_overlay_is_backed_by_the_raw_image() -> None:
    """The overlay is qcow2 over the raw ext4 image, so the image is never written."""
    assert overlay_argv("qemu-img", Path("/img/root"), Path("/vms/a/o.qcow2")) == [
        "qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/img/root", "/vms/a/o.qcow2",
    ]  # fmt: skip


def test_cpu_quota_is_vcpus_plus_overhead() -> None:
    """The cgroup CPU quota is (vCPUs + overhead) CPUs per period, never below 1 ms."""
    assert HostLimits(cpu_overhead=0.5).cpu_quota_us(2) == 250_000
    assert HostLimits(cpu_overhead=0.0).cpu_quota_us(1, period_us=50_000) == 50_000
    assert HostLimits(cpu_overhead=-1.0).cpu_quota_us(1) == 1000


def test_version_parsing() -> None:
    """The version comes from QEMU's banner; anything else is a HostError."""
    assert parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)") == "7.2.22"
    with pytest.raises(HostError):
        parse_version("command not found")


def test_restore_argv_maps_the_template_copy_on_write_and_waits_for_state() -> None:
    """A clone maps the template's RAM file privately and waits (`-incoming defer`);
    every VM's RAM backend is named `mem`, so any VM's state loads into any other."""
    template = config(memory_file=Path("/t/memory"))
    fds = replace(FDS, memory=20)
    clone = build_argv("qemu-system-x86_64", "tcg", template, fds, incoming=True, shared=False)
    (backend,) = option(clone, "-object")
    assert backend.startswith("memory-backend-file,id=mem,")
    assert "mem-path=/proc/self/fd/20" in backend and backend.endswith("share=off")
    assert option(clone, "-incoming") == ["defer"]
    maker = build_argv("qemu-system-x86_64", "tcg", template, fds)
    assert option(maker, "-object")[0].endswith("share=on") and "-incoming" not in maker
    plain = argv_of()
    assert option(plain, "-object")[0].startswith("memory-backend-ram,id=mem,")


def test_qemu_runs_under_its_seccomp_sandbox() -> None:
    """Every VM gets QEMU's seccomp filter; snapshots use fd: URIs, so spawn=deny holds."""
    (sandbox,) = option(argv_of(), "-sandbox")
    assert sandbox.split(",") == [
        "on",
        "obsolete=deny",
        "elevateprivileges=deny",
        "spawn=deny",
        "resourcecontrol=deny",
    ]


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU")
def test_tcg_is_refused_in_production_and_flagged_in_development(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Production mode refuses TCG; development mode logs that it is no security boundary."""
    base = Settings(cache_dir=tmp_path, data_dir=tmp_path, vmm="qemu", accel="tcg", vmm_user="")
    with pytest.raises(HostError, match="production mode refuses QEMU TCG"):
        choose_driver(base.model_copy(update={"mode": "production"}), None)
    caplog.set_level(logging.WARNING)
    choice = choose_driver(base, None)
    assert choice.accel == "tcg" and "NOT a security boundary" in caplog.text


def test_the_work_dir_stays_in_the_argv_for_attach_and_the_orphan_sweep() -> None:
    """With no socket or disk paths left in the argv, the overlay's fd label still names
    the work dir, so a restarted server and the orphan sweep find the VM's QEMU."""
    argv = argv_of()
    assert mentions_path(argv, Path("/vms/abc"))
    assert referenced_children(argv, Path("/vms")) == {"abc"}
    assert not mentions_path(argv, Path("/vms/ab"))


def test_a_tcg_restore_gets_no_kernel_only_its_option_rom() -> None:
    """A q35 clone is already booted: no -kernel/-initrd/-append (QEMU would hold the
    whole kernel image in its heap), but the option ROM -kernel adds, a RAM block of the
    saved state, is still there under the same name."""
    clone = argv_of("tcg", incoming=True)
    assert "-kernel" not in clone and "-initrd" not in clone and "-append" not in clone
    assert option(clone, "-option-rom") == [LINUXBOOT_ROM] == ["linuxboot_dma.bin"]
    assert option(clone, "-incoming") == ["defer"]


def test_a_boot_and_a_kvm_restore_keep_the_kernel() -> None:
    """Cold boots boot the kernel; microvm (KVM) adds no option ROM, so its restores
    keep their usual arguments."""
    for argv in (argv_of("tcg"), argv_of("kvm", incoming=True), argv_of("kvm")):
        assert option(argv, "-kernel") == ["/proc/self/fd/13"]
        assert option(argv, "-initrd") == ["/proc/self/fd/14"]
        assert "-option-rom" not in argv


def test_the_restore_argv_keeps_the_device_set() -> None:
    """Apart from how it starts, a clone's machine is the booted one's (the saved
    state must find every device it holds)."""
    booted, clone = argv_of("tcg"), argv_of("tcg", incoming=True)
    for flag in ("-machine", "-cpu", "-device", "-smp", "-m", "-netdev", "-chardev"):
        assert option(clone, flag) == option(booted, flag), flag


def test_saved_states_name_the_machine_revision() -> None:
    """Snapshots and template keys carry the device set's revision with QEMU's version:
    a state saved by another device set is refused or rebuilt, never loaded."""
    driver = QemuDriver("tcg")
    driver._version = "7.2.22"
    assert driver.state_version() == f"7.2.22+m{MACHINE_REVISION}"
    assert driver.snapshot_key() == f"qemu-7.2.22+m{MACHINE_REVISION}-tcg"
