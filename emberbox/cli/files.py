"""``emberbox cp SRC DST``: copy files and directories between this host and a sandbox.

One side is ``SANDBOX_ID:PATH`` (a path in the guest; the id or a unique prefix of it),
the other a local path, or ``-`` for stdin/stdout (one file). It follows ``docker cp``
(and ``cp -r``) both ways: a file or a directory copied onto an existing directory lands
inside it under its own name; onto a missing path it becomes that path; a source
directory written ``DIR/.`` gives its contents instead.
"""

from __future__ import annotations

import posixpath
import sys
from pathlib import Path
from typing import Annotated

import typer

from emberbox import errors
from emberbox.cli import ids
from emberbox.cli.common import ApiKey, Url, clean_errors, err_console
from emberbox.sdk import FileInfo, Sandbox

STDIO = "-"


def parse_remote(arg: str) -> tuple[str, str] | None:
    """``(sandbox_id, path)`` for ``ID:PATH``; None for a local path (one with a ``/``
    before any ``:``, or no ``:`` at all — write ``./a:b`` for a local ``a:b``)."""
    sandbox_id, sep, path = arg.partition(":")
    if not sep or not sandbox_id or "/" in sandbox_id or sandbox_id in (".", ".."):
        return None
    return sandbox_id, path or "/"


def cp(
    src: Annotated[str, typer.Argument(help="LOCAL, ID:PATH or - (stdin)", show_default=False)],
    dst: Annotated[str, typer.Argument(help="ID:PATH, LOCAL or - (stdout)", show_default=False)],
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Copy a file or a directory into a sandbox (LOCAL ID:PATH) or out of one (ID:PATH
    LOCAL), as docker cp does.

    A directory copied onto an existing directory lands inside it under its own name
    (./data to ID:/srv makes /srv/data); onto a missing path it becomes that path; DIR/.
    copies the contents of DIR. Paths in the sandbox are the guest's own; ID may be a
    unique prefix.

    Example: emberbox cp ./data 3f2a9c1b:/srv
    """
    source, target = parse_remote(src), parse_remote(dst)
    if (source is None) == (target is None):
        raise typer.BadParameter("exactly one of SRC and DST must be SANDBOX_ID:PATH")
    remote = target or source
    assert remote is not None
    with clean_errors():
        sandbox = Sandbox(ids.sandbox_id(remote[0], url, api_key), url=url, api_key=api_key)
    try:
        with clean_errors():
            if target is not None:
                what = upload(sandbox, src, target[1])
            else:
                what = download(sandbox, remote[1], dst)
    finally:
        sandbox.close()  # the HTTP connection only: the sandbox keeps running
    if what:
        err_console.print(what, markup=False)


def upload(sandbox: Sandbox, local: str, path: str) -> str:
    """Copy ``local`` (a file, a directory or ``-``) to ``path`` in the sandbox."""
    if local == STDIO:
        size = sandbox.files.write(path, sys.stdin.buffer)
        return f"copied {size} bytes to {sandbox.id}:{path}"
    source = Path(local)
    if not source.exists():
        raise errors.InvalidRequest(f"{local}: no such file or directory")
    contents = source.is_dir() and local.endswith(("/.", "/./"))  # docker's DIR/.
    if not contents and (path.endswith("/") or _remote_kind(sandbox, path) == "dir"):
        path = posixpath.join(path, source.resolve().name)
    if source.is_dir():
        entries = sandbox.files.upload_dir(source, path)
        return f"copied {entries} entries to {sandbox.id}:{path}"
    size = sandbox.files.upload(source, path, mode=source.stat().st_mode & 0o7777)
    return f"copied {size} bytes to {sandbox.id}:{path}"


def download(sandbox: Sandbox, path: str, local: str) -> str:
    """Copy ``path`` (a file or a directory) in the sandbox to ``local`` (or ``-``)."""
    kind = _remote_kind(sandbox, path)
    if kind is None:
        raise errors.NotFound(f"{sandbox.id}:{path}: no such file or directory")
    if local == STDIO:
        if kind == "dir":
            raise errors.InvalidRequest(f"{path} is a directory; it cannot go to stdout")
        sys.stdout.buffer.write(sandbox.files.read(path))
        sys.stdout.buffer.flush()
        return ""
    target = Path(local)
    if target.is_dir():
        target = target / (posixpath.basename(path.rstrip("/")) or "root")
    if kind == "dir":
        entries = sandbox.files.download_dir(path, target)
        return f"copied {entries} entries to {target}"
    size = sandbox.files.download(path, target)
    return f"copied {size} bytes to {target}"


def _remote_kind(sandbox: Sandbox, path: str) -> str | None:
    """``dir`` or ``file`` (a symlink counts as what it leads to); None when missing."""
    try:
        info: FileInfo = sandbox.files.stat(path)
    except errors.NotFound:
        return None
    if info.type != "symlink":
        return "dir" if info.type == "dir" else "file"
    try:
        sandbox.files.list(path)
    except errors.InvalidRequest:
        return "file"
    return "dir"
