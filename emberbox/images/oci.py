"""Import an OCI image as an emberbox image, without a Docker daemon.

Steps (each reported through ``on_progress``):

1. ``skopeo copy <ref> oci:<work>/layout:image`` — from an OCI layout, an
   ``oci-archive:``/``docker-archive:`` tarball or a registry (oci_ref.py);
2. the layout's manifest and config are read (oci_config.py): layers, Env, WorkingDir,
   User, Labels, Entrypoint/Cmd;
3. ``umoci unpack`` applies the layers in order as root — whiteouts and opaque
   directories, hard links, symlinks, modes, owners and xattrs — into a rootfs tree;
4. the agent's own runtime goes under ``/.emberbox`` (foreign.py: the image's userland
   is never needed), with the few directories the init needs (``/dev`` …);
5. ``mkfs.ext4 -d`` writes a sparse ext4 of it: content plus headroom, capped;
6. with the kernel and initramfs of the operator's default image, the build is
   registered (``created_by="oci"``, userland ``foreign``).

Everything happens in one work directory beside the registry's blobs, removed at the
end whatever happens; every child process is killed if the import fails, times out or
is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from emberbox._version import __version__
from emberbox.config import Settings
from emberbox.errors import HostError, ImageBuildError, InvalidRequest, StorageFull
from emberbox.images import foreign, initramfs, oci_config
from emberbox.images.build import agent_files
from emberbox.images.oci_ref import OciRef, check_local, parse_ref
from emberbox.images.registry import (
    FILE_NAMES,
    ImageInfo,
    ImageRegistry,
    check_name,
    register_image,
)
from emberbox.images.rootfs import mkfs_argv

IMPORTER_VERSION = 1
LAYOUT_TAG = "image"
TOOLS = {"skopeo": "skopeo", "umoci": "umoci", "mkfs.ext4": "e2fsprogs"}
# Directories the init and the agent mount on or write to; an image may lack them.
GUEST_DIRS = ("dev", "proc", "sys", "tmp", "run", "etc", "root")
_EXT4_OVERHEAD = 1.10  # inode tables, directories, journal: over the files' own bytes
GUARD_INTERVAL_S = 0.25
Progress = Callable[[str], None]


async def import_oci(
    settings: Settings,
    ref: str,
    name: str,
    *,
    tenant: str | None,
    on_progress: Progress | None = None,
) -> ImageInfo:
    """Import the OCI image ``ref`` as image ``name`` of ``tenant`` (None: shared).

    InvalidRequest for a bad reference or name, a missing file, or a source skopeo
    cannot read (an unreachable registry, an unknown tag); ImageBuildError when
    unpacking or writing the disk fails; HostError when a tool is missing.
    """
    progress = on_progress or (lambda _msg: None)
    check_name(name)
    source = parse_ref(ref)
    check_local(source)
    _check_tools()
    base = await asyncio.to_thread(_base_image, settings)
    work = Path(tempfile.mkdtemp(prefix=".oci-import-", dir=settings.images_dir))
    try:
        return await _import(settings, source, name, tenant, base, work, progress)
    finally:  # shielded: a cancelled import still removes its (maybe large) tree
        await asyncio.shield(asyncio.to_thread(shutil.rmtree, work, True))


async def _import(
    settings: Settings,
    source: OciRef,
    name: str,
    tenant: str | None,
    base: ImageInfo,
    work: Path,
    progress: Progress,
) -> ImageInfo:
    layout, bundle, out = work / "layout", work / "bundle", work / "out"
    timeout = settings.oci_import_timeout_s
    guard = partial(check_free_space, settings)
    progress(f"fetching {source.source}")
    fetch = f"cannot fetch {source.source}"
    await _run(skopeo_copy_argv(source, layout), timeout, fetch, guard)
    digest, manifest, config_blob = oci_config.read_layout(layout, LAYOUT_TAG)
    config = oci_config.image_config(config_blob)
    layers = oci_config.layers(manifest)
    rootfs_size_mib(sum(x["size"] for x in layers), 0, settings.oci_max_rootfs_mib)
    progress(f"unpacking {len(layers)} layers (umoci)")
    unpack = "umoci could not unpack the image"
    await _run(umoci_unpack_argv(layout, bundle), timeout, unpack, guard)
    rootfs = bundle / "rootfs"
    progress("adding the agent's runtime under /.emberbox")
    files = agent_files()
    await asyncio.to_thread(_prepare_rootfs, rootfs, files)
    content = await asyncio.to_thread(tree_bytes, rootfs)
    size_mib = rootfs_size_mib(
        content, settings.oci_rootfs_headroom_mib, settings.oci_max_rootfs_mib
    )
    progress(
        f"writing the ext4 root filesystem ({content >> 20} MiB of files, {size_mib} MiB disk)"
    )
    out.mkdir()
    mkfs = mkfs_argv(rootfs, out / FILE_NAMES["rootfs"], size_mib)
    await _run(mkfs, timeout, "mkfs.ext4 failed", guard)
    await asyncio.to_thread(shutil.rmtree, bundle, True)
    _link_boot_files(base, out)
    image_hash = await asyncio.to_thread(import_hash, digest, base.image_hash, files, size_mib)
    record = {
        "description": f"imported from {source.source}",
        "image_hash": image_hash,
        "emberbox_version": __version__,
        "built_at": datetime.now(UTC).isoformat(),
        "kernel": base.manifest.get("kernel", {}),
        "modules": base.manifest.get("modules", []),
        "base": source.source,
        "oci": {"manifest_digest": digest, "rootfs_content_bytes": content, "size_mib": size_mib},
        "layers": layers,
        "config": config.to_dict(),
        "userland": config.userland,  # also at the top, where templates.py looks
        "created_by": "oci",
        "files": FILE_NAMES,
    }
    progress(f"registering {name}")
    return await asyncio.to_thread(register_image, settings, name, out, record, tenant=tenant)


def skopeo_copy_argv(source: OciRef, layout: Path) -> list[str]:
    """``skopeo copy`` of ``source`` into the OCI layout ``layout`` (tag LAYOUT_TAG).

    ``--insecure-policy``: emberbox verifies no signatures (docs/images.md), and the
    host's policy.json is not ours to require.
    """
    return [
        "skopeo", "--insecure-policy", "copy", "--quiet", *source.skopeo_source_flags(),
        source.source, f"oci:{layout}:{LAYOUT_TAG}",
    ]  # fmt: skip


def umoci_unpack_argv(layout: Path, bundle: Path) -> list[str]:
    """As root, umoci keeps the layers' owners; otherwise it maps them to the caller."""
    rootless = ["--rootless"] if os.geteuid() != 0 else []
    return ["umoci", "unpack", *rootless, "--image", f"{layout}:{LAYOUT_TAG}", str(bundle)]


