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
from emberbox.errors import AgentError, ImageBuildError
from emberbox.images import dockerfile, foreign
from emberbox.images.context import BuildContext, Selection
from emberbox.images.registry import ImageConfig
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
LOG_TAIL_BYTES = 4096  # of a failed step's output, in its error


def _discard(_chunk: bytes) -> None:
    return None


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

    async def run_step(
        self,
        index: int,
        step: dockerfile.RunStep,
        config: ImageConfig,
        settings: Settings,
        on_log: Callable[[str], Awaitable[None]],
    ) -> None:
        """Step ``index``, a RUN, with the image's ENV (over the ARGs in scope), WORKDIR
        and USER; its output to ``on_log``. ImageBuildError (exit code, log tail) when
        it fails or times out."""
        tail = bytearray()

        async def output(chunk: bytes) -> None:
            tail.extend(chunk)
            del tail[:-LOG_TAIL_BYTES]
            await on_log(chunk.decode("utf-8", "replace"))

        timeout = settings.build_step_timeout_s
        result = await self.run(
            step.command,
            env={**dict(step.build_args), **config.env},
            cwd=config.workdir,
            user=config.user,
            timeout_s=timeout,
            on_output=output,
        )
        if not result.timed_out and result.exit_code == 0:
            return
        text = tail.decode("utf-8", "replace")
        if result.timed_out:
            why = f"timed out after {timeout:g} s (EMBERBOX_BUILD_STEP_TIMEOUT_S)"
        else:
            why = f"exited with code {result.exit_code}"
            if "No space left on device" in text:
                limit = settings.build_disk_mib
                why += f"; the image is limited to {limit} MiB (EMBERBOX_BUILD_DISK_MIB)"
        raise ImageBuildError(
            f"step {index} ({step.text}, line {step.line}) {why}",
            step=index,
            line=step.line,
            exit_code=result.exit_code,
            log=text,
            timed_out=result.timed_out,
        )

    async def copy_step(
        self,
        index: int,
        step: dockerfile.CopyStep,
        selection: Selection,
        context: BuildContext,
        scratch: Path,
    ) -> None:
        """Step ``index``, a COPY: ``selection`` as a tar (written to ``scratch``, then
        removed) through the agent's tar-in; ``--chown`` by ``chown -R`` in the guest."""

        def write() -> None:
            with scratch.open("wb") as out:
                context.copy_tar(selection, out, chmod=step.chmod)

        await anyio.to_thread.run_sync(write)
        try:
            await self.tar_in(selection.directory, scratch)
        finally:
            await anyio.Path(scratch).unlink(missing_ok=True)
        if not step.chown:
            return
        tops = sorted({name.split("/")[0] for name, _ in selection.members})
        paths = [f"{selection.directory.rstrip('/')}/{top}" for top in tops]
        argv = ("chown", "-R", step.chown, *paths)
        result = await self.run(argv, env={}, cwd="/", user="", timeout_s=300, on_output=_discard)
        if result.exit_code != 0:
            raise ImageBuildError(
                f"step {index} ({step.text}, line {step.line}): --chown={step.chown} "
                f"failed: {result.stderr.decode('utf-8', 'replace').strip()[-400:]}",
                step=index,
                line=step.line,
                exit_code=result.exit_code,
            )

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
        if result.exit_code == 127:  # a foreign userland without sync: the agent's python
            sync = foreign.python_argv("-c", "import os; os.sync()")
            result = await self.sandbox.agent.exec(ExecSpec(sync, timeout_s=120))
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
