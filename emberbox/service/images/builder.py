"""A builder microVM: a sandbox in all but name, booted on a build layer.

It boots the base image's kernel and initramfs with the layer's ext4 as its root disk
(the driver puts its own qcow2 overlay on top, as for any sandbox), gets a network with
full egress when the operator allows builds one (the private-range and metadata blocks
of docs/networking.md still apply), runs each RUN through the guest agent and takes
each COPY through the agent's tar-in. :meth:`BuilderVM.capture` pauses the VM, flattens
its disk into a new layer and lets it run on. Killing it removes the VM, its overlay and
its network; it dies with the server too (``lifetime="ephemeral"``).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from emberbox.agent_client.answers import ExecResult
from emberbox.agent_client.spec import ExecSpec
from emberbox.config import Settings
from emberbox.errors import AgentError
from emberbox.net import plan as netplan
from emberbox.net.policy import EgressPolicy
from emberbox.service.images import layers
from emberbox.service.vm.boot import boot_until_ready
from emberbox.service.vm.machine import SandboxVM, disk_roots, work_dir_for
from emberbox.service.vm.network import configure_guest, network_down, network_up
from emberbox.vmm.base import BootFiles, Driver, VMConfig
from emberbox.vmm.qemu.argv import QemuPaths

OutputSink = Callable[[bytes], Awaitable[None] | None]
_CHUNK = 256 * 1024


@dataclass(frozen=True)
class BuilderSpec:
    """What a builder boots: the base image's kernel files with ``disk`` as its root."""

    image: str  # for logs and the SandboxVM record
    kernel_files: BootFiles
    disk: Path
    address: str | None  # guest address (None: no network)


def user_argv(user: str) -> list[str]:
    """The prefix that runs a command as ``user`` ("name[:group]" or "uid[:gid]");
    empty for root. ``runuser``/``setpriv`` are util-linux, in every Debian."""
    name, _, group = user.partition(":")
    if name in ("", "root", "0") and group in ("", "root", "0"):
        return []
    if name.isdigit():
        gid = group or name
        return ["setpriv", f"--reuid={name}", f"--regid={gid}", "--clear-groups"]
    return ["runuser", "-u", name, *(["-g", group] if group else []), "--"]


class BuilderVM:
    def __init__(self, sandbox: SandboxVM, spec: BuilderSpec, qemu_img: str) -> None:
        self.sandbox = sandbox
        self.spec = spec
        self._qemu_img = qemu_img

    @classmethod
    async def boot(cls, settings: Settings, driver: Driver, spec: BuilderSpec) -> BuilderVM:
        vm_id = "build-" + secrets.token_hex(6)
        files = BootFiles(
            kernel=spec.kernel_files.kernel,
            vmlinux=spec.kernel_files.vmlinux,
            initrd=spec.kernel_files.initrd,
            rootfs=spec.disk,
        )
        plan = None
        if spec.address is not None:
            plan = netplan.plan_for(settings, EgressPolicy("full"), spec.address)
        ns = await network_up(settings, driver, vm_id, plan)
        try:
            config = VMConfig(
                vm_id=vm_id,
                work_dir=work_dir_for(settings, vm_id),
                guest=files,
                vcpus=settings.build_vcpus,
                memory_mib=settings.build_memory_mib,
                console_log_max_bytes=settings.console_log_max_bytes,
                lifetime="ephemeral",
                tap_fd=ns.tap_fd if ns is not None else None,
                disk_roots=disk_roots(settings),
            )
            ready = await boot_until_ready(
                lambda: driver.start(config),
                timeout_s=settings.boot_timeout_s,
                attempts=settings.boot_attempts,
                hostname=f"emberbox-{vm_id}",
                sandbox_id=vm_id,
            )
            sandbox = SandboxVM(
                vm_id,
                spec.image,
                ready.vm,
                ready.agent,
                ready.hello,
                settings.build_vcpus,
                settings.build_memory_mib,
                ns,
            )
            if plan is not None:
                try:
                    await configure_guest(ready.agent, plan)
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await sandbox.kill()
                    raise
        except BaseException:
            await network_down(ns)
            raise
        finally:
            if ns is not None:
                ns.close_tap()
        return cls(sandbox, spec, settings.qemu_img_binary)

    async def run(
        self,
        command: tuple[str, ...] | str,
        *,
        env: dict[str, str],
        cwd: str,
        user: str,
        timeout_s: float,
        on_output: OutputSink,
    ) -> ExecResult:
        """One RUN: a shell line through ``/bin/sh -c``, or an argv; as ``user``."""
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        spec = ExecSpec([*user_argv(user), *argv], env=env, cwd=cwd or "/", timeout_s=timeout_s)
        return await self.sandbox.agent.exec(spec, on_stdout=on_output, on_stderr=on_output)

    async def tar_in(self, directory: str, tar_file: Path) -> int:
        """Extract the tar ``tar_file`` (host) into ``directory`` (guest)."""

        async def chunks() -> AsyncIterator[bytes]:
            async with await anyio.open_file(tar_file, "rb") as f:
                while chunk := await f.read(_CHUNK):
                    yield chunk

        return await self.sandbox.agent.tar_in(directory, chunks())

    async def capture(self, dest: Path) -> int:
        """Flush the guest's disk, pause it, write its disk as the layer ``dest``
        (bytes on disk), and resume it."""
        result = await self.sandbox.agent.exec(ExecSpec(["sync"], timeout_s=120))
        if result.exit_code != 0:
            raise AgentError(f"sync in the builder failed: {result.stderr.decode()[-400:]}")
        overlay = QemuPaths(self.sandbox.work_dir).overlay
        await self.sandbox.vm.pause()
        try:
            return await layers.capture(self._qemu_img, overlay, self.spec.disk, dest)
        finally:
            await self.sandbox.vm.resume()

    async def kill(self) -> None:
        """End the VM, its overlay and network. Idempotent; runs when cancelled."""
        with anyio.CancelScope(shield=True):
            await self.sandbox.kill()
