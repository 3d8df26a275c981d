"""How the service gets real VMs: restore the image's template snapshot, and boot cold
only when no template can be had (logged). Shares one driver, chosen once, and the
spare VMMs that restores without a network load their state into
(:mod:`~emberbox.service.vm.spares`)."""

from __future__ import annotations

import functools
import logging
from typing import Any

from emberbox import errors
from emberbox.config import Settings
from emberbox.images.registry import ImageRegistry
from emberbox.net.plan import NetworkPlan
from emberbox.service.vm.machine import SandboxVM, vm_config
from emberbox.service.vm.spares import SpareShape, SpareVMMs
from emberbox.service.vm.templates import Templates
from emberbox.vmm.base import Driver, Lifetime, SnapshotFiles
from emberbox.vmm.select import DriverCache

log = logging.getLogger(__name__)

# A restored guest answers in well under a second; waiting longer only delays the
# cold-boot fallback.
RESTORE_TIMEOUT_S = 10.0


class Launcher:
    """``start`` / ``restore`` / ``attach`` for the manager (see SandboxFactory & co)."""

    def __init__(self) -> None:
        self._drivers = DriverCache()
        self._templates: Templates | None = None
        self.spares = SpareVMMs()  # claimed by admission, closed by the manager's close

    def _driver(self, settings: Settings, image: str | None) -> Driver:
        """The one driver; the first call probes KVM with ``image``'s boot files."""
        name = image or settings.default_image
        return self._drivers.get(settings, lambda: ImageRegistry(settings).get(name).files)

    async def start(
        self,
        settings: Settings,
        *,
        image: str,
        vcpus: int,
        memory_mib: int,
        sandbox_id: str,
        lifetime: Lifetime,
        network: NetworkPlan | None = None,
    ) -> SandboxVM:
        """A sandbox from the template (its NIC gets ``network``'s TAP, or leads
        nowhere), or a cold boot when there is no template."""
        driver = self._driver(settings, image)
        shape: dict[str, Any] = {"image": image, "vcpus": vcpus, "memory_mib": memory_mib}
        if settings.templates:
            template = await self._template(settings, driver, **shape)
            if template is not None:
                # A spare serves (and is made for) restores without a network only.
                spare_shape = SpareShape(image, vcpus, memory_mib)
                spare = await self.spares.take(sandbox_id, template)
                if spare is not None and (network is not None or lifetime != "detached"):
                    await spare.kill()  # made for neither
                    spare = None
                restore = functools.partial(
                    SandboxVM.restore,
                    settings,
                    template,
                    **shape,
                    sandbox_id=sandbox_id,
                    lifetime=lifetime,
                    driver=driver,
                    timeout_s=RESTORE_TIMEOUT_S,
                    network=network,
                    reset_network=False,  # a template's NIC was never up
                )
                try:
                    try:
                        vm = await restore(prelaunched=spare)
                    except (errors.VMMError, errors.AgentError) as exc:
                        if spare is None:
                            raise
                        # The spare's fault (it is gone now), not the template's.
                        log.warning("sandbox %s: spare VMM failed (%s)", sandbox_id, exc.message)
                        vm = await restore()
                    vm.origin = "template"
                    if network is None and lifetime == "detached":
                        info = ImageRegistry(settings).get(image)
                        self.spares.refill(
                            driver,
                            template,
                            spare_shape,
                            lambda new_id: vm_config(
                                settings, info, new_id, vcpus, memory_mib, "detached"
                            ),
                        )
                    return vm
                except (errors.VMMError, errors.AgentError, errors.SnapshotMismatch) as exc:
                    log.warning(
                        "sandbox %s: the template %s did not restore (%s); discarding it "
                        "and booting cold",
                        sandbox_id,
                        template.directory.parent,
                        exc.message,
                    )
                    self._templates_for(settings).discard(template)
        self.spares.release(sandbox_id)  # claimed at admission, but no template to load
        log.info("sandbox %s: cold boot of image %s", sandbox_id, image)
        return await SandboxVM.start(
            settings,
            **shape,
            sandbox_id=sandbox_id,
            lifetime=lifetime,
            driver=driver,
            network=network,
        )

    async def restore(
        self, settings: Settings, snapshot: SnapshotFiles, **kwargs: Any
    ) -> SandboxVM:
        driver = self._driver(settings, kwargs.get("image"))
        return await SandboxVM.restore(settings, snapshot, driver=driver, **kwargs)

    async def attach(self, settings: Settings, **kwargs: Any) -> SandboxVM:
        driver = self._driver(settings, kwargs.get("image"))
        return await SandboxVM.attach(settings, driver=driver, **kwargs)

    def _templates_for(self, settings: Settings) -> Templates:
        if self._templates is None:
            self._templates = Templates(settings)
        return self._templates

    async def _template(
        self, settings: Settings, driver: Any, *, image: str, vcpus: int, memory_mib: int
    ) -> SnapshotFiles | None:
        info = ImageRegistry(settings).get(image)
        try:
            return await self._templates_for(settings).ensure(info, driver, vcpus, memory_mib)
        except errors.EmberboxError as exc:
            log.warning("no template for image %s (%s); booting cold", image, exc.message)
            return None


def spares_of(factory: object) -> SpareVMMs | None:
    """The spare VMMs behind ``factory`` when it is a :class:`Launcher`'s ``start``
    (None for another factory, such as a test's fake): admission claims them."""
    owner = getattr(factory, "__self__", None)
    return owner.spares if isinstance(owner, Launcher) else None
