"""Build an image from a Dockerfile: ``build_image(deps, request, on_event)``.

The Dockerfile is planned first (:mod:`emberbox.images.dockerfile`), the base image
found (or imported, for an OCI reference) and every COPY resolved in the context
(:mod:`emberbox.images.context`), so bad input fails before anything boots. Then each
step gets its cache key (:mod:`.cache`): ENV/ARG/WORKDIR/USER/LABEL (and the metadata
ones) change only the image config; RUN and COPY/ADD change the disk, and a cached one
is skipped. The first step that is not cached boots one builder VM (:mod:`.builder`)
on the disk so far; it runs that step and every later one, each captured as a layer
(:mod:`.layers`). A build with everything cached boots nothing. The last disk becomes
the registered image's rootfs, with the base image's kernel and initramfs.

Builds with the same final key (the same Dockerfile, context, args and base) hold one
lock, so the second finds the first's layers. Whatever fails (a step's exit code, a
step or build timeout, a full disk, a cancel), the builder VM, its overlay and network
and the build's scratch dir are removed and nothing is registered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import logging
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from emberbox import errors
from emberbox.config import Settings
from emberbox.images import context as ctxmod
from emberbox.images import dockerfile
from emberbox.images.registry import (
    ImageConfig,
    ImageInfo,
    ImageRegistry,
    check_name,
    register_image,
)
from emberbox.models.images import BuildEvent
from emberbox.net import plan as netplan
from emberbox.service.images import layers
from emberbox.service.images.builder import BuilderSpec, BuilderVM
from emberbox.service.images.cache import KeyLocks, LayerCache, step_key
from emberbox.vmm.base import Driver
from emberbox.vmm.select import choose_driver

log = logging.getLogger(__name__)

EventSink = Callable[[BuildEvent], Awaitable[None] | None]
Addresses = Callable[[], AbstractAsyncContextManager[str]]
# Manifest keys of the base image that describe the base, not the new image.
_NOT_INHERITED = ("name", "tenant", "ref", "registered_at", "layers", "config", "base")
_LOCAL_REFS = ("oci:", "oci-archive:", "docker-archive:")
_OCI_REF = re.compile(r"^(oci:|oci-archive:|docker-archive:|docker://)|[:/@]")


@dataclass(frozen=True)
class BuildRequest:
    name: str
    tenant: str | None
    dockerfile: str
    context: Path | None = None  # a tar file on the host (already size-limited)
    build_args: Mapping[str, str] = field(default_factory=dict)
    no_cache: bool = False


@dataclass
class BuildDeps:
    """What builds share in one server: settings, the driver, the address allocator."""

    settings: Settings
    driver: Driver | None = None  # None: chosen from the settings on first use
    # A guest address held for the builder's life; None: a process-local allocator
    # over ``network_cidr`` (library use; the server passes its own, which knows the
    # sandboxes' addresses).
    addresses: Addresses | None = None
    locks: KeyLocks = field(default_factory=KeyLocks)
    _held: set[str] = field(default_factory=set)

    def get_driver(self, base: ImageInfo) -> Driver:
        """QEMU: builders need a network, and the disk layout QEMU's overlay gives."""
        if self.driver is None:
            settings = self.settings
            if settings.vmm != "qemu":
                settings = settings.model_copy(update={"vmm": "qemu"})
            self.driver = choose_driver(settings, base.files).driver
        return self.driver

    @contextlib.asynccontextmanager
    async def address(self) -> AsyncIterator[str | None]:
        if not self.settings.build_egress:
            yield None
        elif self.addresses is not None:
            async with self.addresses() as address:
                yield address
        else:
            address = netplan.allocate_address(self.settings, list(self._held))
            self._held.add(address)
            try:
                yield address
            finally:
                self._held.discard(address)


@dataclass(frozen=True)
class _Step:
    index: int  # from 1
    step: dockerfile.Step
    key: str
    selection: ctxmod.Selection | None = None

    @property
    def changes_disk(self) -> bool:
        return not isinstance(self.step, dockerfile.ConfigStep)


