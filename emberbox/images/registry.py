"""Registered guest images: a name links to a content-addressed build, per namespace.

Layout::

    images/
      default -> blobs/3f2a…                    (operator-shared; swapped atomically)
      tenants/<tenant id>/grader -> ../../blobs/9c1e…   (one tenant's own images)
      blobs/3f2a…/manifest.json, vmlinuz, vmlinux, initramfs.cpio, rootfs.ext4

An image's *ref* is its path under ``images/``: ``default`` for a shared image,
``tenants/<tenant id>/grader`` for a tenant's. Sandboxes and snapshots record the ref,
so the VM layer resolves it without knowing tenants; callers that act for a tenant pass
``tenant=`` and a bare name: the tenant's own image first, then the shared one, and
another tenant's image is an unknown name.

Running sandboxes keep pointing at the blob they booted from, so a rebuild never pulls
a disk from under a VM; blobs no name, snapshot, sandbox or process uses any more are
collected by :func:`collectable_blobs` + :meth:`ImageRegistry.remove_blob`.
Callers name images; they never pass host paths.
"""

from __future__ import annotations

import builtins
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from emberbox import errors
from emberbox.config import Settings
from emberbox.errors import ImageNotFound
from emberbox.store.records import LOCAL_TENANT_ID
from emberbox.vmm.base import BootFiles

MANIFEST = "manifest.json"
FILE_NAMES = {
    "kernel": "vmlinuz",
    "vmlinux": "vmlinux",
    "initrd": "initramfs.cpio",
    "rootfs": "rootfs.ext4",
}
BLOBS = "blobs"
TENANTS = "tenants"
RESERVED_NAMES = frozenset({BLOBS, TENANTS, ".", ".."})
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
HASH_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
USERLANDS = ("emberbox", "foreign")
LOCK_FILE = ".registry.lock"


@dataclass(frozen=True)
class ImageConfig:
    """The image's defaults for every command in its sandboxes (a request's own win)."""

    env: dict[str, str] = field(default_factory=dict)  # Dockerfile ENV / OCI Env
    workdir: str = ""  # "" = the agent's default
    user: str = ""  # "" = root; "name" or "uid[:gid]"
    labels: dict[str, str] = field(default_factory=dict)
    cmd: list[str] | None = None  # recorded only (CMD/ENTRYPOINT/EXPOSE are metadata)
    userland: str = "emberbox"  # our Debian rootfs with python3 + agent, or "foreign"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> ImageConfig:
        """The config a manifest holds; missing or malformed keys take the defaults."""
        if not isinstance(raw, Mapping):
            return cls()
        env = raw.get("env")
        labels = raw.get("labels")
        cmd = raw.get("cmd")
        userland = str(raw.get("userland") or "emberbox")
        return cls(
            env={str(k): str(v) for k, v in env.items()} if isinstance(env, Mapping) else {},
            workdir=str(raw.get("workdir") or ""),
            user=str(raw.get("user") or ""),
            labels={str(k): str(v) for k, v in labels.items()}
            if isinstance(labels, Mapping)
            else {},
            cmd=[str(c) for c in cmd] if isinstance(cmd, list) else None,
            userland=userland if userland in USERLANDS else "emberbox",
        )


@dataclass(frozen=True)
class ImageInfo:
    name: str
    directory: Path  # the resolved blob directory
    manifest: dict[str, Any]
    files: BootFiles
    size_bytes: int
    created_at: datetime
    tenant: str | None = None  # None: operator-shared

    @property
    def image_hash(self) -> str:
        return str(self.manifest.get("image_hash", self.directory.name))

    @property
    def kernel_release(self) -> str:
        return str(self.manifest.get("kernel", {}).get("release", ""))

    @property
    def ref(self) -> str:
        """What sandboxes and snapshots record: resolvable without the tenant."""
        return image_ref(self.name, self.tenant)

    @property
    def config(self) -> ImageConfig:
        return ImageConfig.from_dict(self.manifest.get("config"))

    @property
    def base(self) -> str:
        return str(self.manifest.get("base") or "")

    @property
    def layers(self) -> list[dict[str, Any]]:
        raw = self.manifest.get("layers")
        return [dict(x) for x in raw if isinstance(x, Mapping)] if isinstance(raw, list) else []

    @property
    def created_by(self) -> str:
        return str(self.manifest.get("created_by") or "recipe")


