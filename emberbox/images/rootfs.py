"""The guest root filesystem: ``mmdebstrap`` into a tarball, then ``mkfs.ext4 -d``.

No loop mounts and no Docker: mmdebstrap writes a tarball (cached by its inputs), the
tarball is unpacked into a scratch directory, the guest agent is copied in, and
``mkfs.ext4 -d`` turns the directory into a sparse image file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from emberbox.errors import ImageBuildError

DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Docs, man pages and translations are dead weight in a sandbox image.
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)

# The unprivileged account every image has (E2B's default user, docs/e2b.md): its own
# group, a home, bash, and sudo without a password.
USER_NAME = "user"
USER_ID = 1000
ACCOUNT_LINES = {
    "etc/passwd": f"{USER_NAME}:x:{USER_ID}:{USER_ID}::/home/{USER_NAME}:/bin/bash\n",
    "etc/group": f"{USER_NAME}:x:{USER_ID}:\n",
    "etc/shadow": f"{USER_NAME}:*:19000:0:99999:7:::\n",
}
SUDOERS = f"{USER_NAME} ALL=(ALL:ALL) NOPASSWD: ALL\n"
# Login shells (E2B runs every command as `bash -l -c`) without a process of their own:
# Debian's /etc/profile less its `$(id -u)` (bash knows $EUID), and root's .profile less
# `mesg n` (only for terminals). Each fork+exec costs tens of ms under TCG.
LOGIN_PROFILES = {
    "etc/profile": """\
# /etc/profile: Debian's, without a subprocess per login shell (emberbox)
if [ "${EUID:-$(id -u)}" -eq 0 ]; then
  PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
else
  PATH="/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"
fi
export PATH
if [ "${PS1-}" ]; then
  if [ "${BASH-}" ] && [ "$BASH" != "/bin/sh" ]; then
    if [ -f /etc/bash.bashrc ]; then . /etc/bash.bashrc; fi
  elif [ "${EUID:-$(id -u)}" -eq 0 ]; then PS1='# '; else PS1='$ '; fi
