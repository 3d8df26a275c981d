"""The guest agent's own runtime, for images whose userland is not ours.

An OCI image may have no Python at all (busybox, distroless) or another C library
(alpine's musl). The agent must not depend on it, so every imported image carries a
private runtime under :data:`RUNTIME_DIR` (``/.emberbox``)::

    /.emberbox/bin/python3                 the host's Debian CPython binary
    /.emberbox/lib/ld-linux-x86-64.so.2    its dynamic loader, and every shared library
    /.emberbox/lib/lib*.so.*               python3 and its extension modules link to
    /.emberbox/lib/python3.X/              the standard library (lib-dynload included)
    /.emberbox/agent/emberbox_guest/       the agent package

The initramfs's init sees ``/.emberbox/bin/python3`` in the root disk and runs the
agent through that loader (:func:`agent_argv`): ``--library-path`` points the loader at
our libraries only for this process (it is not an environment variable, so children do
not inherit it), and ``PYTHONHOME`` makes the standard library ours. The image's own
``/lib`` and ``/usr/lib`` are never read for the agent, and commands run the image's own
programs with the agent's clean environment (no ``PYTHONHOME``, no ``LD_*``).

Why a copy in each image's disk, not a shared read-only disk: a second disk would be a
new device in both VMM drivers, in every template snapshot and restore and in the disk
chains; a copy costs a few tens of MiB per imported image (the ext4 is sparse) and
changes nothing else. The tree is root's and 0755, like any system directory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from emberbox.errors import HostError, ImageBuildError

RUNTIME_DIR = "/.emberbox"
AGENT_SUBDIR = "agent"
LOADER_NAME = "ld-linux-x86-64.so.2"
# The host's Debian python3 (the same CPython as our own images'); never the venv's.
HOST_PYTHON = Path("/usr/bin/python3")
# Standard-library parts no agent needs (tests, GUI, build files, other installers).
STDLIB_SKIP = frozenset(
    {
        "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
        "distutils", "site-packages", "dist-packages", "venv", "turtle.py",
    }
)  # fmt: skip
_SKIP_PREFIXES = ("config-",)
# Extension modules left out: test modules, terminals, old databases.
_DYNLOAD_SKIP = re.compile(r"^(_test|xx|_ctypes_test|_curses|readline|nis|_dbm|ossaudiodev)")
# glibc dlopens libgcc_s for unwinding (pthread_exit, cancellation): ship ours, so the
# image's (or its absence) never matters.
DLOPENED = ("libgcc_s.so.1",)
_LDD_LINE = re.compile(r"^\s*(\S+)\s+=>\s+(/\S+)\s+\(0x[0-9a-f]+\)\s*$")
_LDD_LOADER = re.compile(r"^\s*(/\S*ld-linux\S*)\s+\(0x[0-9a-f]+\)\s*$")


def loader_path() -> str:
    return f"{RUNTIME_DIR}/lib/{LOADER_NAME}"


def agent_argv(agent_package: str) -> list[str]:
    """How the init starts the agent in a foreign root (after switch_root)."""
    return [
        loader_path(), "--library-path", f"{RUNTIME_DIR}/lib",
        f"{RUNTIME_DIR}/bin/python3", "-u", "-s", "-m", agent_package,
    ]  # fmt: skip


def agent_env() -> dict[str, str]:
    """The agent's own environment in a foreign root (commands get a fresh one)."""
    return {"PYTHONHOME": RUNTIME_DIR, "PYTHONPATH": f"{RUNTIME_DIR}/{AGENT_SUBDIR}"}


# Runs a command as another user in a foreign root, where there may be no ``setpriv``:
# our python (it finds its standard library from its own path, so ``-I`` keeps the
# command's environment free of PYTHONHOME), then the image's program. argv after
# the code: uid, gid, the user's name ("" : no supplementary groups), the command.
_RUN_AS = """import os, sys
uid, gid, name, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
os.initgroups(name, gid) if name else os.setgroups([])
os.setgid(gid)
os.setuid(uid)
try:
    os.execvp(argv[0], argv)
except OSError as exc:
    sys.stderr.write(f"{argv[0]}: {exc.strerror}\\n")
    sys.exit(127 if isinstance(exc, FileNotFoundError) else 126)
"""


def run_as_argv(uid: int, gid: int, name: str | None) -> list[str]:
    """The prefix that runs a command as ``uid``:``gid`` in a foreign root (what
    ``setpriv --reuid --regid --init-groups|--clear-groups --`` does in our images)."""
    return python_argv("-c", _RUN_AS, str(uid), str(gid), name or "")


