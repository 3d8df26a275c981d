"""Build a named guest image from its recipe; a rebuild with the same inputs is a cache hit.

Steps (each reported through ``progress``): resolve the kernel package, download it,
unpack it, extract the ELF vmlinux, generate the initramfs, bootstrap the root
filesystem (cached tarball), assemble the ext4 image with the agent, write the manifest,
and switch the image's name to the new build atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from emberbox._version import __version__
from emberbox.config import Settings
from emberbox.errors import ImageBuildError, InvalidRequest
from emberbox.images import initramfs, kernel
from emberbox.images.registry import FILE_NAMES, MANIFEST, ImageInfo, ImageRegistry
from emberbox.images.rootfs import (
    ACCOUNT_LINES,
    LOGIN_PROFILES,
    POLYGLOT_PACKAGES,
    SUDOERS,
    RootfsRecipe,
    assemble_ext4,
    build_tarball,
    guest_files,
)

BUILDER_VERSION = 2  # 2: quicken_shells
BUSYBOX = Path("/bin/busybox")
Progress = Callable[[str], None]
# The guest agent's package, and where it goes in the guest (the initramfs runs it there).
GUEST_PACKAGE = Path(__file__).resolve().parent.parent / "guest"
AGENT_INSTALL_DIR = f"{initramfs.AGENT_DIR}/{initramfs.AGENT_PACKAGE}"


@dataclass(frozen=True)
class ImageRecipe:
    rootfs: RootfsRecipe
    description: str


RECIPES: dict[str, ImageRecipe] = {
    "default": ImageRecipe(
        RootfsRecipe(), "Debian bookworm (minimal) with Python 3, bash, sudo and a `user`"
    ),
    # The one-shot runner's image (emberbox.service.oneshot.runner): every language it offers.
    "polyglot": ImageRecipe(
        RootfsRecipe(packages=(*RootfsRecipe().packages, *POLYGLOT_PACKAGES)),
        "Debian bookworm (minimal) with Python 3, Node.js, GCC and G++",
    ),
}


def agent_files() -> dict[str, bytes]:
    """Every module of the guest agent's package (emberbox/guest), by path inside it.

    Found by listing the package, so a new module is installed (and changes the image
    inputs) without being named anywhere.
    """
    return {
        path.relative_to(GUEST_PACKAGE).as_posix(): path.read_bytes()
        for path in sorted(GUEST_PACKAGE.rglob("*.py"))
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_inputs(recipe: ImageRecipe, pkg: kernel.KernelPackage) -> dict[str, Any]:
    """Everything that determines an image's bytes; its hash names the build."""
    init_template = initramfs.render_init(["<modules>"])
    return {
        "builder_version": BUILDER_VERSION,
        "kernel_package": {"name": pkg.name, "version": pkg.version},
        "busybox_sha256": _sha256(BUSYBOX.read_bytes()) if BUSYBOX.exists() else None,
        "init_sha256": _sha256(init_template.encode()),
        "modules": list(initramfs.GUEST_MODULES),
        "rootfs": asdict(recipe.rootfs),
        "rootfs_key": recipe.rootfs.key(),
        "accounts": [sorted(ACCOUNT_LINES.items()), SUDOERS, sorted(LOGIN_PROFILES.items())],
        "agent_sha256": {n: _sha256(d) for n, d in sorted(agent_files().items())},
    }


def inputs_hash(inputs: dict[str, Any]) -> str:
    return _sha256(json.dumps(inputs, sort_keys=True).encode())[:16]


class ImageBuilder:
    """Builds images into ``settings.images_dir`` using ``settings.cache_dir`` for downloads."""

    def __init__(self, settings: Settings, progress: Progress | None = None) -> None:
        self.settings = settings
        self.progress: Progress = progress or (lambda _step: None)

    def build(self, name: str = "default", *, force: bool = False) -> tuple[ImageInfo, bool]:
        """Build image ``name``; returns it and whether it was already up to date."""
        recipe = RECIPES.get(name)
        if recipe is None:
            raise InvalidRequest(f"no recipe for image {name!r}; recipes: {', '.join(RECIPES)}")
        self.progress("resolving the kernel package")
        pkg = kernel.resolve_package()
        inputs = image_inputs(recipe, pkg)
        digest = inputs_hash(inputs)
        blob = self.settings.images_dir / "blobs" / digest
        if (blob / MANIFEST).exists() and not force:
            self._link(name, blob)
            return ImageRegistry(self.settings).get(name), True
        staging = blob.with_name(f".{digest}.{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            manifest = self._build_into(staging, name, recipe, pkg, inputs, digest)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            shutil.rmtree(blob, ignore_errors=True)
            staging.rename(blob)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._link(name, blob)
        return ImageRegistry(self.settings).get(name), False

    def _build_into(
        self,
        out: Path,
        name: str,
        recipe: ImageRecipe,
        pkg: kernel.KernelPackage,
        inputs: dict[str, Any],
        digest: str,
    ) -> dict[str, Any]:
        downloads = self.settings.downloads_dir
        self.progress(f"downloading {pkg.name} {pkg.version}")
        deb = kernel.download(pkg, downloads)
        self.progress("unpacking the kernel package")
        unpacked = kernel.unpack(deb, downloads / f"{pkg.name}_{pkg.version}")
        shutil.copyfile(unpacked.bzimage, out / FILE_NAMES["kernel"])
        self.progress("extracting the ELF vmlinux")
        (out / FILE_NAMES["vmlinux"]).write_bytes(
            kernel.extract_vmlinux(unpacked.bzimage.read_bytes())
        )
        self.progress("generating the initramfs")
        modules = initramfs.build_initramfs(
            BUSYBOX, initramfs.module_plan(unpacked.modules_dir), out / FILE_NAMES["initrd"]
        )
        self.progress(f"bootstrapping Debian {recipe.rootfs.suite} (mmdebstrap)")
        tarball = build_tarball(recipe.rootfs, self.settings.cache_dir / "rootfs")
        self.progress("writing the ext4 root filesystem")
        assemble_ext4(
            tarball,
            guest_files(agent_files(), AGENT_INSTALL_DIR),
            out / FILE_NAMES["rootfs"],
            recipe.rootfs.size_mib,
        )
        return {
            "name": name,
            "description": recipe.description,
            "image_hash": digest,
            "emberbox_version": __version__,
            "built_at": datetime.now(UTC).isoformat(),
            "kernel": {"release": unpacked.release, "package": pkg.name, "version": pkg.version},
            "modules": modules,
            "inputs": inputs,
            "files": FILE_NAMES,
        }

    def _link(self, name: str, blob: Path) -> None:
        link = self.settings.images_dir / name
        tmp = link.with_name(f".{name}.link.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path("blobs") / blob.name)
        try:
            os.replace(tmp, link)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ImageBuildError(f"cannot register image {name!r} at {link}: {exc}") from exc
