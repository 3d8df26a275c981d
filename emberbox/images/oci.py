"""Import an OCI image as an emberbox image, without a Docker daemon.

Steps (each reported through ``on_progress``):

1. ``skopeo copy <ref> oci:<work>/layout:image`` — from an OCI layout, an
   ``oci-archive:``/``docker-archive:`` tarball or a registry (oci_ref.py);
2. the layout's manifest and config are read (oci_config.py): layers, Env, WorkingDir,
   User, Labels, Entrypoint/Cmd; the image's hash is known now, and a blob of it
   already registered (an earlier import) is reused: steps 3 to 5 are skipped;
3. ``umoci unpack`` applies the layers in order as root — whiteouts and opaque
   directories, hard links, symlinks, modes, owners and xattrs — into a rootfs tree;
4. the agent's own runtime goes under ``/.emberbox`` (foreign.py: the image's userland
   is never needed), with the few directories the init needs (``/dev`` …);
5. ``mkfs.ext4 -d`` writes a sparse ext4 of it (oci_disk.py: blocks and inodes plus
   headroom, capped);
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
import re
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from emberbox._version import __version__
from emberbox.config import Settings
from emberbox.errors import HostError, ImageBuildError, InvalidRequest, StorageFull
from emberbox.images import foreign, initramfs, oci_config, oci_disk
from emberbox.images.build import agent_files
from emberbox.images.oci_ref import OciRef, check_local, parse_ref
from emberbox.images.registry import (
    FILE_NAMES,
    MANIFEST,
    ImageConfig,
    ImageInfo,
    ImageRegistry,
    check_name,
    register_image,
)

IMPORTER_VERSION = 1
LAYOUT_TAG = "image"
TOOLS = {"skopeo": "skopeo", "umoci": "umoci", "mkfs.ext4": "e2fsprogs"}
# Directories the init and the agent mount on or write to; an image may lack them.
GUEST_DIRS = ("dev", "proc", "sys", "tmp", "run", "etc", "root")
GUARD_INTERVAL_S = 0.25
_LOGRUS_MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)"')
Progress = Callable[[str], None]
Guard = Callable[[], None]


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
    guard = partial(check_free_space, settings)
    digest, manifest, config = await _fetch(settings, source, layout, guard, progress)
    layers = oci_config.layers(manifest)
    files = agent_files()
    image_hash = await asyncio.to_thread(import_hash, settings, digest, base.image_hash, files)
    known = await asyncio.to_thread(_reuse_blob, settings, image_hash, out)
    if known is not None:  # imported before (another name, archive or registry): its disk
        progress(f"already imported as blob {image_hash}: registering {name}")
        return await asyncio.to_thread(register_image, settings, name, out, known, tenant=tenant)
    oci_disk.check_compressed_size(sum(x["size"] for x in layers), settings.oci_max_rootfs_mib)
    progress(f"unpacking {len(layers)} layers (umoci)")
    unpack = "umoci could not unpack the image"
    await _run(umoci_unpack_argv(layout, bundle), settings.oci_import_timeout_s, unpack, guard)
    progress("adding the agent's runtime under /.emberbox")
    usage = await asyncio.to_thread(_prepare_rootfs, bundle / "rootfs", files)
    size_mib = await _write_disk(settings, bundle / "rootfs", out, usage, guard, progress)
    await asyncio.to_thread(shutil.rmtree, bundle, True)
    _link_boot_files(base, out)
    record = {
        "description": f"imported from {source.source}",
        "image_hash": image_hash,
        "emberbox_version": __version__,
        "built_at": datetime.now(UTC).isoformat(),
        "kernel": base.manifest.get("kernel", {}),
        "modules": base.manifest.get("modules", []),
        "base": source.source,
        "oci": {
            "manifest_digest": digest,
            "rootfs_content_bytes": usage.file_bytes,
            "size_mib": size_mib,
        },
        "layers": layers,
        "config": config.to_dict(),
        "userland": config.userland,  # also at the top, where templates.py looks
        "created_by": "oci",
        "files": FILE_NAMES,
    }
    progress(f"registering {name}")
    return await asyncio.to_thread(register_image, settings, name, out, record, tenant=tenant)


async def _fetch(
    settings: Settings, source: OciRef, layout: Path, guard: Guard, progress: Progress
) -> tuple[str, dict[str, Any], ImageConfig]:
    """skopeo copies ``source`` into ``layout``; its manifest digest, manifest, config."""
    progress(f"fetching {source.source}")
    failure = f"cannot fetch {source.source}"
    await _run(skopeo_copy_argv(source, layout), settings.oci_import_timeout_s, failure, guard)
    digest, manifest, config_blob = oci_config.read_layout(layout, LAYOUT_TAG)
    return digest, manifest, oci_config.image_config(config_blob)


async def _write_disk(
    settings: Settings,
    rootfs: Path,
    out: Path,
    usage: oci_disk.TreeUsage,
    guard: Guard,
    progress: Progress,
) -> int:
    """mkfs.ext4 -d of ``rootfs`` into ``out``; the disk's size in MiB."""
    size_mib, inodes = oci_disk.disk_plan(
        usage, settings.oci_rootfs_headroom_mib, settings.oci_max_rootfs_mib
    )
    progress(
        f"writing the ext4 root filesystem ({usage.file_bytes >> 20} MiB of files, "
        f"{size_mib} MiB disk)"
    )
    await asyncio.to_thread(out.mkdir)
    argv = oci_disk.ext4_argv(rootfs, out / FILE_NAMES["rootfs"], size_mib, inodes)
    await _run(argv, settings.oci_import_timeout_s, "mkfs.ext4 failed", guard)
    return size_mib


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