# -- names, tenants and refs -----------------------------------------------------------


def namespace(tenant: str | None) -> str | None:
    """The namespace a tenant's images live in; None (and the built-in tenant): shared."""
    return None if tenant in (None, "", LOCAL_TENANT_ID) else tenant


def check_name(name: str) -> str:
    """``name`` when it may name an image (InvalidRequest otherwise)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in RESERVED_NAMES:
        raise errors.InvalidRequest(
            f"invalid image name {name!r}: 1-64 characters of letters, digits, ._- "
            "starting with a letter or digit (not 'blobs' or 'tenants')",
            field="name",
        )
    return name


def image_ref(name: str, tenant: str | None) -> str:
    ns = namespace(tenant)
    return name if ns is None else f"{TENANTS}/{ns}/{name}"


def parse_ref(ref: str) -> tuple[str, str | None] | None:
    """(name, tenant) of a ref, or None when it is not one."""
    parts = ref.split("/")
    if len(parts) == 1 and NAME_RE.fullmatch(ref) and ref not in RESERVED_NAMES:
        return ref, None
    if (
        len(parts) == 3
        and parts[0] == TENANTS
        and TENANT_RE.fullmatch(parts[1])
        and NAME_RE.fullmatch(parts[2])
        and parts[2] not in RESERVED_NAMES
    ):
        return parts[2], parts[1]
    return None


def display_name(ref: str) -> str:
    """What a caller sees of a ref: the image's own name (``grader``, not the path)."""
    parsed = parse_ref(ref)
    return parsed[0] if parsed is not None else ref


def guest_files(directory: Path) -> BootFiles:
    return BootFiles(**{kind: directory / name for kind, name in FILE_NAMES.items()})


def _disk_usage(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.iterdir() if p.is_file())


def load_image(name: str, link: Path, tenant: str | None = None) -> ImageInfo | None:
    """The image behind ``link``, or None when it is incomplete or unreadable."""
    directory = link.resolve()
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = guest_files(directory)
        if not all(p.is_file() for p in (files.kernel, files.initrd, files.rootfs)):
            return None
        created = datetime.fromtimestamp((directory / MANIFEST).stat().st_mtime, UTC)
        size = _disk_usage(directory)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    return ImageInfo(name, directory, manifest, files, size, created, namespace(tenant))


# -- the registry ----------------------------------------------------------------------


