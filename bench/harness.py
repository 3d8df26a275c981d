"""What every benchmark section needs: API checks, progress lines, the managers of the
three create paths, servers on free ports, and a sweep that leaves no VM behind."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import uvicorn

from emberbox.agent_client.spec import ExecSpec
from emberbox.config import Settings
from emberbox.service.sandboxes import orphans
from emberbox.service.sandboxes.manager import SandboxManager

POOL_REFILL_TIMEOUT_S = 120.0
POOL_FIRST_FILL_TIMEOUT_S = 90.0  # may include building the template: ~15 s under TCG
SERVER_START_TIMEOUT_S = 60.0
TRUE = ExecSpec(["true"])  # the command every measurement runs
_T0 = time.monotonic()


class MissingAPI(Exception):
    """The service lacks something a measurement needs (an API not landed yet)."""


class Skip(Exception):
    """A measurement cannot run on this host (e.g. no runsc); the reason is the message."""


def progress(message: str) -> None:
    print(f"[bench {time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def require_settings(*names: str) -> None:
    """Settings ignores unknown arguments, so a knob that does not exist yet would be
    silently dropped: refuse instead."""
    missing = [n for n in names if n not in Settings.model_fields]
    if missing:
        raise MissingAPI("Settings has no " + ", ".join(missing))


def require_methods(manager: object, *names: str) -> None:
    missing = [n for n in names if not callable(getattr(manager, n, None))]
    if missing:
        raise MissingAPI(", ".join(f"{type(manager).__name__}.{n}()" for n in missing))


def vmm_argv(pid: int | None) -> list[str]:
    """The VMM's command line ([] when it is gone)."""
    if pid is None:
        return []
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def vmm_was_restored(argv: list[str]) -> bool | None:
    """True if a QEMU started from a saved state (``-incoming``); None for other VMMs."""
    if not argv or "qemu" not in Path(argv[0]).name:
        return None
    return "-incoming" in argv


def vmm_accel(argv: list[str]) -> str | None:
    """QEMU's accelerator (``kvm``/``tcg``) from its ``-machine ...,accel=X`` argument."""
    for arg in argv:
        if match := re.search(r"\baccel=(\w+)", arg):
            return match[1]
    return None


