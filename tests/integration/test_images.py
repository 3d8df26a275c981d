"""Image builds: real apt, mmdebstrap and mkfs; a second build with the same inputs is a hit."""

from __future__ import annotations

import subprocess

from emberbox.config import Settings
from emberbox.images.build import AGENT_INSTALL_DIR, ImageBuilder, agent_files
from emberbox.images.registry import ImageInfo


def test_rebuild_with_same_inputs_is_a_cache_hit(
    image_settings: Settings, default_image: ImageInfo
) -> None:
    """Building again changes nothing and says so; the manifest records the inputs."""
    steps: list[str] = []
    info, cached = ImageBuilder(image_settings, steps.append).build("default")
    assert cached
    assert info.directory == default_image.directory
    assert steps == ["resolving the kernel package"]
    inputs = info.manifest["inputs"]
    assert inputs["kernel_package"]["name"].startswith("linux-image-")
    assert set(inputs["agent_sha256"]) == set(agent_files())
    assert {"__main__.py", "agent.py", "protocol.py"} <= set(inputs["agent_sha256"])


def test_image_holds_kernel_vmlinux_initramfs_and_ext4(default_image: ImageInfo) -> None:
    """The build kept the bzImage and the ELF vmlinux, and the rootfs is ext4 with the
    agent's package (every module of it) where the initramfs runs it."""
    files = default_image.files
    assert files.kernel.read_bytes()[0x202:0x206] == b"HdrS"
    assert files.vmlinux.read_bytes()[:4] == b"\x7fELF"
    assert "virtio_ring" in default_image.manifest["modules"]
    listing = subprocess.run(
        ["debugfs", "-R", f"ls -l {AGENT_INSTALL_DIR}", str(files.rootfs)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert set(agent_files()) <= set(listing.split())