class ImageRegistry:
    """Looks images up by name (and tenant) in ``settings.images_dir``."""

    def __init__(self, settings: Settings) -> None:
        self.root = settings.images_dir

    @property
    def blobs(self) -> Path:
        return self.root / BLOBS

    def _dir(self, tenant: str | None) -> Path:
        ns = namespace(tenant)
        return self.root if ns is None else self.root / TENANTS / ns

    def _scan(self, tenant: str | None) -> builtins.list[ImageInfo]:
        directory = self._dir(tenant)
        if not directory.is_dir():
            return []
        found = []
        for link in sorted(directory.iterdir()):
            if link.name.startswith(".") or link.name in RESERVED_NAMES:
                continue
            if not NAME_RE.fullmatch(link.name):
                continue
            info = load_image(link.name, link, tenant)
            if info is not None:
                found.append(info)
        return found

    def list(self, tenant: str | None = None) -> builtins.list[ImageInfo]:
        """The images ``tenant`` sees: its own, then the shared ones it does not shadow.
        Without a tenant: the shared ones."""
        own = self._scan(tenant) if namespace(tenant) is not None else []
        names = {info.name for info in own}
        return own + [info for info in self._scan(None) if info.name not in names]

    def list_all(self) -> builtins.list[ImageInfo]:
        """Every image of every namespace (the operator's view, and what GC keeps)."""
        found = self._scan(None)
        tenants_dir = self.root / TENANTS
        if tenants_dir.is_dir():
            for directory in sorted(tenants_dir.iterdir()):
                if TENANT_RE.fullmatch(directory.name):
                    found.extend(self._scan(directory.name))
        return found

    def names(self, tenant: str | None = None) -> builtins.list[str]:
        return [info.name for info in self.list(tenant)]

    def get(self, name: str, *, tenant: str | None = None) -> ImageInfo:
        """The image ``name`` as ``tenant`` sees it (ImageNotFound otherwise).

        ``name`` may also be a ref (``tenants/<id>/<name>``, as sandboxes record it):
        without a tenant (the service's own lookups, the operator) any ref resolves;
        with one, only that tenant's own.
        """
        ns = namespace(tenant)
        parsed = parse_ref(name) if isinstance(name, str) else None
        if parsed is not None:
            bare, owner = parsed
            if owner is not None and (ns is None or owner == ns):
                info = load_image(bare, self._dir(owner) / bare, owner)
                if info is not None:
                    return info
            elif owner is None:
                for candidate in ([ns] if ns is not None else []) + [None]:
                    info = load_image(bare, self._dir(candidate) / bare, candidate)
                    if info is not None:
                        return info
        raise ImageNotFound(name, self.names(tenant))

    def find_by_path(self, path: str) -> tuple[ImageInfo, str] | None:
        """The image and file kind that ``path`` names, if it is a registered image's file.

        Only resolves the path (no open, no read): anything else on the host is refused
        by the caller.
        """
        try:
            wanted = Path(path).resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        for info in self.list():
            for kind in FILE_NAMES:
                if getattr(info.files, kind).resolve() == wanted:
                    return info, kind
        return None

    # -- changes ---------------------------------------------------------------------------

    def link(self, name: str, blob: Path, *, tenant: str | None) -> None:
        """Point ``name`` in ``tenant``'s namespace at ``blob``, atomically."""
        check_name(name)
        directory = self._dir(tenant)
        directory.mkdir(parents=True, exist_ok=True)
        target = Path(os.path.relpath(blob, directory))
        tmp = directory / f".{name}.link.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        try:
            os.replace(tmp, directory / name)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise errors.ImageBuildError(f"cannot register image {name!r}: {exc}") from exc

    def unlink(self, name: str, *, tenant: str | None) -> ImageInfo:
        """Remove ``name`` from ``tenant``'s own namespace (never a shared image for a
        tenant); the blob stays until collected."""
        check_name(name)
        link = self._dir(tenant) / name
        info = load_image(name, link, tenant)
        if info is None:
            raise ImageNotFound(name, self.names(tenant))
        link.unlink()
        return info

    def blob_hashes(self) -> builtins.list[str]:
        if not self.blobs.is_dir():
            return []
        return sorted(
            p.name for p in self.blobs.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def blob_manifest(self, image_hash: str) -> dict[str, Any]:
        try:
            raw = json.loads((self.blobs / image_hash / MANIFEST).read_text())
        except (OSError, ValueError):
            return {}
        return raw if isinstance(raw, dict) else {}

    def remove_blob(self, image_hash: str) -> int:
        """Delete one blob (the caller decided nobody uses it); returns bytes freed."""
        if not HASH_RE.fullmatch(image_hash) or image_hash.startswith("."):
            raise errors.InvalidRequest(f"invalid blob {image_hash!r}")
        blob = self.blobs / image_hash
        if not blob.is_dir():
            return 0
        # Files hard-linked elsewhere too (a base's kernel) free nothing.
        freed = sum(
            st.st_blocks * 512
            for st in (p.stat() for p in blob.iterdir() if p.is_file())
            if st.st_nlink == 1
        )
        trash = self.blobs / f".trash.{image_hash}.{os.getpid()}"
        os.replace(blob, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return freed


# -- quotas and garbage collection (pure) ------------------------------------------------


@dataclass(frozen=True)
class ImageQuota:
    max_images: int
    max_bytes: int


def quota_for(settings: Settings, tenant: str | None) -> ImageQuota | None:
    """The tenant's image quota; None for the operator's shared namespace."""
    if namespace(tenant) is None:
        return None
    return ImageQuota(settings.tenant_max_images, settings.tenant_max_image_bytes)


def check_quota(
    quota: ImageQuota | None,
    own: Iterable[ImageInfo],
    name: str,
    new_hash: str,
    new_bytes: int,
) -> None:
    """QuotaExceeded when registering ``name`` (``new_bytes`` in blob ``new_hash``)
    would put the tenant past its image count or bytes. Replacing a name does not add
    to the count; a blob the tenant already holds is not counted twice."""
    if quota is None:
        return
    own = builtins.list(own)
    names = {info.name for info in own} | {name}
    if len(names) > quota.max_images:
        raise errors.QuotaExceeded(
            f"image quota: at most {quota.max_images} images per tenant "
            f"(you have {len(own)}); delete one first",
            quota="images",
            limit=quota.max_images,
        )
    sizes = {info.image_hash: info.size_bytes for info in own if info.name != name}
    sizes[new_hash] = new_bytes
    total = sum(sizes.values())
    if total > quota.max_bytes:
        raise errors.QuotaExceeded(
            f"image quota: {total} bytes of images would exceed the tenant's "
            f"{quota.max_bytes} bytes; delete an image first",
            quota="image_bytes",
            limit=quota.max_bytes,
        )


def collectable_blobs(
    blobs: Iterable[str],
    linked: Iterable[str],
    in_use: Iterable[str],
) -> builtins.list[str]:
    """The blobs nobody needs: not named by any image, not used by a sandbox, snapshot,
    template or process (``in_use``, as the service found them)."""
    keep = set(linked) | set(in_use)
    return sorted(b for b in blobs if b not in keep and not b.startswith("."))


@contextmanager
def registry_lock(images_dir: Path) -> Iterator[None]:
    """Held while a blob is registered and while blobs are collected: a blob being
    registered is never collected half-way (between its move and its link)."""
    images_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(images_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- registering -----------------------------------------------------------------------


def register_image(
    settings: Settings,
    name: str,
    source_dir: Path,
    manifest: dict[str, Any],
    *,
    tenant: str | None,
) -> ImageInfo:
    """Register the boot files in ``source_dir`` as image ``name`` of ``tenant``.

    ``source_dir`` holds the files named by FILE_NAMES (vmlinux optional) and is moved
    to ``blobs/<manifest["image_hash"]>`` (consumed: when that blob exists already, the
    same content, it is deleted instead). The manifest is written beside them; the
    name's link is swapped atomically. QuotaExceeded (nothing registered, ``source_dir``
    left for the caller to remove) past the tenant's image quota.
    """
    check_name(name)
    image_hash = str(manifest.get("image_hash") or "")
    if not HASH_RE.fullmatch(image_hash) or image_hash.startswith("."):
        raise errors.InvalidRequest(f"manifest image_hash {image_hash!r} is not a valid hash")
    files = guest_files(source_dir)
    missing = [p.name for p in (files.kernel, files.initrd, files.rootfs) if not p.is_file()]
    if missing:
        raise errors.ImageBuildError(f"image {name!r} lacks {', '.join(missing)}")
    with registry_lock(settings.images_dir):
        return _register_locked(settings, name, source_dir, manifest, image_hash, tenant)


def _register_locked(
    settings: Settings,
    name: str,
    source_dir: Path,
    manifest: dict[str, Any],
    image_hash: str,
    tenant: str | None,
) -> ImageInfo:
    registry = ImageRegistry(settings)
    own = [i for i in registry.list(tenant) if i.tenant == namespace(tenant)]
    check_quota(quota_for(settings, tenant), own, name, image_hash, _disk_usage(source_dir))
    full = {
        **manifest,
        "name": name,
        "tenant": namespace(tenant),
        "ref": image_ref(name, tenant),
        "config": ImageConfig.from_dict(manifest.get("config")).to_dict(),
        "registered_at": datetime.now(UTC).isoformat(),
    }
    full.setdefault("created_by", "recipe")
    full.setdefault("base", "")
    full.setdefault("layers", [])
    full.setdefault("files", FILE_NAMES)
    blob = registry.blobs / image_hash
    registry.blobs.mkdir(parents=True, exist_ok=True)
    if (blob / MANIFEST).is_file():
        shutil.rmtree(source_dir, ignore_errors=True)  # the same content is there already
    else:
        (source_dir / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
        shutil.rmtree(blob, ignore_errors=True)  # an incomplete leftover
        try:
            os.replace(source_dir, blob)
        except OSError:  # another file system: copy (sparse-aware via copy2), then swap
            staging = registry.blobs / f".{image_hash}.{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(source_dir, staging, copy_function=_copy_sparse)
            os.replace(staging, blob)
            shutil.rmtree(source_dir, ignore_errors=True)
    registry.link(name, blob, tenant=tenant)
    return registry.get(image_ref(name, tenant))


def _copy_sparse(src: str, dst: str) -> str:
    import subprocess

    subprocess.run(["cp", "--sparse=always", "--preserve=mode,timestamps", src, dst], check=True)
    return dst
