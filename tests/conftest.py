"""Shared fixtures: isolated settings, the guest image, and sandbox factories that clean up.

Integration tests boot real VMs (QEMU; TCG on hosts without a usable KVM). Every VM a
test makes is killed by its factory even when the test fails, and a failed VM's console
tail is printed.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from emberbox.config import Settings
from emberbox.images.build import ImageBuilder
from emberbox.images.registry import ImageInfo
from tests.support.firecracker_bin import firecracker_binary, vm_skip_reason  # ../shared
from tests.support.paths import qemu_pids_under, short_tmp_dir


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def image_settings() -> Settings:
    """Settings whose cache (images, downloads) is the user's real one."""
    return Settings()


@pytest.fixture(scope="session")
def default_image(image_settings: Settings) -> ImageInfo:
    """The default image, built once if missing (a cache hit when it is up to date)."""
    info, _ = ImageBuilder(image_settings).build("default")
    return info


@pytest.fixture(scope="module")
def polyglot_image() -> ImageInfo:
    """The polyglot image, built once if missing (a cache hit when it is up to date)."""
    info, _ = ImageBuilder(Settings()).build("polyglot")
    return info


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = short_tmp_dir("eb-")
    yield path
    leftovers = qemu_pids_under(path)
    for pid in leftovers:
        subprocess.run(["kill", "-9", str(pid)], check=False)
    shutil.rmtree(path, ignore_errors=True)
    assert not leftovers, f"test left QEMU processes running: {leftovers}"


@pytest.fixture(params=["qemu", pytest.param("firecracker", marks=pytest.mark.firecracker)])
def vmm(request: pytest.FixtureRequest) -> str:
    """The VMM driver under test: every VM test runs once per driver."""
    name: str = request.param
    if name == "firecracker":
        image: ImageInfo = request.getfixturevalue("default_image")
        why = vm_skip_reason(request.getfixturevalue("image_settings"), image.files)
        if why is not None:
            pytest.skip(why)
    return name


@pytest.fixture
def settings(
    data_dir: Path, image_settings: Settings, default_image: ImageInfo, vmm: str
) -> Settings:
    """Settings with a private data dir, the shared image (and template) cache and the
    driver under test; no warm pool unless a test asks for one."""
    update = {"data_dir": data_dir, "vmm": vmm, "pool_size": 0}
    return image_settings.model_copy(update={**update, "firecracker_binary": firecracker_binary()})


@pytest.fixture
async def sandbox_factory(settings: Settings) -> AsyncIterator[object]:
    """Boots sandboxes for a test and kills every one of them afterwards."""
    from emberbox.service.vm.machine import SandboxVM

    made: list[SandboxVM] = []

    async def make(**kwargs: object) -> SandboxVM:
        sb = await SandboxVM.start(settings, **kwargs)  # type: ignore[arg-type]
        made.append(sb)
        return sb

    yield make
    for sb in made:
        if not sb.vm.is_running():
            print(f"--- console of {sb.id} ---\n{sb.vm.console_tail()}")
        await sb.kill()
