"""OCI images: made in the test with umoci, imported from an archive and pulled from a
real local registry (Debian's docker-registry), then run in a real VM.

The image is busybox only (no python, no libc: the static busybox) in two layers; the
upper one whites out a file and makes a directory opaque. Its config has Env,
WorkingDir and User.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from emberbox.agent_client.spec import ExecSpec
from emberbox.config import Settings
from emberbox.errors import ImageBuildError, InvalidRequest, StorageFull
from emberbox.images.oci import import_oci
from emberbox.images.registry import ImageInfo, ImageRegistry
from emberbox.service.sandboxes.manager import SandboxManager
from tests.support.paths import qemu_pids_under, short_tmp_dir

pytestmark = [pytest.mark.vm, pytest.mark.anyio]

BUSYBOX = Path("/bin/busybox")
MUSL_LOADER = Path("/lib/ld-musl-x86_64.so.1")  # musl's libc.so (Debian's musl package)
HELLO_C = '#include <stdio.h>\nint main(void) { puts("hello from musl"); return 0; }\n'
APPLETS = ("sh", "echo", "cat", "ls", "stat", "id", "pwd", "env", "test", "readlink")
ENV = ["PATH=/bin", "GREETING=from-the-image"]
WORKDIR = "/srv/app"
USER = "1234:1234"
TOOLS = ("skopeo", "umoci", "docker-registry", "mkfs.ext4", "debugfs", "musl-gcc")


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, **fields: object) -> None:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    if data is not None:
        info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _lower_layer(path: Path, hello_musl: Path) -> None:
    """busybox and its applets, musl's loader and a program linked against it (the only
    C library in the image), files to hide later, a hard link, an owned 0640 file with
    an xattr, a symlink."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "lib", "etc", "srv", "srv/app", "opaque"):
            _add(tar, d, type=tarfile.DIRTYPE, mode=0o755)
        _add(tar, "bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
        _add(tar, f"lib/{MUSL_LOADER.name}", MUSL_LOADER.resolve().read_bytes(), mode=0o755)
        _add(tar, "bin/hello-musl", hello_musl.read_bytes(), mode=0o755)
        for applet in APPLETS:
            _add(tar, f"bin/{applet}", type=tarfile.SYMTYPE, linkname="busybox")
        _add(tar, "etc/gone", b"whited out\n")
        _add(tar, "etc/kept", b"kept\n", mode=0o640, uid=1234, gid=1234,
             pax_headers={"SCHILY.xattr.user.emberbox": "yes"})  # fmt: skip
        _add(tar, "etc/hard", type=tarfile.LNKTYPE, linkname="etc/kept")
        _add(tar, "etc/link", type=tarfile.SYMTYPE, linkname="kept")
        _add(tar, "opaque/old", b"old\n")
        _add(tar, "srv/app/owned", b"x\n", uid=1234, gid=1234)


def _upper_layer(path: Path) -> None:
    """A whiteout of /etc/gone and an opaque /opaque with one new file."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "etc", type=tarfile.DIRTYPE, mode=0o755)
        _add(tar, "etc/.wh.gone", b"")
        _add(tar, "opaque", type=tarfile.DIRTYPE, mode=0o755)
        _add(tar, "opaque/.wh..wh..opq", b"")
        _add(tar, "opaque/new", b"new\n")


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing {missing}: run make setup")
    path = short_tmp_dir("eb-oci-")
    yield path
    leftovers = qemu_pids_under(path)
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)
    assert not leftovers, f"the OCI tests left QEMU processes running: {leftovers}"


@pytest.fixture(scope="module")
def oci_archive(work: Path) -> Path:
    """The two-layer image as an OCI layout (umoci) and as an oci-archive (skopeo)."""
    layout = work / "layout"
    (work / "hello.c").write_text(HELLO_C)
    _run("musl-gcc", "-O2", "-o", str(work / "hello-musl"), str(work / "hello.c"))
    _lower_layer(work / "lower.tar", work / "hello-musl")
    _upper_layer(work / "upper.tar")
    _run("umoci", "init", "--layout", str(layout))
    _run("umoci", "new", "--image", f"{layout}:busy")
    _run("umoci", "raw", "add-layer", "--image", f"{layout}:busy", str(work / "lower.tar"))
    _run("umoci", "raw", "add-layer", "--image", f"{layout}:busy", str(work / "upper.tar"))
    env = [arg for e in ENV for arg in ("--config.env", e)]
    _run("umoci", "config", "--image", f"{layout}:busy", *env,
         "--config.workingdir", WORKDIR, "--config.user", USER)  # fmt: skip
    archive = work / "busy.tar"
    _run("skopeo", "--insecure-policy", "copy", "--quiet", f"oci:{layout}:busy",
         f"oci-archive:{archive}:busy")  # fmt: skip
    return archive


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def registry(work: Path) -> Iterator[str]:
    """Debian's docker-registry on 127.0.0.1 with its own storage; stopped at the end."""
    port = _free_port()
    config = work / "registry.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {work / 'registry'}\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    log = (work / "registry.log").open("wb")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, (work / "registry.log").read_text()
            assert time.monotonic() < deadline, "docker-registry did not listen"
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def oci_settings(work: Path, image_settings: Settings, default_image: ImageInfo) -> Settings:
    """A private image registry (and template cache) holding the shared default image."""
    images = work / "images"
    images.mkdir()
    (images / "default").symlink_to(default_image.directory)
    return image_settings.model_copy(
        update={
            "cache_dir": work / "cache",
            "images_dir_override": images,
            "data_dir": work / "data",
            "vmm": "qemu",
            "pool_size": 0,
        }
    )


@pytest.fixture(scope="module")
async def archive_image(oci_settings: Settings, oci_archive: Path) -> ImageInfo:
    steps: list[str] = []
    info = await import_oci(
        oci_settings, f"oci-archive:{oci_archive}:busy", "busy", tenant=None,
        on_progress=steps.append,
    )  # fmt: skip
    assert any("umoci" in s for s in steps) and any("ext4" in s for s in steps)
    return info


def _debugfs(rootfs: Path, request: str) -> str:
    return _run("debugfs", "-R", request, str(rootfs))


async def test_archive_import_applies_layers_and_records_the_config(
    archive_image: ImageInfo,
) -> None:
    """Imported from an oci-archive: the manifest says oci/foreign with the image's Env,
    WorkingDir and User; in the ext4 the whiteout and opaque dir are applied, owners,
    modes, the hard link, the symlink and the xattr kept, and the agent's runtime is in."""
    manifest = archive_image.manifest
    assert manifest["created_by"] == "oci" and manifest["base"].startswith("oci-archive:")
    config = archive_image.config
    assert config.env == {"PATH": "/bin", "GREETING": "from-the-image"}
    assert (config.workdir, config.user, config.userland) == (WORKDIR, USER, "foreign")
    assert len(archive_image.layers) == 2
    rootfs = archive_image.files.rootfs
    etc = _debugfs(rootfs, "ls /etc").split()
    assert "kept" in etc and "hard" in etc and "gone" not in etc and ".wh.gone" not in etc
    opaque = _debugfs(rootfs, "ls /opaque").split()
    assert "new" in opaque and "old" not in opaque
    kept, hard = _debugfs(rootfs, "stat /etc/kept"), _debugfs(rootfs, "stat /etc/hard")
    assert "Links: 2" in kept and kept.splitlines()[0] == hard.splitlines()[0]  # one inode
    assert "User:  1234" in kept and "Mode:  0640" in kept
    assert "yes" in _debugfs(rootfs, "ea_get /etc/kept user.emberbox")
    assert 'Fast link dest: "kept"' in _debugfs(rootfs, "stat /etc/link")
    assert "python3" in _debugfs(rootfs, "ls /.emberbox/bin").split()
    assert "python3" not in _debugfs(rootfs, "ls /bin").split()


async def test_registry_pull_gives_the_same_image(
    oci_settings: Settings, oci_archive: Path, registry: str, archive_image: ImageInfo
) -> None:
    """Pushed to a local registry with skopeo and pulled by reference over http: the
    same manifest, layers and config as the archive's import, so the same blob, reused
    without unpacking again."""
    _run("skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
         f"oci-archive:{oci_archive}:busy", f"docker://{registry}/emberbox/busy:v1")  # fmt: skip
    steps: list[str] = []
    pulled = await import_oci(
        oci_settings, f"{registry}/emberbox/busy:v1", "pulled", tenant=None,
        on_progress=steps.append,
    )  # fmt: skip
    assert steps[0] == f"fetching docker://{registry}/emberbox/busy:v1"
    assert [x["digest"] for x in pulled.layers] == [x["digest"] for x in archive_image.layers]
    assert pulled.config == archive_image.config
    # The same manifest over the same base: the same content hash, known before
    # unpacking, so the pull reuses the archive's disk (one blob for both names).
    assert any(s.startswith("already imported as blob") for s in steps)
    assert not any("umoci" in s or "ext4" in s for s in steps)
    assert pulled.image_hash == archive_image.image_hash
    assert pulled.directory == archive_image.directory
    assert ImageRegistry(oci_settings).get("pulled").directory == archive_image.directory


async def test_layout_directory_and_docker_archive_imports(
    oci_settings: Settings, work: Path, archive_image: ImageInfo
) -> None:
    """The OCI layout directory itself imports to the same blob; a docker-archive (Docker's
    manifest format) keeps the same layers and defaults."""
    layout = await import_oci(oci_settings, f"oci:{work / 'layout'}:busy", "dir", tenant=None)
    assert layout.directory == archive_image.directory
    saved = work / "saved.tar"
    _run("skopeo", "--insecure-policy", "copy", "--quiet", f"oci:{work / 'layout'}:busy",
         f"docker-archive:{saved}:emberbox/busy:v1")  # fmt: skip
    docker = await import_oci(
        oci_settings, f"docker-archive:{saved}:emberbox/busy:v1", "docker", tenant=None
    )
    assert docker.config == archive_image.config
    assert len(docker.layers) == 2 and docker.manifest["created_by"] == "oci"
    assert "gone" not in _debugfs(docker.files.rootfs, "ls /etc").split()


async def test_bad_references_register_nothing_and_leave_nothing(
    oci_settings: Settings, work: Path, archive_image: ImageInfo
) -> None:
    """Unknown transport, missing file, unreachable registry, unknown tag: InvalidRequest
    naming the problem; no image named, no work directory left."""
    closed = _free_port()
    cases = {
        "dir:/tmp/x": "unknown transport",
        f"oci-archive:{work}/missing.tar": "no such file",
        f"127.0.0.1:{closed}/nothing/here:v1": "cannot fetch",
        f"oci-archive:{work}/busy.tar:nosuchtag": "cannot fetch",
    }
    for ref, message in cases.items():
        with pytest.raises(InvalidRequest, match=message):
            await import_oci(oci_settings, ref, "bad", tenant=None)
    registry = ImageRegistry(oci_settings)
    assert "bad" not in registry.names()
    assert not [p for p in oci_settings.images_dir.iterdir() if p.name.startswith(".oci-")]


@pytest.fixture(scope="module")
async def manager(
    oci_settings: Settings, archive_image: ImageInfo
) -> AsyncIterator[SandboxManager]:
    """A manager whose sandboxes are killed at the end (closing it only detaches)."""
    async with SandboxManager(oci_settings) as opened:
        try:
            yield opened
        finally:
            for record in await opened.list():
                await opened.kill(record.id)


async def test_busybox_image_runs_commands_with_its_defaults(
    manager: SandboxManager,
) -> None:
    """A sandbox of the busybox-only image (no python, musl as its only C library):
    `echo hi` and `sh -c 'exit 3'` give the right output and code, a musl program runs;
    commands run as the image's User in its WorkingDir with its Env; the layers' result
    is what the guest sees; no PYTHONHOME leaks."""
    record = await manager.create(image="busy", timeout_s=600)
    hi = await manager.exec(record.id, ExecSpec(["echo", "hi"]))
    assert (hi.exit_code, hi.stdout, hi.stderr) == (0, b"hi\n", b"")
    three = await manager.exec(record.id, ExecSpec(["sh", "-c", "exit 3"]))
    assert three.exit_code == 3
    probe = await manager.exec(
        record.id, ExecSpec("id -u; id -g; pwd; echo $GREETING; env | grep -c PYTHON; true")
    )
    assert probe.stdout.decode().split() == ["1234", "1234", WORKDIR, "from-the-image", "0"]
    seen = await manager.exec(
        record.id,
        ExecSpec(["sh", "-c", "ls /opaque; test -e /etc/gone || echo gone; "
                 "stat -c '%h %u %a' /etc/hard; readlink /etc/link; cat /etc/link; "
                 "test -e /usr/bin/python3 || echo no-python"]),
    )  # fmt: skip
    assert seen.stdout.decode().split("\n") == [
        "new", "gone", "2 1234 640", "kept", "kept", "no-python", ""
    ]  # fmt: skip
    root = await manager.exec(record.id, ExecSpec(["id", "-u"], env={}, cwd="/"))
    assert root.stdout == b"1234\n"  # the image's User is the default for argv too
    musl = await manager.exec(record.id, ExecSpec(["hello-musl"]))
    assert (musl.exit_code, musl.stdout) == (0, b"hello from musl\n")
    glibc = await manager.exec(record.id, ExecSpec("ls /lib; test -e /lib64 || echo none"))
    assert glibc.stdout.decode().split() == [MUSL_LOADER.name, "none"]  # musl's is the only libc


def _import_processes(settings: Settings) -> list[int]:
    """Processes whose command line names an import's work directory."""
    marker = f"{settings.images_dir}/.oci-import-".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


async def test_a_timed_out_or_cancelled_import_leaves_nothing(
    oci_settings: Settings, oci_archive: Path, archive_image: ImageInfo
) -> None:
    """An import past its time limit fails naming the step, one on a (nearly) full disk
    stops with StorageFull, a cancelled one stops: no skopeo/umoci/mkfs process, no work
    directory and no new name remain."""
    hurried = oci_settings.model_copy(update={"oci_import_timeout_s": 0.001})
    with pytest.raises(ImageBuildError, match="took over"):
        await import_oci(hurried, f"oci-archive:{oci_archive}:busy", "late", tenant=None)
    full = oci_settings.model_copy(update={"min_free_disk_mib": 1 << 40})  # "the disk is full"
    with pytest.raises(StorageFull, match="import stopped"):
        await import_oci(full, f"oci-archive:{oci_archive}:busy", "late", tenant=None)
    task = asyncio.ensure_future(
        import_oci(oci_settings, f"oci-archive:{oci_archive}:busy", "cancelled", tenant=None)
    )
    while not _import_processes(oci_settings) and not task.done():  # noqa: ASYNC110 (polls /proc)
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _import_processes(oci_settings) == []
    assert not [p for p in oci_settings.images_dir.iterdir() if p.name.startswith(".oci-")]
    assert {"late", "cancelled"}.isdisjoint(ImageRegistry(oci_settings).names())
