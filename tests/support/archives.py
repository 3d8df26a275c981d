"""Tar archives for tests: regular files only, built in memory."""

from __future__ import annotations

import io
import tarfile


def tar_of(members: dict[str, bytes]) -> bytes:
    """An uncompressed tar holding ``members`` (path inside the tar -> content)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