def import_hash(settings: Settings, digest: str, base_hash: str, files: dict[str, bytes]) -> str:
    """The image's content hash, known before unpacking: the OCI manifest, the boot
    files, the agent and its runtime, and the settings that size the disk."""
    runtime = foreign.host_python()[0]
    inputs = {
        "importer_version": IMPORTER_VERSION,
        "manifest_digest": digest,
        "base": base_hash,
        "python": [str(runtime), runtime.stat().st_size, runtime.stat().st_mtime_ns],
        "agent": {n: hashlib.sha256(d).hexdigest() for n, d in sorted(files.items())},
        "disk": [settings.oci_rootfs_headroom_mib, settings.oci_max_rootfs_mib],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _reuse_blob(settings: Settings, image_hash: str, out: Path) -> dict[str, Any] | None:
    """The manifest of blob ``image_hash`` when it is there, its files hard-linked into
    ``out`` for register_image (which then only links the name); None otherwise."""
    blob = ImageRegistry(settings).blobs / image_hash
    try:
        manifest = json.loads((blob / MANIFEST).read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a manifest")
        out.mkdir()
        for file_name in FILE_NAMES.values():
            if (blob / file_name).is_file():
                os.link(blob / file_name, out / file_name)
    except (OSError, ValueError):  # none, or collected meanwhile: import it afresh
        shutil.rmtree(out, ignore_errors=True)
        return None
    return manifest


def _prepare_rootfs(rootfs: Path, files: dict[str, bytes]) -> oci_disk.TreeUsage:
    """The directories the guest needs and the agent's runtime; what the tree takes."""
    for rel in GUEST_DIRS:
        path = rootfs / rel
        if not path.exists() and not path.is_symlink():
            path.mkdir(mode=0o1777 if rel == "tmp" else 0o755)
    foreign.install_runtime(rootfs, files, initramfs.AGENT_PACKAGE)
    return oci_disk.tree_usage(rootfs)


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


def tool_message(output: str) -> str:
    """What a failed tool said: skopeo's and umoci's logrus lines (``time=… level=fatal
    msg="…"``) reduced to the last message, anything else to its tail."""
    found = _LOGRUS_MSG.findall(output)
    if found:
        return str(found[-1]).replace('\\"', '"')[-1500:]
    return output.strip()[-1500:]


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


async def _run(argv: list[str], timeout_s: float, failure: str, guard: Guard | None = None) -> None:
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
        tail = tool_message((err or out).decode(errors="replace"))
        error = InvalidRequest if argv[0] == "skopeo" else ImageBuildError
        raise error(f"{failure}: {tail or f'exit {proc.returncode}'}")
