"""Spare VMMs: for each template shape in use, one VMM started ahead of the next create,
waiting for the template's saved state (QEMU ``-incoming defer``).

A template restore is QEMU's start (fork/exec, its cgroup, device set-up until its
monitor answers: ~35 ms under TCG), then loading the device state, resuming the guest,
the hello and the guest's first translated code. A spare does the first two before
anyone asks: its disk overlay is made, the process runs in its cgroup, QMP is connected,
and the template's device state is loaded (its RAM is the template's file, mapped
copy-on-write), the guest left paused as the template was saved. Nothing of the guest
has run, and no sandbox's data reaches it. What the create still does, and the bench
still times, is the rest of the restore (resume, hello, first exec).

That is what sets it apart from the warm pool (:mod:`~emberbox.service.vm.pool`),
which holds whole running sandboxes of the default shape that have already been
greeted and have run ``true`` (their translation warm). A spare is one idle QEMU per
shape that creates have restored since start (any image, vCPUs, memory): about 13 MiB
of the host's private memory (the template's RAM is mapped, untouched until the guest
runs), and it serves only
restores without a network (a TAP is given to QEMU when it starts).

Only shapes that creates asked for get spares (not the warm pool's own fills: its
sandboxes are restored ahead anyway). A spare's directory is named for the sandbox it
will become (its id appears in QEMU's command line, where the orphan sweep and a
restarted server's attach look for it), so the create claims it at admission
(:meth:`SpareVMMs.claim`) and the row gets its id.
Spares have no row: :meth:`SpareVMMs.close` kills them at a clean shutdown, and the
orphan sweep of the next start after a crash.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from emberbox import errors
from emberbox.vmm.base import VM, Driver, Prelaunching, SnapshotFiles, VMConfig

log = logging.getLogger(__name__)

# How long a refill waits after a restore: the new sandbox's first calls (translated
# afresh under TCG) should not share the two cores with a QEMU starting.
REFILL_DELAY_S = 0.3
MAX_SPARES = 4  # shapes with a spare at once: each is an idle QEMU process


@dataclass(frozen=True)
class SpareShape:
    image: str
    vcpus: int
    memory_mib: int


@dataclass(frozen=True)
class Spare:
    sandbox_id: str
    shape: SpareShape
    template: SnapshotFiles
    vm: VM


class SpareVMMs:
    """At most one spare VMM per shape, made after a restore of that shape."""

    def __init__(
        self,
        *,
        id_bytes: int = 6,
        refill_delay_s: float = REFILL_DELAY_S,
        max_spares: int = MAX_SPARES,
    ) -> None:
        self.id_bytes = id_bytes  # the length of the manager's sandbox ids
        self._refill_delay_s = refill_delay_s
        self._max = max_spares
        self._ready: dict[SpareShape, Spare] = {}
        self._claimed: dict[str, Spare] = {}  # by the sandbox id a create gave it
        self._filling: dict[SpareShape, asyncio.Task[None]] = {}
        self._doomed: set[asyncio.Task[None]] = set()  # kills of spares not used
        self._wanted: set[SpareShape] = set()  # shapes that creates (not the pool) asked for
        self._closed = False

    def ready_count(self) -> int:
        return len(self._ready)

    def claim(self, shape: SpareShape, *, want: bool = True) -> str | None:
        """The id of a ready spare of ``shape``, reserved from now on for the sandbox
        of that id (a create's admission); None when there is none. ``want``: creates
        ask for this shape, so restores of it make the next spare (the warm pool's own
        fills take a spare that is there but do not ask for more)."""
        if want:
            self._wanted.add(shape)
        spare = self._ready.pop(shape, None)
        if spare is None:
            return None
        if not spare.vm.is_running():
            self._discard(spare, "its VMM has exited")
            return None
        self._claimed[spare.sandbox_id] = spare
        return spare.sandbox_id

    def release(self, sandbox_id: str) -> None:
        """A claim whose sandbox will not be started (admission failed): kill it."""
        spare = self._claimed.pop(sandbox_id, None)
        if spare is not None:
            self._discard(spare, None)

    async def take(self, sandbox_id: str, template: SnapshotFiles) -> VM | None:
        """The VMM claimed for ``sandbox_id``, if it waits for ``template``'s state and
        still runs. Otherwise it is killed (the template was replaced, or its QEMU
        died) before this returns: the sandbox's restore then makes the same work
        directory afresh, which the spare's removal must not race."""
        spare = self._claimed.pop(sandbox_id, None)
        if spare is None:
            return None
        reason = None
        if spare.template != template:
            reason = "its template was replaced"
        elif not spare.vm.is_running():
            reason = "its VMM has exited"
        if reason is None:
            return spare.vm
        log.info("spare VMM %s not used: %s", spare.sandbox_id, reason)
        await spare.vm.kill()
        return None

    def refill(
        self,
        driver: Driver,
        template: SnapshotFiles,
        shape: SpareShape,
        make_config: Callable[[str], VMConfig],
    ) -> None:
        """Make a spare of ``shape`` (after the refill delay; ``make_config`` gives the
        VM's config for a sandbox id) if creates asked for that shape, unless it has
        one, one is being made, the driver cannot, or ``max_spares`` shapes have one."""
        if (
            self._closed
            or shape not in self._wanted
            or not isinstance(driver, Prelaunching)
            or shape in self._ready
            or shape in self._filling
            or len(self._ready) + len(self._filling) >= self._max
        ):
            return
        task = asyncio.get_running_loop().create_task(
            self._fill(driver, template, shape, make_config)
        )
        self._filling[shape] = task
        task.add_done_callback(functools.partial(self._filled, shape))

    async def _fill(
        self,
        driver: Prelaunching,
        template: SnapshotFiles,
        shape: SpareShape,
        make_config: Callable[[str], VMConfig],
    ) -> None:
        await asyncio.sleep(self._refill_delay_s)
        sandbox_id = secrets.token_hex(self.id_bytes)
        started = time.perf_counter()
        try:
            vm = await driver.prelaunch(make_config(sandbox_id), template, load_state=True)
        except errors.EmberboxError as exc:
            log.warning("spare VMM for %s: not started: %s", shape.image, exc.message)
            return
        except Exception:  # a bug must not end in an unretrieved task exception
            log.exception("spare VMM for %s: not started", shape.image)
            return
        if self._closed:
            await vm.kill()
            return
        log.debug(
            "spare VMM %s for %s ready in %.0f ms",
            sandbox_id,
            shape.image,
            (time.perf_counter() - started) * 1000,
        )
        self._ready[shape] = Spare(sandbox_id, shape, template, vm)
        self._filled(shape, asyncio.current_task())  # made: a refill may start the next one

    def _filled(self, shape: SpareShape, task: asyncio.Task[Any] | None) -> None:
        """``task`` no longer makes ``shape``'s spare (unless a newer task does)."""
        if self._filling.get(shape) is task:
            del self._filling[shape]

    def _discard(self, spare: Spare, reason: str | None) -> None:
        if reason is not None:
            log.info("spare VMM %s not used: %s", spare.sandbox_id, reason)
        task = asyncio.get_running_loop().create_task(spare.vm.kill())
        self._doomed.add(task)
        task.add_done_callback(self._doomed.discard)

    async def drop(self, image: str) -> None:
        """Kill the spares of ``image`` (ready or being made): it was deleted, and a
        spare maps its template, which would keep the blob from being collected."""
        filling = [task for shape, task in self._filling.items() if shape.image == image]
        for task in filling:
            task.cancel()
        await asyncio.gather(*filling, return_exceptions=True)
        spares = [spare for shape, spare in self._ready.items() if shape.image == image]
        for spare in spares:
            del self._ready[spare.shape]
            await _kill_logged(spare)

    async def close(self) -> None:
        """Kill every spare (and stop making them). Idempotent; call shielded."""
        self._closed = True
        filling = list(self._filling.values())
        for task in filling:
            task.cancel()
        await asyncio.gather(*filling, return_exceptions=True)
        spares = [*self._ready.values(), *self._claimed.values()]
        self._ready.clear()
        self._claimed.clear()
        for spare in spares:
            await _kill_logged(spare)
        await asyncio.gather(*self._doomed, return_exceptions=True)


async def _kill_logged(spare: Spare) -> None:
    """Kill a spare's VMM; a failure is logged (the orphan sweep of the next start
    finds what is left), not raised into a delete or a shutdown."""
    try:
        await spare.vm.kill()
    except Exception:
        log.exception("spare VMM %s: kill failed", spare.sandbox_id)