class _Emitter:
    def __init__(self, sink: EventSink, total: int) -> None:
        self._sink = sink
        self.total = total

    async def __call__(self, event: BuildEvent) -> None:
        result = self._sink(event)
        if inspect.isawaitable(result):
            await result

    async def step(self, s: _Step, state: Any, seconds: float | None = None) -> None:
        await self(
            BuildEvent(
                "step",
                step=s.index,
                total=self.total,
                instruction=s.step.text,
                state=state,
                seconds=None if seconds is None else round(seconds, 3),
            )
        )


async def build_image(deps: BuildDeps, request: BuildRequest, on_event: EventSink) -> ImageInfo:
    """Build ``request`` and register it; ImageBuildError (with ``exit_code``, ``log``,
    ``step``) when a step fails, InvalidRequest for a Dockerfile or context we refuse."""
    emit = _Emitter(on_event, 0)
    try:
        return await _build(deps, request, emit)
    except errors.EmberboxError as exc:
        details = exc.details
        await emit(
            BuildEvent(
                "error",
                step=details.get("step"),
                exit_code=details.get("exit_code"),
                log=details.get("log"),
                message=exc.message,
            )
        )
        raise


async def _build(deps: BuildDeps, request: BuildRequest, emit: _Emitter) -> ImageInfo:
    settings = deps.settings
    check_name(request.name)
    named = dockerfile.plan(request.dockerfile, request.build_args)
    base = await _base_image(deps, named.base, request.tenant)
    plan = dockerfile.plan(
        request.dockerfile,
        request.build_args,
        base_env=base_variables(base.config),
        base_workdir=base.config.workdir,
    )
    with await anyio.to_thread.run_sync(_open_context, settings, request.context) as context:
        root = step_key("", ["FROM", base.image_hash, settings.build_disk_mib])
        steps = await anyio.to_thread.run_sync(_keyed, plan, context, root)
        emit.total = len(steps)
        final = steps[-1].key if steps else root
        async with deps.locks.hold(final):
            with anyio.fail_after(settings.build_timeout_s):
                run = _Run(deps, request, base, context, emit)
                try:
                    disk, config, made = await run.execute(steps)
                    info = await run.register(disk, config, made, final, plan.base)
                except TimeoutError:
                    raise errors.ImageBuildError(
                        f"the build ran past its {settings.build_timeout_s:g} s limit "
                        "(EMBERBOX_BUILD_TIMEOUT_S)"
                    ) from None
                finally:
                    with anyio.CancelScope(shield=True):
                        await run.cleanup()
        await anyio.to_thread.run_sync(_prune, settings, {s.key for s in steps})
    await emit(BuildEvent("done", image=request.name, total=emit.total))
    return info


# The PATH every command gets when its image sets none (the agent's, DEFAULT_ENV in
# emberbox/guest/commands.py; a unit test keeps the two equal).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def base_variables(config: ImageConfig) -> dict[str, str]:
    """What ``$NAME`` means in a Dockerfile before its first ENV: the base image's env,
    with the PATH its commands really get when the image sets none."""
    return {"PATH": DEFAULT_PATH, **config.env}


def _prune(settings: Settings, keep: set[str]) -> None:
    removed = LayerCache(settings).prune(settings.build_cache_max_mib << 20, keep)
    if removed:
        log.info("build cache: removed %d least recently used layers", len(removed))


def _open_context(settings: Settings, path: Path | None) -> ctxmod.BuildContext:
    if path is None:
        return ctxmod.BuildContext.empty()
    limits = ctxmod.Limits(settings.build_context_max_entries, settings.build_context_max_bytes)
    return ctxmod.BuildContext.open(path, limits)


