"""Template snapshots: per image, VMM and VM shape, one "ready" VM saved once and
restored for every sandbox after that (see docs/snapshots.md).

Layout (a cache: anything missing is rebuilt from the image)::

    templates/<key>/current -> <generation>        (swapped atomically)
    templates/<key>/<generation>/memory            guest RAM, never written once saved
    templates/<key>/<generation>/snap/state        device state (no RAM), ~0.4 MB
    templates/<key>/<generation>/snap/disk.qcow2   the disk as the template left it
    templates/<key>/<generation>/meta.json         written last: the generation is whole

A rebuild makes a new generation and never deletes an old one: sandboxes restored from
it (and their snapshots) keep its disk as their backing file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from emberbox import errors
from emberbox.agent_client.client import AgentClient, ExecLimits, WarmProgram
from emberbox.agent_client.spec import ExecSpec
from emberbox.config import Settings
from emberbox.images.registry import ImageInfo
from emberbox.service.vm.boot import boot_until_ready
from emberbox.service.vm.machine import disk_roots
from emberbox.vmm.base import Driver, SnapshotFiles, VMConfig

log = logging.getLogger(__name__)

LAYOUT = "6"  # bump when a template's files or meaning change: old ones are then ignored
# 6: the everyday commands' files are in the page cache (WARM_UP)
# 5: TCG guests boot with norandmaps (emberbox.vmm.qemu.argv TCG_KERNEL_ARGS)
# 4: every VM has a virtio-net NIC (emberbox.vmm network_args), so restores keep the device set
META = "meta.json"
CURRENT = "current"
# What every template runs before its snapshot: the agent's exec path, and python3 (where
# the image has one) in the page cache; and E2B's command path (docs/e2b.md: every E2B
# command is `bash -l -c` as `user` through setpriv), so a clone's first one reads nothing.
WARM_UP = "true; if command -v python3 >/dev/null; then python3 -c pass; fi"
# The files of the everyday commands too (`true` above is the shell's builtin, so nothing
# had read /usr/bin/true), and the libraries `ls` loads: a clone's first `true` made two
# disk reads (36 KiB), ~2,300 freshly translated blocks and 16 ms of its first exec.
WARM_UP += (
    "; cat $(dpkg -L coreutils grep sed findutils 2>/dev/null | grep -E '/s?bin/[^/]+$')"
    " </dev/null >/dev/null 2>&1; ls / >/dev/null"
)
WARM_UP += (
    "; if command -v setpriv >/dev/null && id -u user >/dev/null 2>&1; then HOME=/home/user"
    " setpriv --reuid=1000 --regid=1000 --init-groups -- bash -l -c true; fi"
)
# The run image's template also reads each language's toolchain into the page cache,
# and starts the agent's warm runtimes (docs/oneshot.md, "Warm runtimes").
WARM_UP_RUN = (
    "if command -v node >/dev/null; then node -e 0; fi; bash -c true; "
    "cd /tmp && printf 'int main(void){return 0;}\\n' > .warm.c && "
    "if command -v gcc >/dev/null; then gcc -O2 -std=gnu17 -o .warm .warm.c -lm; fi; "
    "printf '#include <iostream>\\nint main(){std::cout<<1;}\\n' > .warm.cpp && "
    "if command -v g++ >/dev/null; then g++ -O2 -std=gnu++17 -o .warm .warm.cpp; fi; "
    "rm -f .warm .warm.c .warm.cpp"
)
WARM_RUNTIMES = ("python3",)
REHEARSAL_DIR = ".emberbox-warm"
NOBODY = 65534


def warm_up_plan(info: ImageInfo, run_image: str) -> tuple[str, list[str]]:
    """The shell line a template of ``info`` runs before its snapshot, and the warm
    runtimes it starts. An image whose manifest says its userland is "foreign" (no
    Debian python3 of ours) gets only ``true``."""
    foreign = info.manifest.get("userland") == "foreign"
    if foreign:
        return "true", []
    if info.name != run_image:
        return WARM_UP, []
    return f"{WARM_UP}; {WARM_UP_RUN}", list(WARM_RUNTIMES)


def template_key(info: ImageInfo, driver: Driver, vcpus: int, memory_mib: int) -> str:
    """Everything a template's RAM and device state depend on, hashed."""
    parts = [LAYOUT, info.image_hash, driver.snapshot_key(), f"{vcpus}cpu", f"{memory_mib}MiB"]
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:24]


