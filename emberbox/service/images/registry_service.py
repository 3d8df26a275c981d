"""The image registry as the API serves it: a tenant's view (its own images, then the
operator's shared ones), what uses each image, deletes refused while anything does, and
the garbage collection of blobs nothing needs any more.

Who uses an image: sandboxes that are not stopped and snapshots (the store's rows; they
record the image's ref, see :mod:`emberbox.images.registry`). Who uses a *blob*: any
name that links to it, any snapshot made from it (``image_hash``), any sandbox whose
image was first registered as it (the blob's manifest ``ref``), any process with a file
of it (or of a template made from it) open or mapped — running VMs restored from a
template hold its disk chain, which ends in the blob. Only blobs none of these need
are deleted, with their templates; and only blobs registered as images
(:func:`~emberbox.images.registry.register_image`: builds and imports), never a
recipe's old builds.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio.to_thread

from emberbox import errors
from emberbox.config import Settings
from emberbox.images.registry import (
    MANIFEST,
    ImageInfo,
    ImageRegistry,
    check_name,
    collectable_blobs,
    namespace,
    registry_lock,
)
from emberbox.service.sandboxes.handles import SandboxRecord
from emberbox.service.sandboxes.state import SandboxState
from emberbox.service.snapshots.records import SnapshotRecord

log = logging.getLogger(__name__)

#: Sandboxes in these states use their image (a stopped or failed one holds no VM).
USING_STATES = frozenset(
    {SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED, SandboxState.STOPPING}
)


class UsageSource(Protocol):
    """``SandboxManager``: the sandboxes and snapshots the store knows."""

    async def list(
        self,
        *,
        state: SandboxState | None = None,
        metadata: dict[str, str] | None = None,
        tenant_id: str | None = None,
    ) -> builtins.list[SandboxRecord]: ...

    async def list_snapshots(
        self, sandbox_id: str | None = None, *, tenant_id: str | None = None
    ) -> builtins.list[SnapshotRecord]: ...

    def reserve_address(self) -> contextlib.AbstractAsyncContextManager[str]: ...

    async def drop_spares(self, image: str) -> None: ...


@dataclass(frozen=True)
class ImageUsage:
    sandboxes: tuple[str, ...] = ()
    snapshots: tuple[str, ...] = ()

    @property
    def used(self) -> bool:
        return bool(self.sandboxes or self.snapshots)


@dataclass(frozen=True)
class ImageView:
    """An image as one caller sees it: its info and what (of theirs) uses it."""

    info: ImageInfo
    usage: ImageUsage

    @property
    def shared(self) -> bool:
        return self.info.tenant is None


@dataclass(frozen=True)
class _Users:
    """What in the store uses images (of one tenant, or everyone's), once per request."""

    sandboxes: tuple[SandboxRecord, ...]
    snapshots: tuple[SnapshotRecord, ...]

    def usage(self, ref: str) -> ImageUsage:
        return ImageUsage(
            tuple(s.id for s in self.sandboxes if s.image == ref),
            tuple(s.id for s in self.snapshots if s.image == ref),
        )


class ImageCatalogService:
    """List, inspect and delete images for a tenant; collect unused blobs."""

    def __init__(self, settings: Settings, registry: Any, users: UsageSource) -> None:
        self._settings = settings
        self._registry = registry
        self._users = users

    async def _load_users(self, viewer: str | None = None) -> _Users:
        """Sandboxes using an image and snapshots: ``viewer``'s own (None: everyone's)."""
        sandboxes: list[SandboxRecord] = []
        scope: dict[str, Any] = {} if viewer is None else {"tenant_id": viewer}
        for state in sorted(USING_STATES):
            sandboxes.extend(await self._users.list(state=state, **scope))
        snapshots = await self._users.list_snapshots(**scope)
        return _Users(tuple(sandboxes), tuple(snapshots))

    async def list(self, tenant_id: str, *, admin: bool = False) -> builtins.list[ImageView]:
        """The images ``tenant_id`` sees, with what of its own (an admin: anyone's) uses
        each."""
        infos = await anyio.to_thread.run_sync(self._list, tenant_id)
        users = await self._load_users(None if admin else tenant_id)
        return [ImageView(info, users.usage(info.ref)) for info in infos]

    def _list(self, tenant_id: str) -> builtins.list[ImageInfo]:
        if isinstance(self._registry, ImageRegistry):
            return self._registry.list(tenant_id)
        return [_as_info(i) for i in self._registry.list()]  # a catalog without tenants

    async def get(self, name: str, tenant_id: str, *, admin: bool = False) -> ImageView:
        """One image as ``tenant_id`` sees it; NotFound (404) for an unknown name."""
        info = await self._lookup(name, tenant_id)
        users = await self._load_users(None if admin else tenant_id)
        return ImageView(info, users.usage(info.ref))

    async def _lookup(self, name: str, tenant_id: str) -> ImageInfo:
        check_name(name)
        try:
            return await anyio.to_thread.run_sync(self._get, name, tenant_id)
        except errors.ImageNotFound as exc:
            raise errors.NotFound(exc.message, image=name) from None

    def _get(self, name: str, tenant_id: str) -> ImageInfo:
        if isinstance(self._registry, ImageRegistry):
            return self._registry.get(name, tenant=tenant_id)
        return _as_info(self._registry.get(name))

    async def delete(self, name: str, tenant_id: str, *, admin: bool = False) -> int:
        """Remove ``name`` (the tenant's own; a shared one only for the operator or an
        admin) and collect the blobs nothing needs any more; returns the bytes freed.

        Conflict (409) while a sandbox or snapshot uses it, for the default image, and
        for a tenant's delete of a shared image.
        """
        info = await self._lookup(name, tenant_id)
        if info.tenant is None and namespace(tenant_id) is not None and not admin:
            raise errors.Conflict(
                f"image {name!r} is the operator's shared image; only the operator can delete it",
                image=name,
            )
        if info.tenant is None and name == self._settings.default_image:
            raise errors.Conflict(f"image {name!r} is the server's default image", image=name)
        usage = (await self._load_users()).usage(info.ref)
        if usage.used:
            parts = []
            if usage.sandboxes:
                parts.append(f"sandboxes {', '.join(usage.sandboxes)}")
            if usage.snapshots:
                parts.append(f"snapshots {', '.join(usage.snapshots)}")
            raise errors.Conflict(
                f"image {name!r} is in use by {' and '.join(parts)}; "
                "kill those sandboxes and delete those snapshots first",
                image=name,
                sandboxes=list(usage.sandboxes),
                snapshots=list(usage.snapshots),
            )
        await anyio.to_thread.run_sync(
            lambda: self._registry.unlink(name, tenant=info.tenant or None)
        )
        log.info("image %s deleted (blob %s)", info.ref, info.image_hash)
        await self._users.drop_spares(info.ref)  # a spare maps the template: not collected
        return await self.collect_garbage()

    async def collect_garbage(self) -> int:
        """Delete the blobs (and their templates) nothing needs; returns bytes freed."""
        users = await self._load_users()
        return await anyio.to_thread.run_sync(self._collect, users)

    def _collect(self, users: _Users) -> int:
        registry = self._registry
        with registry_lock(self._settings.images_dir):
            in_use = {s.image_hash for s in users.snapshots if s.image_hash}
            refs = {s.image for s in users.sandboxes} | {s.image for s in users.snapshots}
            blobs = registry.blob_hashes()
            for image_hash in blobs:
                manifest = registry.blob_manifest(image_hash)
                # Only blobs registered as images (builds, imports) are collected: a
                # recipe's old builds are the operator's (`emberbox image build`).
                if "ref" not in manifest or manifest["ref"] in refs:
                    in_use.add(image_hash)
            for ref in refs:  # what the names in use link to now
                with contextlib.suppress(errors.ImageNotFound):
                    in_use.add(registry.get(ref).image_hash)
            templates = template_hashes(self._settings.templates_dir)
            held = held_paths((registry.blobs, self._settings.templates_dir))
            in_use |= {h for h in blobs if _holds(held, registry.blobs / h)}
            for key, image_hash in templates.items():
                if _holds(held, self._settings.templates_dir / key):
                    in_use.add(image_hash)
            young = {h for h in blobs if _age_s(registry.blobs / h) < self._grace_s}
            linked = {info.image_hash for info in registry.list_all()}
            freed = 0
            for image_hash in collectable_blobs(blobs, linked, in_use | young):
                for key, of in templates.items():
                    if of == image_hash:
                        shutil.rmtree(self._settings.templates_dir / key, ignore_errors=True)
                freed += registry.remove_blob(image_hash)
                log.info("image blob %s collected", image_hash)
            return freed

    @property
    def _grace_s(self) -> float:
        return float(self._settings.image_gc_grace_s)


def _as_info(image: Any) -> ImageInfo:
    """An image of a catalog that is not the registry (a test's fake), as ImageInfo."""
    if isinstance(image, ImageInfo):
        return image
    return ImageInfo(
        image.name,
        image.directory,
        dict(image.manifest),
        image.files,
        image.size_bytes,
        image.created_at,
    )


def template_hashes(templates_dir: Path) -> dict[str, str]:
    """Template key -> the image hash it was made from (from its generations' meta)."""
    found: dict[str, str] = {}
    if not templates_dir.is_dir():
        return found
    for key_dir in templates_dir.iterdir():
        if not key_dir.is_dir():
            continue
        for meta in key_dir.glob("*/meta.json"):
            try:
                image_hash = json.loads(meta.read_text()).get("image_hash")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(image_hash, str) and image_hash:
                found[key_dir.name] = image_hash
                break
    return found


def held_paths(roots: Iterable[Path]) -> set[str]:
    """Files under ``roots`` that a process has open or mapped (its VMs' disks, memory)."""
    prefixes = tuple(str(root.resolve()) + "/" for root in roots)
    held: set[str] = set()
    proc = Path("/proc")
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for fd in (pid_dir / "fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith(prefixes):
                    held.add(target)
            with (pid_dir / "maps").open() as maps:
                for line in maps:
                    path = line.rstrip("\n").split(maxsplit=5)[-1]
                    if path.startswith(prefixes):
                        held.add(path.removesuffix(" (deleted)"))
        except OSError:
            continue
    return held


def _holds(held: set[str], directory: Path) -> bool:
    prefix = str(directory.resolve()) + "/"
    return any(path.startswith(prefix) for path in held)


def _age_s(blob: Path) -> float:
    try:
        return time.time() - max((blob / MANIFEST).stat().st_mtime, blob.stat().st_mtime)
    except OSError:
        return float("inf")