def _keyed(plan: dockerfile.BuildPlan, context: ctxmod.BuildContext, root: str) -> list[_Step]:
    """Every step with its key (and each COPY's selection, resolved now: a bad source
    fails before anything boots)."""
    found: list[_Step] = []
    parent = root
    for index, step in enumerate(plan.steps, start=1):
        selection = content = None
        if isinstance(step, dockerfile.CopyStep):
            try:
                selection = context.select(step.sources, step.dest)
            except errors.InvalidRequest as exc:
                raise dockerfile.DockerfileError(step.line, exc.message) from None
            content = context.digest(selection)
        parent = step_key(parent, step.key(), content)
        found.append(_Step(index, step, parent, selection))
    return found


async def _base_image(deps: BuildDeps, name: str, tenant: str | None) -> ImageInfo:
    """``FROM name``: an emberbox image, else an OCI reference imported (F's importer)."""
    registry = ImageRegistry(deps.settings)
    try:
        return registry.get(name, tenant=tenant)
    except errors.ImageNotFound:
        if not _OCI_REF.search(name):
            raise
    if tenant is not None and name.startswith(_LOCAL_REFS):
        # Files and directories on the server: the operator's to import, never a tenant's.
        raise errors.InvalidRequest(
            f"FROM {name}: a tenant's build may name a registry image, not the server's files"
        )
    try:
        oci = importlib.import_module("emberbox.images.oci")
    except ImportError:
        raise errors.InvalidRequest(f"FROM {name}: OCI images are not supported here") from None
    local = "oci-" + step_key("", ["oci", name])[:12]
    info: ImageInfo = await oci.import_oci(deps.settings, name, local, tenant=tenant)
    return info


def apply_config(config: ImageConfig, step: dockerfile.ConfigStep) -> ImageConfig:
    """The image config after ``step``."""
    changes: dict[str, Any] = {}
    if step.env:
        changes["env"] = {**config.env, **dict(step.env)}
    if step.labels:
        changes["labels"] = {**config.labels, **dict(step.labels)}
    if step.workdir is not None:
        changes["workdir"] = step.workdir
    if step.user is not None:
        changes["user"] = step.user
    return dataclasses.replace(config, **changes)


def command_of(base: list[str] | None, steps: Iterable[dockerfile.Step]) -> list[str] | None:
    """The recorded command: ENTRYPOINT + CMD as Docker joins them (an ENTRYPOINT
    resets an earlier CMD); the base image's when the Dockerfile sets neither."""
    entry: list[str] = []
    cmd, touched = base, False
    for step in steps:
        if isinstance(step, dockerfile.ConfigStep) and step.entrypoint is not None:
            entry, cmd, touched = list(step.entrypoint), None, True
        if isinstance(step, dockerfile.ConfigStep) and step.cmd is not None:
            cmd, touched = list(step.cmd), True
    return ((entry + (cmd or [])) or None) if touched else base