def python_argv(*args: str) -> list[str]:
    """Our runtime's python with ``args`` in a foreign root (``-I``: it finds its
    standard library from its own path, and takes nothing from the environment)."""
    return [
        loader_path(), "--library-path", f"{RUNTIME_DIR}/lib", f"{RUNTIME_DIR}/bin/python3",
        "-I", "-S", *args,
    ]  # fmt: skip


def parse_ldd(output: str) -> dict[str, Path]:
    """``ldd`` output -> {name the binary asks for: host file}, the loader included
    under :data:`LOADER_NAME`; "not found" and the vDSO are left out."""
    found: dict[str, Path] = {}
    for line in output.splitlines():
        if match := _LDD_LINE.match(line):
            found[match.group(1)] = Path(match.group(2))
        elif match := _LDD_LOADER.match(line):
            found[LOADER_NAME] = Path(match.group(1))
    return found


def _ldd(binary: Path) -> dict[str, Path]:
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ImageBuildError(f"ldd {binary} failed: {proc.stderr.strip()[-500:]}")
    return parse_ldd(proc.stdout)


def host_python() -> tuple[Path, Path]:
    """The host python's binary and standard-library directory."""
    binary = HOST_PYTHON.resolve()
    if not binary.is_file():
        raise HostError(f"{HOST_PYTHON} not found: install Debian's python3 package")
    proc = subprocess.run(
        [str(binary), "-S", "-c", "import os,sys; print(os.path.dirname(os.__file__))"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    stdlib = Path(proc.stdout.strip())
    if proc.returncode != 0 or not (stdlib / "os.py").is_file():
        raise HostError(f"cannot find the standard library of {binary}: {proc.stderr[-300:]}")
    return binary, stdlib


def _stdlib_ignore(directory: str, names: list[str]) -> set[str]:
    if os.path.basename(directory) == "lib-dynload":
        return {n for n in names if _DYNLOAD_SKIP.match(n)}
    if Path(directory).name.startswith("python3"):
        return {n for n in names if n in STDLIB_SKIP or n.startswith(_SKIP_PREFIXES)}
    return set()


def install_runtime(root: Path, agent_files: dict[str, bytes], agent_package: str) -> int:
    """Write the runtime and the agent under ``root``/.emberbox; returns its bytes."""
    binary, stdlib = host_python()
    base = root / RUNTIME_DIR.strip("/")
    if base.exists() or base.is_symlink():
        shutil.rmtree(base) if base.is_dir() and not base.is_symlink() else base.unlink()
    (base / "bin").mkdir(parents=True)
    lib = base / "lib"
    lib.mkdir()
    shutil.copyfile(binary, base / "bin" / "python3")
    (base / "bin" / "python3").chmod(0o755)
    shutil.copytree(stdlib, lib / stdlib.name, ignore=_stdlib_ignore, symlinks=False)
    dynload = lib / stdlib.name / "lib-dynload"
    binaries = [binary, *sorted(dynload.glob("*.so"))] if dynload.is_dir() else [binary]
    _copy_libraries(_needed(binaries), lib)
    package = base / AGENT_SUBDIR / agent_package
    for rel, data in agent_files.items():
        path = package / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o644)
    # Byte-compiled now by the same python: the guest (slow under TCG) then only loads.
    subprocess.run([str(binary), "-I", "-m", "compileall", "-q", str(package)], check=False)
    for path in (base, *base.rglob("*")):
        os.lchown(path, 0, 0)
    return sum(p.stat().st_size for p in base.rglob("*") if p.is_file())


def _needed(binaries: Iterable[Path]) -> dict[str, Path]:
    needed: dict[str, Path] = {}
    for binary in binaries:
        needed.update(_ldd(binary))
    if LOADER_NAME not in needed:
        raise ImageBuildError(f"no dynamic loader found for {sys.platform} python3 (ldd)")
    libc = needed.get("libc.so.6")
    for name in DLOPENED:  # not in any ldd output: the C library loads them when needed
        if libc is not None and (libc.parent / name).is_file():
            needed.setdefault(name, libc.parent / name)
    return needed


def _copy_libraries(needed: dict[str, Path], lib: Path) -> None:
    for name, host_path in needed.items():
        dest = lib / name
        shutil.copyfile(host_path.resolve(), dest)  # the file, not the host's symlink
        dest.chmod(0o755)
