"""A warm Python: an interpreter started (and its common modules imported) ahead of time,
which forks one child per program it is sent (standard library only).

The agent starts it as root with ``python3 warm_zygote.py FD`` (see :mod:`.warm`), FD
being its end of a ``SOCK_SEQPACKET`` pair, before the template snapshot is taken, so
that every clone of the template holds it already started. It answers ``ready``, then
takes one message per program: a JSON object and the fds ``[stdin, stdout, stderr,
status]`` (+ ``cgroup.procs`` of the run's group when it is limited). It forks; the
child becomes the program the way ``setpriv ... python3 main.py`` would have run it
(own session, the cgroup joined, the fds as 0/1/2, cwd, groups cleared, gid/uid,
``PR_SET_NO_NEW_PRIVS``, the environment replaced) and runs the script as
``__main__``. The zygote writes ``pid N`` then ``status S`` (the raw wait status) on
the status fd and waits for the next message; end of file on its socket ends it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import socket
import sys
import types
from typing import Any

MAX_REQUEST = 1 << 17
MAX_FDS = 8
PR_SET_NO_NEW_PRIVS = 38
SETUP_FAILED = 126
# What a one-shot program commonly imports, imported once in the zygote.
PRELOAD = (
    "collections", "functools", "itertools", "math", "re", "json", "string", "heapq",
    "bisect", "random", "time", "datetime", "typing", "dataclasses", "fractions",
    "decimal", "statistics", "traceback", "ctypes",
)  # fmt: skip

Request = dict[str, Any]


def preload() -> None:
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            __import__(name)


def serve(sock: socket.socket) -> tuple[Request, list[int]]:
    """The zygote's loop; returns only in a forked child, with its request and fds."""
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, MAX_FDS)
        except InterruptedError:
            continue
        if not msg:  # the agent is gone
            os._exit(0)
        if len(fds) < 4:
            for fd in fds:
                os.close(fd)
            continue
        request: Request = json.loads(msg)
        status_fd = fds[3]
        try:
            pid = os.fork()
        except OSError as exc:
            _report(status_fd, f"error {exc}\n")
            pid = -1
        if pid == 0:
            sock.close()
            return request, fds
        for fd in fds:
            if fd != status_fd:
                os.close(fd)
        if pid > 0:
            _report(status_fd, f"pid {pid}\n")
            _, status = os.waitpid(pid, 0)
            _report(status_fd, f"status {status}\n")
        os.close(status_fd)


def _report(fd: int, line: str) -> None:
    with contextlib.suppress(OSError):  # the agent gave up on this run
        os.write(fd, line.encode())


def become(request: Request, fds: list[int]) -> None:
    """In the child: take the run's session, cgroup, stdio, identity and environment."""
    os.close(fds[3])
    os.setsid()
    if len(fds) > 4:
        os.write(fds[4], b"0")  # into the run's cgroup before touching any more memory
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    os.closerange(3, 1 << 16)
    os.chdir(request["cwd"])
    if request.get("gid") is not None:
        os.setgroups([])
        os.setgid(int(request["gid"]))
    if request.get("uid") is not None:
        os.setuid(int(request["uid"]))
    no_new_privs()
    os.environ.clear()
    os.environ.update(request["env"])
    script = os.path.abspath(request["script"])
    sys.argv = [request["script"], *request["args"]]
    sys.path[0] = os.path.dirname(script)
    random = sys.modules.get("random")
    if random is not None:  # every clone of the template would draw the same numbers
        random.seed()


def no_new_privs() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def main_module(path: str) -> types.ModuleType:
    """A fresh ``__main__`` as the interpreter makes one for ``python3 path``."""
    from importlib.machinery import SourceFileLoader

    module = types.ModuleType("__main__")
    module.__file__ = path
    module.__cached__ = None  # type: ignore[attr-defined]
    module.__loader__ = SourceFileLoader("__main__", path)
    module.__builtins__ = __builtins__  # type: ignore[attr-defined]
    sys.modules["__main__"] = module
    return module


def run_script(path: str) -> None:
    """Runs ``path`` as ``__main__``; an uncaught exception is printed as the interpreter
    prints it (without this frame) and exits 1."""
    module = main_module(path)
    try:
        with open(path, "rb") as f:
            code = compile(f.read(), path, "exec", dont_inherit=True)
        exec(code, module.__dict__)  # noqa: S102 (the caller's program, in its sandbox)
    except SystemExit:
        raise
    except BaseException as exc:
        tb = exc.__traceback__
        exc.__traceback__ = tb = tb.tb_next if tb is not None else None  # not our frame
        sys.excepthook(type(exc), exc, tb)
        raise SystemExit(1) from None


def child_main(request: Request, fds: list[int]) -> None:
    try:
        become(request, fds)
    except BaseException as exc:
        os.write(2, f"emberbox: the warm runtime could not start the program: {exc}\n".encode())
        os._exit(SETUP_FAILED)
    try:
        run_script(os.path.abspath(request["script"]))
        code = 0
    except SystemExit as exc:
        code = exit_code(exc)
    os._exit(finish(code))


def exit_code(exc: SystemExit) -> int:
    """The exit code the interpreter makes of an uncaught SystemExit (printing a
    non-integer code to stderr, as it does)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    print(exc.code, file=sys.stderr)
    return 1


def finish(code: int) -> int:
    """What the interpreter's exit does that a program can see: wait for its non-daemon
    threads, run its atexit functions, flush stdout and stderr (120 if that fails). The
    rest (freeing every object, which would copy the zygote's whole heap page by page)
    is skipped: the process ends with ``os._exit``."""
    threading = sys.modules.get("threading")
    if threading is not None:
        threading._shutdown()
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            if code == 0:
                code = 120
    return code


def main(argv: list[str]) -> None:
    sock = socket.socket(fileno=int(argv[1]))
    preload()
    gc.freeze()  # children's collections leave the zygote's objects (and pages) alone
    sock.send(b"ready")
    request, fds = serve(sock)
    child_main(request, fds)


if __name__ == "__main__":
    main(sys.argv)