class _Run:
    """One build's execution: its scratch dir, its builder VM (at most one)."""

    def __init__(
        self,
        deps: BuildDeps,
        request: BuildRequest,
        base: ImageInfo,
        context: ctxmod.BuildContext,
        emit: _Emitter,
    ) -> None:
        self.deps = deps
        self.settings = deps.settings
        self.request = request
        self.base = base
        self.context = context
        self.emit = emit
        self.cache = LayerCache(deps.settings)
        self.work = self.cache.work / secrets.token_hex(8)
        self.vm: BuilderVM | None = None
        self._address: AbstractAsyncContextManager[str | None] | None = None

    async def execute(self, steps: list[_Step]) -> tuple[Path, ImageConfig, list[dict[str, Any]]]:
        await anyio.to_thread.run_sync(lambda: self.work.mkdir(parents=True, mode=0o700))
        disk = await self._base_disk()
        config = self.base.config
        made: list[dict[str, Any]] = []
        ran = False
        for s in steps:
            if isinstance(s.step, dockerfile.ConfigStep):
                config = apply_config(config, s.step)
                await self.emit.step(s, "done" if ran else "cached", 0.0)
                continue
            cached = None if self.request.no_cache else self.cache.layer(s.key)
            if cached is not None:
                await self._stop_vm()  # (another build made it meanwhile: our VM is behind)
                disk = cached
                await self.emit.step(s, "cached")
            else:
                t0 = time.monotonic()
                await self.emit.step(s, "running")
                disk = await self._execute(s, disk, config)
                ran = True
                await self.emit.step(s, "done", time.monotonic() - t0)
            size = self.cache.meta(s.key).get("size", 0)
            made.append({"digest": f"sha256:{s.key}", "size": size, "step": s.step.text})
        config = dataclasses.replace(
            config, cmd=command_of(self.base.config.cmd, [s.step for s in steps])
        )
        return disk, config, made

    async def _base_disk(self) -> Path:
        """The base image's rootfs at the builder disk size (grown once, cached)."""
        rootfs = self.base.files.rootfs
        want = self.settings.build_disk_mib << 20
        if rootfs.stat().st_size >= want:
            return rootfs
        key = f"{self.base.image_hash}-{self.settings.build_disk_mib}"
        dest = self.cache.bases / key / layers.LAYER_FILE
        async with self.deps.locks.hold("base:" + key):
            if not dest.is_file():
                dest.parent.mkdir(parents=True, exist_ok=True)
                await layers.grown_copy(rootfs, dest, self.settings.build_disk_mib)
        return dest

    async def _execute(self, s: _Step, disk: Path, config: ImageConfig) -> Path:
        vm = self.vm or await self._start_vm(disk)
        if isinstance(s.step, dockerfile.RunStep):

            async def on_log(text: str) -> None:
                await self.emit(BuildEvent("log", step=s.index, log=text))

            await vm.run_step(s.index, s.step, config, self.settings, on_log)
        else:
            assert s.selection is not None and isinstance(s.step, dockerfile.CopyStep)
            scratch = self.work / "copy.tar"
            await vm.copy_step(s.index, s.step, s.selection, self.context, scratch)
        partial = self.work / f"{s.key}.ext4"
        size = await vm.capture(partial)
        meta = {"key": s.key, "step": s.step.text, "size": size}
        return await anyio.to_thread.run_sync(self.cache.publish, s.key, partial, meta)

    async def _start_vm(self, disk: Path) -> BuilderVM:
        driver = self.deps.get_driver(self.base)
        self._address = self.deps.address()
        address = await self._address.__aenter__()
        spec = BuilderSpec(self.base.name, self.base.files, disk, address)
        self.vm = await BuilderVM.boot(self.settings, driver, spec)
        return self.vm

    async def _stop_vm(self) -> None:
        vm, self.vm = self.vm, None
        if vm is not None:
            await vm.kill()
        held, self._address = self._address, None
        if held is not None:
            await held.__aexit__(None, None, None)

    async def register(
        self,
        disk: Path,
        config: ImageConfig,
        made: list[dict[str, Any]],
        final: str,
        base_name: str,
    ) -> ImageInfo:
        """Stop the builder and register ``disk`` as the image (nothing before this)."""
        await self._stop_vm()
        request = self.request
        image_hash = step_key(final, ["image", request.name, request.tenant])[:32]
        source = self.work / "image"
        manifest = {
            **{k: v for k, v in self.base.manifest.items() if k not in _NOT_INHERITED},
            "image_hash": image_hash,
            "base": base_name,
            "layers": made,
            "config": config.to_dict(),
            "created_by": "dockerfile",
            "build_key": final,
        }

        def stage() -> ImageInfo:
            source.mkdir(mode=0o755)
            files = self.base.files
            names = {"vmlinuz": files.kernel, "vmlinux": files.vmlinux}
            names.update({"initramfs.cpio": files.initrd, layers.LAYER_FILE: disk})
            for name, path in names.items():
                if path.is_file():
                    layers.link_or_copy(path, source / name)
            return register_image(
                self.settings, request.name, source, manifest, tenant=request.tenant
            )

        return await anyio.to_thread.run_sync(stage)

    async def cleanup(self) -> None:
        """The builder VM, its network address and the scratch dir: gone. Idempotent."""
        try:
            await self._stop_vm()
        finally:
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(self.work, ignore_errors=True))
