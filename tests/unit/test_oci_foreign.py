"""The agent's own runtime for foreign images: its libraries, its start, the init's branch."""

from __future__ import annotations

from emberbox.images import foreign
from emberbox.images.initramfs import render_init

LDD = """\tlinux-vdso.so.1 (0x00007ffd)
\tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f7cdbb89000)
\tlibgone.so.1 => not found
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f7cdb95d000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f7cdbc7d000)
"""


def test_ldd_output_gives_libraries_and_the_loader() -> None:
    """Resolved libraries by the name asked for, the loader under its own name; the vDSO
    and unresolved names are left out."""
    assert {k: str(v) for k, v in foreign.parse_ldd(LDD).items()} == {
        "libm.so.6": "/lib/x86_64-linux-gnu/libm.so.6",
        "libc.so.6": "/lib/x86_64-linux-gnu/libc.so.6",
        "ld-linux-x86-64.so.2": "/lib64/ld-linux-x86-64.so.2",
    }


def test_the_agent_starts_through_its_own_loader() -> None:
    """The loader and library path are /.emberbox's, python is ours, PYTHONHOME points
    the standard library there: nothing of the image's /lib is used."""
    argv = foreign.agent_argv("emberbox_guest")
    assert argv[:3] == ["/.emberbox/lib/ld-linux-x86-64.so.2", "--library-path", "/.emberbox/lib"]
    assert argv[3] == "/.emberbox/bin/python3"
    assert argv[-2:] == ["-m", "emberbox_guest"]
    assert foreign.agent_env() == {"PYTHONHOME": "/.emberbox", "PYTHONPATH": "/.emberbox/agent"}


def test_the_init_takes_the_foreign_branch_only_when_the_runtime_is_there() -> None:
    """The init execs the /.emberbox runtime when the root disk has it, else (our own
    images, unchanged) the image's /usr/bin/python3; both via switch_root."""
    init = render_init(["virtio_blk"])
    branch = init.index("if [ -x /newroot/.emberbox/bin/python3 ]; then")
    ours = init.index("exec switch_root /newroot /usr/bin/python3 -u -m emberbox_guest")
    assert branch < ours
    foreign_exec = init[branch:ours]
    assert "export PYTHONHOME=/.emberbox PYTHONPATH=/.emberbox/agent" in foreign_exec
    assert (
        "exec switch_root /newroot " + " ".join(foreign.agent_argv("emberbox_guest"))
        in foreign_exec
    )