def foreign_vmms(root: Path) -> list[str]:
    """VMM processes running that are not the bench's (not under ``root``): another test
    run or server on this host, whose load skews every number. ``pid:name`` each."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = vmm_argv(int(entry.name))
        name = Path(argv[0]).name if argv else ""
        if name.startswith(("qemu-system", "firecracker")) and str(root) not in " ".join(argv):
            label = argv[argv.index("-name") + 1].split(",")[0] if "-name" in argv else name
            found.append(f"{entry.name}:{label}")
    return found


# -- the three ways a create can go --------------------------------------------------------


@dataclass
class Variant:
    """One create path (cold boot, snapshot restore, warm pool) and its own manager."""

    name: str
    settings: Settings
    manager: SandboxManager | None = None
    unavailable: str | None = None  # why it cannot be measured
    accel: str | None = None  # seen on the warm-up VM's command line
    broken: bool = False  # the warm-up failed (not merely an API missing)

    def get(self) -> SandboxManager:
        """The manager; raises Skip with the reason when this path is unavailable."""
        if self.manager is None:
            raise Skip(self.unavailable or f"{self.name}: no manager")
        return self.manager


VARIANT_KNOBS: dict[str, dict[str, Any]] = {
    "cold boot": {"templates": False, "pool_size": 0},
    "snapshot restore": {"templates": True, "pool_size": 0},
    "warm pool": {"templates": True, "pool_size": 1},
}


async def open_variant(stack: contextlib.AsyncExitStack, name: str, root: Path) -> Variant:
    """Start the manager of one create path (data in its own short dir under ``root``;
    images and templates from the shared cache) and warm it up with one create + exec.

    A path the service cannot take yet comes back with ``unavailable`` saying why."""
    knobs = VARIANT_KNOBS[name]
    data_dir = root / name.split()[-1]
    try:
        require_settings(*knobs)
    except MissingAPI as exc:
        return Variant(name, Settings(data_dir=data_dir), unavailable=f"missing {exc}")
    variant = Variant(name, Settings(data_dir=data_dir, **knobs))
    manager = SandboxManager(variant.settings)
    try:
        if variant.settings.pool_size > 0:
            require_methods(manager, "pool_ready")
        variant.manager = await stack.enter_async_context(manager)
        progress(f"{name}: warming up (a template may be built now)")
        await _warm_up(variant, manager)
    except MissingAPI as exc:
        variant.manager, variant.unavailable = None, f"missing {exc}"
    except Exception as exc:
        traceback.print_exc()
        variant.manager, variant.unavailable = None, f"warm-up failed: {_describe(exc)}"
        variant.broken = True
    return variant


async def _warm_up(variant: Variant, manager: SandboxManager) -> None:
    """One create + exec + kill; checks that a template/pool variant really restores."""
    await wait_pool_full(variant, POOL_FIRST_FILL_TIMEOUT_S)
    record = await manager.create()
    try:
        await manager.exec(record.id, TRUE)
        argv = vmm_argv(record.vmm_pid)
    finally:
        await manager.kill(record.id)
    variant.accel = vmm_accel(argv)
    if variant.settings.templates and vmm_was_restored(argv) is False:
        raise RuntimeError(
            "with Settings.templates=True, SandboxManager.create() cold-booted (its QEMU "
            "has no -incoming): no template could be built, see the emberbox log above"
        )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


async def wait_spares(variants: list[Variant], timeout_s: float = 30.0) -> None:
    """Until each template variant without a pool holds its spare VMM (started ahead
    after a restore: emberbox.service.vm.spares), so that no spare starts while a sample
    is timed; no-op for managers without spares."""
    deadline = time.monotonic() + timeout_s
    for variant in variants:
        spares = getattr(getattr(variant.manager, "_boots", None), "_spares", None)
        if spares is None or not variant.settings.templates or variant.settings.pool_size:
            continue
        while spares.ready_count() < 1 and time.monotonic() < deadline:  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def wait_pool_full(variant: Variant | None, timeout_s: float = POOL_REFILL_TIMEOUT_S) -> None:
    """Until the variant's pool holds ``pool_size`` ready VMs (no-op without a pool), so
    that no refill runs while another sample is timed."""
    if variant is None or variant.manager is None or variant.settings.pool_size == 0:
        return
    manager, want = variant.manager, variant.settings.pool_size
    deadline = time.monotonic() + timeout_s
    while (ready := await pool_ready(manager)) < want:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the pool holds {ready}/{want} ready VMs after {timeout_s:g} s "
                "(its fill errors are in the emberbox log above)"
            )
        await anyio.sleep(0.02)


async def pool_ready(manager: SandboxManager) -> int:
    method = getattr(manager, "pool_ready", None)
    if method is None:
        raise MissingAPI("SandboxManager.pool_ready()")
    value = method()
    if inspect.isawaitable(value):
        value = await value
    return int(value)


async def sweep(root: Path) -> None:
    """End whatever VMM still runs from a data dir under ``root`` (pool VMs a manager
    left running at close, the sandbox of a failed sample): all were started here."""
    killed = await anyio.to_thread.run_sync(_sweep_blocking, root)
    if killed:
        progress(f"swept {killed} VMM(s) left under {root}")


def _sweep_blocking(root: Path) -> int:
    return sum(len(orphans.sweep(d, ()).killed_pids) for d in sorted(root.glob("*/vms")))


# -- servers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server_process(data_dir: Path, **env: str) -> Iterator[str]:
    """``emberbox serve`` on a free port (extra ``EMBERBOX_*`` settings in ``env``);
    stopped afterwards. Its output goes to ``server.log`` next to ``data_dir``."""
    port = free_port()
    env = {**os.environ, **env, "EMBERBOX_DATA_DIR": str(data_dir), "EMBERBOX_PORT": str(port)}
    emberbox = Path(sys.executable).parent / "emberbox"
    log_path = data_dir.with_name(f"{data_dir.name}-server.log")
    with log_path.open("wb") as log_file:
        server = subprocess.Popen(
            [str(emberbox), "serve"], env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"`emberbox serve` did not come up on {url}: {tail}")
            time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _healthy(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    return False


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: Ctrl-C interrupts the bench as usual."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def server_in_process(settings: Settings, manager: SandboxManager) -> AsyncIterator[str]:
    """The HTTP API over ``manager`` (which the caller owns) on a free port, served from
    this event loop, so that the bench can still ask the manager about its pool."""
    from emberbox.api.app import create_app

    port = free_port()
    config = uvicorn.Config(
        create_app(settings, manager), host="127.0.0.1", port=port, log_level="warning"
    )
    server = _Server(config)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(SERVER_START_TIMEOUT_S):
            while not server.started:  # noqa: ASYNC110 (uvicorn offers only this flag)
                await anyio.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
