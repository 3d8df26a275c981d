"""Builds and imports as the API runs them: the context upload to a temp file (capped),
E1's Dockerfile build engine (:mod:`.build`) or F's OCI importer
(:mod:`emberbox.images.oci`), their events as :class:`BuildEvent`, and the image's
template made right after (``Settings.image_template_after_build``).

A tenant's build or import lands in its own namespace (the built-in tenant's: shared).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread

from emberbox import errors
from emberbox.config import Settings
from emberbox.images.registry import ImageInfo, check_name, namespace
from emberbox.models.images import BuildEvent
from emberbox.service.images.registry_service import UsageSource

log = logging.getLogger(__name__)

OnEvent = Callable[[BuildEvent], Awaitable[None]]
DEFAULT_DOCKERFILE = "Dockerfile"
MAX_DOCKERFILE_BYTES = 1 << 20


def context_limit(settings: Settings) -> int:
    """The largest context tar accepted (bytes on the wire)."""
    limit = getattr(settings, "build_context_max_bytes", None)
    return int(limit) if isinstance(limit, int) else settings.max_upload_bytes


async def receive_context(
    settings: Settings, chunks: AsyncIterable[bytes], size: int | None
) -> Path:
    """The request body written to a temp file, which the caller removes; past
    :func:`context_limit` PayloadTooLarge (413), up front when the size is announced."""
    limit = context_limit(settings)
    if size is not None and size > limit:
        raise errors.PayloadTooLarge(f"a build context is at most {limit} bytes", limit=limit)
    directory = settings.data_dir / "uploads"
    await anyio.to_thread.run_sync(_sweep_uploads, directory, 2 * settings.build_timeout_s)
    fd, name = tempfile.mkstemp(prefix="context-", suffix=".tar", dir=directory)
    path = Path(name)
    try:
        written = 0
        async with await anyio.open_file(fd, "wb", closefd=True) as out:
            async for chunk in chunks:
                written += len(chunk)
                if written > limit:
                    raise errors.PayloadTooLarge(
                        f"a build context is at most {limit} bytes", limit=limit
                    )
                await out.write(chunk)
    except BaseException:
        remove_context(path)
        raise
    return path


def _sweep_uploads(directory: Path, older_than_s: float) -> None:
    """Make the uploads dir; remove contexts a crashed server left (older than any
    build can be)."""
    directory.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - older_than_s
    for stale in directory.glob("context-*.tar"):
        with contextlib.suppress(OSError):
            if stale.stat().st_mtime < cutoff:
                stale.unlink()


def remove_context(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def read_dockerfile(context: Path, dockerfile: str) -> str:
    """The Dockerfile at ``dockerfile`` inside the context tar (InvalidRequest if none)."""
    import tarfile

    wanted = dockerfile.lstrip("./") if dockerfile.startswith("./") else dockerfile
    if not wanted or wanted.startswith("/") or ".." in wanted.split("/"):
        raise errors.InvalidRequest(
            f"dockerfile {dockerfile!r} must be a relative path inside the context",
            field="dockerfile",
        )
    try:
        with tarfile.open(context, "r:*") as tar:
            for member in tar:
                if member.name.lstrip("./").rstrip("/") == wanted and member.isfile():
                    if member.size > MAX_DOCKERFILE_BYTES:
                        raise errors.InvalidRequest(f"{dockerfile} is over 1 MiB")
                    handle = tar.extractfile(member)
                    if handle is None:
                        break
                    return handle.read().decode("utf-8", errors="replace")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise errors.InvalidRequest(f"the build context is not a readable tar: {exc}") from None
    raise errors.InvalidRequest(
        f"no {dockerfile} in the build context (give its path with dockerfile=)",
        field="dockerfile",
    )


class ImageJobs:
    """Runs builds and imports for the API (one object per app)."""

    def __init__(self, settings: Settings, manager: UsageSource) -> None:
        self._settings = settings
        self._manager = manager
        self._deps: Any = None  # one BuildDeps per app: builds share its locks

    @contextlib.asynccontextmanager
    async def _address(self) -> AsyncIterator[str]:
        """A guest address for a builder VM, reserved in the manager: no live sandbox,
        no sandbox created while the build runs and no other build gets it."""
        async with self._manager.reserve_address() as address:
            yield address

    async def check_build(
        self, name: str, context: Path, dockerfile: str, build_args: dict[str, str]
    ) -> str:
        """The Dockerfile's text once it plans (InvalidRequest, with the line, otherwise):
        refused before anything streams or boots."""
        from emberbox.images import dockerfile as parser

        check_name(name)
        text = await anyio.to_thread.run_sync(read_dockerfile, context, dockerfile)
        parser.plan(text, build_args)
        return text

    async def build(
        self,
        *,
        name: str,
        tenant_id: str,
        context: Path,
        dockerfile_text: str,
        build_args: dict[str, str],
        no_cache: bool,
        on_event: OnEvent,
    ) -> ImageInfo:
        """Build ``name`` from ``dockerfile_text`` and the context tar; events as they
        come (the engine's ``error`` event too, before it raises)."""
        from emberbox.service.images import build as engine

        text = dockerfile_text
        request = engine.BuildRequest(
            name=name,
            tenant=namespace(tenant_id),
            dockerfile=text,
            context=context,
            build_args=build_args,
            no_cache=no_cache,
        )
        if self._deps is None:
            self._deps = engine.BuildDeps(self._settings, addresses=self._address)
        held: list[BuildEvent] = []
        failed: list[BuildEvent] = []

        async def relay(event: BuildEvent) -> None:  # "done" goes last, after the template
            if event.kind == "done":
                held.append(event)
            elif event.kind == "error":
                failed.append(event)  # sent with its error's type, below
            else:
                await on_event(event)

        try:
            info = await engine.build_image(self._deps, request, relay)
        except errors.EmberboxError as exc:
            event = failed[0] if failed else BuildEvent("error", message=exc.message)
            await on_event(dataclasses.replace(event, error=type(exc).__name__))
            raise
        await self.after_register(info, on_event)
        for event in held or [BuildEvent("done", image=info.name)]:
            await on_event(event)
        return info

    async def import_(
        self, *, ref: str, name: str, tenant_id: str, admin: bool, on_event: OnEvent
    ) -> ImageInfo:
        """Import the OCI image ``ref`` as ``name``; progress lines as events.

        A reference to a file or directory (``oci:``, ``oci-archive:``,
        ``docker-archive:``) names the server's own files: only the operator (the
        built-in tenant, or an admin key) may import one; tenants pull from registries.
        """
        from emberbox.images import oci
        from emberbox.images.oci_ref import parse_ref

        check_name(name)
        if parse_ref(ref).path is not None and namespace(tenant_id) is not None and not admin:
            raise errors.InvalidRequest(
                "only the operator may import from the server's files; "
                "push the image to a registry and import it from there",
                field="ref",
            )
        send, receive = anyio.create_memory_object_stream[str](1000)

        loop_thread = threading.get_ident()

        def progress(line: str) -> None:  # from the event loop, or from a worker thread
            with contextlib.suppress(anyio.WouldBlock, anyio.BrokenResourceError):
                if threading.get_ident() == loop_thread:
                    send.send_nowait(line)
                else:
                    anyio.from_thread.run_sync(send.send_nowait, line)

        async def relay() -> None:
            async with receive:
                async for line in receive:
                    await on_event(BuildEvent("progress", message=line))

        failure: errors.EmberboxError | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(relay)
            try:
                info = await oci.import_oci(
                    self._settings, ref, name, tenant=namespace(tenant_id), on_progress=progress
                )
            except errors.EmberboxError as exc:  # raised below: not wrapped in a group
                failure = exc
            finally:
                send.close()
        if failure is not None:
            raise failure
        await self.after_register(info, on_event)
        await on_event(BuildEvent("done", image=info.name))
        return info

    async def after_register(self, info: ImageInfo, on_event: OnEvent) -> None:
        """Make the image's template now (when configured), so that its first sandbox
        restores instead of booting; a failure only delays that to the first create."""
        if not self._settings.image_template_after_build or not self._settings.templates:
            return
        await on_event(BuildEvent("progress", message=f"making the template of {info.name}"))
        started = time.monotonic()
        try:
            await make_template(self._settings, info)
        except errors.EmberboxError as exc:
            log.warning("image %s: no template yet: %s", info.ref, exc.message)
            await on_event(BuildEvent("progress", message=f"no template yet: {exc.message}"))
            return
        seconds = round(time.monotonic() - started, 2)
        await on_event(
            BuildEvent("progress", message=f"template ready in {seconds} s", seconds=seconds)
        )


_DRIVERS: dict[Path, Any] = {}


async def make_template(settings: Settings, info: ImageInfo) -> None:
    """The template of ``info`` in the default shape, as the first create would make it
    (:class:`~emberbox.service.vm.templates.Templates`: same key, same files)."""
    from emberbox.service.vm.templates import Templates
    from emberbox.vmm.select import DriverCache

    cache = _DRIVERS.setdefault(settings.images_dir, DriverCache())
    driver = await anyio.to_thread.run_sync(lambda: cache.get(settings, lambda: info.files))
    await Templates(settings).ensure(
        info, driver, settings.default_vcpus, settings.default_memory_mib
    )
