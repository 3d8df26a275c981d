"""``emberbox doctor``: what this host has, and what to install for what is missing."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from emberbox.cli.common import load_settings
from emberbox.config import Settings
from emberbox.errors import EmberboxError
from emberbox.images.registry import ImageRegistry
from emberbox.vmm import accel
from emberbox.vmm.host import kvm_device_usable
from emberbox.vmm.qemu.driver import parse_version

console = Console(highlight=False)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def _version(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


def _tool(name: str, argv: list[str], package: str, required: bool = True) -> Check:
    version = _version(argv)
    if version is None:
        return Check(name, False, f"not found: apt-get install {package}", required)
    return Check(name, True, version, required)


def cgroup_check() -> Check:
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        controllers = Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
        return Check("cgroups", True, f"v2 ({' '.join(controllers)})", required=False)
    if Path("/sys/fs/cgroup/memory").is_dir():
        return Check("cgroups", True, "v1 (memory, pids, cpu hierarchies)", required=False)
    return Check("cgroups", False, "no cgroup filesystem mounted", required=False)


def kvm_check(settings: Settings) -> Check:
    device = kvm_device_usable()
    if not device.usable:
        return Check(
            "KVM", False, f"{device.reason}; QEMU will use TCG (slow, not a boundary)", False
        )
    images = ImageRegistry(settings).list()
    if not images or shutil.which(settings.qemu_binary) is None:
        return Check("KVM", True, f"{device.reason}; boot not yet verified (no image/QEMU)", False)
    version = parse_version(_version([settings.qemu_binary, "--version"]) or "")
    verdict = accel.cached_probe(settings, version, images[0].files)
    if verdict.usable:
        return Check("KVM", True, f"usable: {verdict.reason}", False)
    return Check(
        "KVM", False, f"present but cannot boot a guest: {verdict.reason}; TCG fallback", False
    )


def fd_limit_check(settings: Settings) -> Check:
    """The open-file limit ``emberbox serve`` will have (it raises the soft one to the
    hard one at start): room for max_connections sockets and the VMs' files."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * settings.max_connections
    detail = (
        f"{hard} (serve raises the soft limit to it; max_connections={settings.max_connections})"
    )
    if hard < wanted:
        detail += f"; want at least {wanted}: raise the hard limit (LimitNOFILE=, ulimit -Hn)"
    return Check("open files", hard >= wanted, detail, required=False)


def firecracker_checks(settings: Settings) -> list[Check]:
    fc = _version([settings.firecracker_binary, "--version"])
    jailer = _version(["jailer", "--version"])
    tun = Path("/dev/net/tun").exists()
    hint = "not found: see docs/firecracker.md (needs a KVM host)"
    return [
        Check("firecracker", fc is not None, fc or hint, required=False),
        Check(
            "jailer", jailer is not None, jailer or "not found (optional, for jailer mode)", False
        ),
        Check("/dev/net/tun", tun, "present" if tun else "missing: modprobe tun", required=False),
    ]


def gather(settings: Settings) -> list[Check]:
    images = ImageRegistry(settings).list()
    image_detail = ", ".join(f"{i.name} ({i.image_hash})" for i in images)
    checks = [
        Check("python", sys.version_info >= (3, 11), sys.version.split()[0]),
        _tool("qemu", [settings.qemu_binary, "--version"], "qemu-system-x86"),
        _tool("qemu-img", [settings.qemu_img_binary, "--version"], "qemu-utils"),
        kvm_check(settings),
        _tool("mmdebstrap", ["mmdebstrap", "--version"], "mmdebstrap"),
        Check(
            "busybox-static",
            Path("/bin/busybox").exists(),
            "/bin/busybox" if Path("/bin/busybox").exists() else "apt-get install busybox-static",
        ),
        _tool("mkfs.ext4", ["mkfs.ext4", "-V"], "e2fsprogs"),
        Check("images", bool(images), image_detail or "none: run `emberbox image build`"),
        *firecracker_checks(settings),
        cgroup_check(),
        fd_limit_check(settings),
        Check(
            "data dir",
            os.access(settings.data_dir.parent, os.W_OK) or settings.data_dir.exists(),
            str(settings.data_dir),
        ),
    ]
    return checks


def doctor() -> None:
    """Report what this host has for running sandboxes, and how to fix what it lacks."""
    settings = load_settings()
    try:
        checks = gather(settings)
    except EmberboxError as exc:
        checks = [Check("doctor", False, str(exc))]
    table = Table("check", "", "detail")
    for c in checks:
        mark = (
            "[green]ok[/green]"
            if c.ok
            else ("[red]missing[/red]" if c.required else "[yellow]no[/yellow]")
        )
        table.add_row(c.name, mark, c.detail)
    console.print(table)
    if any(c.required and not c.ok for c in checks):
        console.print("[red]not ready:[/red] install what is marked missing (or run `make setup`)")
        raise typer.Exit(1)
    console.print("[green]ready[/green] to run sandboxes")