def rootfs_size_mib(content_bytes: int, headroom_mib: int, max_mib: int) -> int:
    """The disk's size: the files plus ext4's overhead plus headroom, at most ``max_mib``
    (InvalidRequest when the files alone do not fit)."""
    needed = int(content_bytes * _EXT4_OVERHEAD) // (1 << 20) + 64
    if needed > max_mib:
        raise InvalidRequest(
            f"the image needs about {needed} MiB, over the {max_mib} MiB limit "
            "(EMBERBOX_OCI_MAX_ROOTFS_MIB)"
        )
    return min(needed + headroom_mib, max_mib)


def import_hash(digest: str, base_hash: str, files: dict[str, bytes], size_mib: int) -> str:
    """The image's content hash: the OCI manifest, the boot files, the agent, the size."""
    runtime = foreign.host_python()[0]
    inputs = {
        "importer_version": IMPORTER_VERSION,
        "manifest_digest": digest,
        "base": base_hash,
        "python": [str(runtime), runtime.stat().st_size, runtime.stat().st_mtime_ns],
        "agent": {n: hashlib.sha256(d).hexdigest() for n, d in sorted(files.items())},
        "size_mib": size_mib,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def tree_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` (hard links once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, names in os.walk(root):
        for entry in names:
            st = os.lstat(os.path.join(dirpath, entry))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _prepare_rootfs(rootfs: Path, files: dict[str, bytes]) -> None:
    for rel in GUEST_DIRS:
        path = rootfs / rel
        if not path.exists() and not path.is_symlink():
            path.mkdir(mode=0o1777 if rel == "tmp" else 0o755)
    foreign.install_runtime(rootfs, files, initramfs.AGENT_PACKAGE)


def _link_boot_files(base: ImageInfo, out: Path) -> None:
    """The default image's kernel and initramfs, hard-linked (copied across devices)."""
    for kind in ("kernel", "vmlinux", "initrd"):
        src: Path = getattr(base.files, kind)
        if not src.is_file():
            continue
        dest = out / FILE_NAMES[kind]
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, dest)


def check_free_space(settings: Settings) -> None:
    """StorageFull when the registry's file system has less than min_free_disk_mib free:
    a layer that unpacks to far more than it weighs must not fill the host."""
    free = shutil.disk_usage(settings.images_dir).free >> 20
    if free < settings.min_free_disk_mib:
        raise StorageFull(
            f"import stopped: {settings.images_dir} has {free} MiB free, less than "
            f"min_free_disk_mib={settings.min_free_disk_mib}",
            free_mib=free,
            min_free_disk_mib=settings.min_free_disk_mib,
        )


def _check_tools() -> None:
    for tool, package in TOOLS.items():
        if shutil.which(tool) is None:
            raise HostError(f"{tool} not found: install the {package} package (make setup)")


def _base_image(settings: Settings) -> ImageInfo:
    """The operator's default image, whose kernel and initramfs an import uses; its
    init must know how to start a foreign root's agent."""
    settings.images_dir.mkdir(parents=True, exist_ok=True)
    base = ImageRegistry(settings).get(settings.default_image)
    marker = f"/newroot{foreign.RUNTIME_DIR}/bin/python3".encode()
    if marker not in base.files.initrd.read_bytes():
        raise ImageBuildError(
            f"image {base.name!r} predates imported images: rebuild it "
            f"(`emberbox image build {base.name}`)"
        )
    return base


async def _run(
    argv: list[str], timeout_s: float, failure: str, guard: Callable[[], None] | None = None
) -> None:
    """Run ``argv``; on failure raise with its stderr's tail. ``guard`` is called every
    GUARD_INTERVAL_S while it runs and may raise (the host's disk filling up). On a
    timeout, a guard's error or cancellation the process is killed (and waited for)."""
    if guard is not None:
        guard()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(timeout_s):
            talk = asyncio.ensure_future(proc.communicate())
            try:
                while not talk.done():
                    await asyncio.wait([talk], timeout=GUARD_INTERVAL_S)
                    if guard is not None and not talk.done():
                        guard()
            finally:
                if not talk.done():
                    talk.cancel()
            out, err = talk.result()
    except TimeoutError:
        raise ImageBuildError(f"{failure}: `{argv[0]}` took over {timeout_s:g} s") from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
    if proc.returncode != 0:
        tail = (err or out).decode(errors="replace").strip()[-1500:]
        error = InvalidRequest if argv[0] == "skopeo" else ImageBuildError
        raise error(f"{failure}: {tail or f'exit {proc.returncode}'}")