fi
if [ -d /etc/profile.d ]; then
  for i in /etc/profile.d/*.sh; do
    if [ -r "$i" ]; then . "$i"; fi
  done
  unset i
fi
""",
    "root/.profile": """\
# ~/.profile: executed by Bourne-compatible login shells (no `mesg`: emberbox)
if [ "${BASH-}" ] && [ -f ~/.bashrc ]; then . ~/.bashrc; fi
if [ -t 0 ]; then mesg n 2> /dev/null || true; fi
""",
}

STATIC_BASH = "usr/bin/bash-static"
DYNAMIC_BASH = "usr/bin/bash"
C_UTF8_DIR = "usr/lib/locale/C.utf8"

# What the polyglot image adds for the one-shot runner: Node.js, and C/C++ compilers with
# the C library's headers (libc6-dev is only a Recommends of gcc).
POLYGLOT_PACKAGES = ("nodejs", "gcc", "g++", "libc6-dev")


@dataclass(frozen=True)
class RootfsRecipe:
    """What goes into an image's root filesystem."""

    suite: str = "bookworm"
    variant: str = "minbase"
    packages: tuple[str, ...] = (
        "python3", "procps", "iproute2", "ca-certificates", "sudo", "bash-static",
    )  # fmt: skip
    mirror: str = DEFAULT_MIRROR
    size_mib: int = 2048

    def key(self) -> str:
        """Cache key of the mmdebstrap tarball (size is applied later, not part of it)."""
        blob = json.dumps(
            [self.suite, self.variant, sorted(self.packages), self.mirror, DPKG_EXCLUDES]
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def mmdebstrap_argv(recipe: RootfsRecipe, out_tar: Path) -> list[str]:
    """The mmdebstrap command line producing ``out_tar`` for ``recipe``."""
    argv = ["mmdebstrap", f"--variant={recipe.variant}", "--quiet"]
    if recipe.packages:
        argv.append("--include=" + ",".join(recipe.packages))
    argv += [f"--dpkgopt={opt}" for opt in DPKG_EXCLUDES]
    argv += [recipe.suite, str(out_tar), recipe.mirror]
    return argv


def mkfs_argv(source_dir: Path, image: Path, size_mib: int, label: str = "emberbox") -> list[str]:
    """``mkfs.ext4 -d``: a filesystem populated from ``source_dir``, no mounting needed."""
    return [
        "mkfs.ext4", "-F", "-q", "-L", label, "-d", str(source_dir),
        "-E", "lazy_itable_init=1,lazy_journal_init=1",
        str(image), f"{size_mib}M",
    ]  # fmt: skip


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise ImageBuildError(f"`{argv[0]}` failed (exit {proc.returncode}): {tail}")


def build_tarball(recipe: RootfsRecipe, cache: Path) -> Path:
    """The mmdebstrap tarball for ``recipe``, built once and cached under ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    tar = cache / f"rootfs-{recipe.suite}-{recipe.key()}.tar"
    if tar.exists():
        return tar
    if shutil.which("mmdebstrap") is None:
        raise ImageBuildError("mmdebstrap not found: install the mmdebstrap package")
    # mmdebstrap picks its output format from the file name: keep the .tar suffix.
    partial = tar.with_name(f".partial-{os.getpid()}-{tar.name}")
    try:
        _run(mmdebstrap_argv(recipe, partial))
        partial.rename(tar)
    finally:
        partial.unlink(missing_ok=True)
    return tar


def guest_files(
    agent_files: dict[str, bytes], agent_dir: str, hostname: str = "emberbox"
) -> dict[str, bytes]:
    """Files the builder writes into the root filesystem (path → content): the agent's
    package files (by path inside the package) under the guest directory ``agent_dir``."""
    files = {f"{agent_dir.strip('/')}/{name}": data for name, data in agent_files.items()}
    files["etc/hostname"] = f"{hostname}\n".encode()
    files["etc/hosts"] = f"127.0.0.1 localhost\n127.0.1.1 {hostname}\n::1 localhost\n".encode()
    return files


def assemble_ext4(tarball: Path, files: dict[str, bytes], dest: Path, size_mib: int) -> None:
    """Unpack ``tarball``, add ``files``, and write the ext4 image ``dest``."""
    with tempfile.TemporaryDirectory(prefix="emberbox-rootfs-", dir=dest.parent) as scratch:
        root = Path(scratch) / "root"
        root.mkdir()
        _run(["tar", "-xpf", str(tarball), "-C", str(root), "--numeric-owner"])
        for rel, data in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(0o644)  # the agent runs as ``python3 -m``: no file is executed
        add_user(root)
        quicken_shells(root)
        _run(mkfs_argv(root, dest, size_mib))


def quicken_shells(root: Path) -> None:
    """Start-up costs every shell pays, cut in the unpacked tree ``root`` (E2B runs each
    command as ``bash -l -c``; under TCG, measured in a guest: ``bash -l -c true`` with
    ``LANG=C.UTF-8`` 15.9 -> 9.8 ms, docs/images.md):

    - ``/usr/bin/bash`` becomes Debian's ``bash-static`` (the same bash 5.2, linked
      statically): no dynamic linking, which the guest's emulated CPU does slowly. A later
      ``apt-get install bash`` brings the dynamic one back, which only costs that time;
    - ``C.UTF-8`` (the agent's ``LANG``) goes into a locale archive: one ``mmap`` for
      every category instead of a file each, in every program that calls ``setlocale``.
    """
    static = root / STATIC_BASH
    if static.is_file():
        shutil.copy2(static, root / DYNAMIC_BASH)
    if (root / C_UTF8_DIR).is_dir():
        _run(["chroot", str(root), "localedef", "--add-to-archive", f"/{C_UTF8_DIR}"])


def add_user(root: Path) -> None:
    """Create the ``user`` account in the unpacked tree ``root``: passwd, group and
    shadow lines, ``/home/user`` owned by it, and a sudoers entry (no password)."""
    for rel, line in ACCOUNT_LINES.items():
        path = root / rel
        text = path.read_text() if path.exists() else ""
        if not any(row.split(":", 1)[0] == USER_NAME for row in text.splitlines()):
            path.write_text(text + ("" if not text or text.endswith("\n") else "\n") + line)
    for rel, text in LOGIN_PROFILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    sudoers = root / "etc" / "sudoers.d" / USER_NAME
    sudoers.parent.mkdir(parents=True, exist_ok=True)
    sudoers.write_text(SUDOERS)
    sudoers.chmod(0o440)
    home = root / "home" / USER_NAME
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o750)
    os.chown(home, USER_ID, USER_ID)