class Templates:
    """Finds or builds template snapshots; one build per key at a time."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._locks: dict[str, anyio.Lock] = {}
        self._known: dict[str, SnapshotFiles] = {}  # found on disk once: no re-reading

    @property
    def root(self) -> Path:
        return self._settings.templates_dir

    def current(self, key: str) -> SnapshotFiles | None:
        """The key's current template, if one is whole on disk."""
        generation = self.root / key / CURRENT
        try:
            meta = json.loads((generation / META).read_text())
            return SnapshotFiles(
                directory=generation.resolve() / "snap",
                vmm=str(meta["vmm"]),
                vmm_version=str(meta["vmm_version"]),
                memory_file=generation.resolve() / "memory" if meta.get("shared_memory") else None,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    async def ensure(
        self, info: ImageInfo, driver: Driver, vcpus: int, memory_mib: int
    ) -> SnapshotFiles:
        """The template for this image and shape, building it first if needed (one VM
        boot, ~5 s under TCG)."""
        key = template_key(info, driver, vcpus, memory_mib)
        known = self._known.get(key)
        if known is not None:
            return known
        async with self._locks.setdefault(key, anyio.Lock()):
            found = await anyio.to_thread.run_sync(self.current, key)
            if found is None:
                await anyio.to_thread.run_sync(self._check_room, key)
                found = await self._build(key, info, driver, vcpus, memory_mib)
            self._known[key] = found
            return found

    def _check_room(self, key: str) -> None:
        """QuotaExceeded when ``templates_max`` templates of this layout exist already:
        each shape a caller asks for would otherwise leave ~100+ MiB on disk for good."""
        limit = self._settings.templates_max
        held = [k for k in _layout_keys(self.root) if k != key]
        if len(held) >= limit:
            held = [k for k in held if not _remove_if_orphaned(self.root / k)]
        if len(held) >= limit:
            raise errors.QuotaExceeded(
                f"{len(held)} templates exist (templates_max={limit}); this shape is not given one",
                quota="templates_max",
                limit=limit,
            )

    def discard(self, snapshot: SnapshotFiles) -> None:
        """Stop using a template that failed to load; the next ensure() rebuilds. Its
        files stay (something may still be backed by its disk)."""
        generation = snapshot.directory.parent
        self._known = {k: v for k, v in self._known.items() if v != snapshot}
        link = generation.parent / CURRENT
        with contextlib.suppress(OSError):
            if link.resolve() == generation.resolve():
                link.unlink()
                log.warning("template %s discarded; it will be rebuilt", generation)

    async def _build(
        self, key: str, info: ImageInfo, driver: Driver, vcpus: int, memory_mib: int
    ) -> SnapshotFiles:
        settings = self._settings
        generation = self.root / key / secrets.token_hex(4)
        await anyio.to_thread.run_sync(lambda: generation.mkdir(0o700, parents=True))
        vm_id = "tpl" + secrets.token_hex(5)
        config = VMConfig(
            vm_id=vm_id,
            work_dir=settings.vms_dir / vm_id,
            guest=info.files,
            vcpus=vcpus,
            memory_mib=memory_mib,
            console_log_max_bytes=settings.console_log_max_bytes,
            memory_file=generation / "memory",
            disk_roots=disk_roots(settings),
        )
        log.info(
            "building template %s for image %s (%d vCPU, %d MiB)", key, info.name, vcpus, memory_mib
        )
        try:
            ready = await boot_until_ready(
                lambda: driver.start(config),
                timeout_s=settings.boot_timeout_s,
                attempts=settings.boot_attempts,
                hostname="emberbox-template",
                sandbox_id=vm_id,
            )
            try:
                # Warm what every sandbox's first command needs (the agent's exec path,
                # python3 in the page cache), so that clones start with it in their RAM.
                warm_up, runtimes = warm_up_plan(info, settings.run_image)
                await ready.agent.exec(ExecSpec(warm_up, timeout_s=180))
                if runtimes:
                    started = await ready.agent.warm(runtimes)
                    log.info("template %s: warm runtimes %s", key, started or "none")
                    await rehearse(ready.agent, started)
                # Saved with the agent connection open: to the guest nothing happens, and
                # each clone's host simply connects and says hello.
                snap = await ready.vm.snapshot(generation / "snap", stop=True)
            finally:
                await ready.agent.aclose()
                await ready.vm.kill()
            meta: dict[str, Any] = {
                "layout": LAYOUT,
                "key": key,
                "image": info.name,
                "image_hash": info.image_hash,
                # Whose image this is: once that images dir no longer holds the image,
                # nothing can restore from (or be backed by) this template any more.
                "images_dir": str(settings.images_dir),
                "vmm": snap.vmm,
                "vmm_version": snap.vmm_version,
                "shared_memory": snap.memory_file is not None,
                "vcpus": vcpus,
                "memory_mib": memory_mib,
            }
            await anyio.to_thread.run_sync(_commit, generation, meta)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(shutil.rmtree, generation, True)
            raise
        found = await anyio.to_thread.run_sync(self.current, key)
        assert found is not None
        return found


async def rehearse(agent: object, runtimes: Sequence[str] = WARM_RUNTIMES) -> None:
    """One run of each warm runtime the way a one-shot run makes it (a tar, a cgroup,
    nobody), its files removed afterwards: in the template, so that what a first run
    sets up once (the cgroup controllers) is done; in a pooled sandbox of the run image,
    so that its QEMU has translated the run path and mapped the zygote's memory before
    a caller's run needs them. Our own ``pass``, never a caller's program."""
    if not isinstance(agent, AgentClient):
        return
    tar = _rehearsal_tar()
    for runtime in runtimes:
        spec = ExecSpec(
            ["true"],
            cwd=f"/tmp/{REHEARSAL_DIR}",
            timeout_s=60,
            limits=ExecLimits(memory_mib=64, pids=16),
        )
        program = WarmProgram(runtime, "main.py", [], NOBODY, NOBODY)
        result, warm = await agent.run(spec, tar=tar, tar_dir="/tmp", warm=program)
        if result.exit_code != 0 or not warm:
            log.warning("warm runtime %s: rehearsal failed: %s", runtime, result)
    await agent.exec(ExecSpec(["rm", "-rf", f"/tmp/{REHEARSAL_DIR}"], timeout_s=60))


def _rehearsal_tar() -> bytes:
    """``REHEARSAL_DIR/main.py`` (``pass``), the directory writable by all."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        directory = tarfile.TarInfo(REHEARSAL_DIR)
        directory.type, directory.mode = tarfile.DIRTYPE, 0o777
        tar.addfile(directory)
        source = tarfile.TarInfo(f"{REHEARSAL_DIR}/main.py")
        source.size, source.mode = 5, 0o644
        tar.addfile(source, io.BytesIO(b"pass\n"))
    return buffer.getvalue()


def _layout_keys(root: Path) -> list[str]:
    """Keys whose current template was built with this LAYOUT."""
    keys = []
    for meta in root.glob(f"*/{CURRENT}/{META}"):
        with contextlib.suppress(OSError, ValueError):
            if json.loads(meta.read_text()).get("layout") == LAYOUT:
                keys.append(meta.parent.parent.name)
    return keys


def _remove_if_orphaned(key_dir: Path) -> bool:
    """Delete a template whose image is gone from the images dir it was made from (a
    deleted image, or a temporary images dir that no longer exists): no sandbox or
    snapshot can use it, since an image is only deleted when none does. Templates
    that do not say where their image lives are kept."""
    try:
        meta = json.loads((key_dir / CURRENT / META).read_text())
        images_dir = meta.get("images_dir")
        image_hash = str(meta["image_hash"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not isinstance(images_dir, str) or (Path(images_dir) / "blobs" / image_hash).exists():
        return False
    log.info("removing template %s: image %s is gone from %s", key_dir, image_hash, images_dir)
    shutil.rmtree(key_dir, ignore_errors=True)
    return not key_dir.exists()


def _commit(generation: Path, meta: dict[str, Any]) -> None:
    # The memory file stays writable by its owner: QEMU 7.2 opens a private file
    # mapping read-write (its `readonly` makes the guest's RAM read-only too).
    (generation / META).write_text(json.dumps(meta, indent=2))
    tmp = generation.parent / f".{CURRENT}.{secrets.token_hex(4)}"
    os.symlink(generation.name, tmp)
    os.replace(tmp, generation.parent / CURRENT)
