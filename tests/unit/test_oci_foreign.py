"""The agent's own runtime for foreign images: its libraries, its start, the init's branch."""

from __future__ import annotations

import os
import subprocess
import sys

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


def test_run_as_switches_user_then_runs_the_image_program() -> None:
    """The setpriv stand-in for foreign roots: our loader and python (-I: no PYTHONHOME
    reaches the command), then uid, gid, name and the command; its code sets the ids and
    execs the program, 127 when there is none (run here with the host's python as the
    current user)."""
    argv = foreign.run_as_argv(1234, 1234, "")
    assert argv[:4] == foreign.agent_argv("x")[:4]
    assert argv[4:7] == ["-I", "-S", "-c"] and argv[8:] == ["1234", "1234", ""]
    code, ids = argv[7], [str(os.getuid()), str(os.getgid()), ""]
    run = [sys.executable, "-I", "-S", "-c", code, *ids]
    env = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run([*run, "sh", "-c", "id -u; exit 7"], env=env, capture_output=True)
    assert (done.returncode, done.stdout) == (7, f"{os.getuid()}\n".encode())
    missing = subprocess.run([*run, "no-such-program"], env=env, capture_output=True)
    assert missing.returncode == 127 and b"no-such-program" in missing.stderr
