"""A build context: the tar a client sends, read safely, filtered by ``.dockerignore``,
and what a ``COPY`` takes from it.

Nothing of the context is extracted on the host: :class:`BuildContext` indexes the tar's
members (refusing absolute names, ``..``, links that point out of the context, devices,
and more entries or bytes than the caps), and :meth:`BuildContext.copy_tar` writes the
members a ``COPY`` selects into a new tar, named as they land under the destination
directory, for the builder VM's agent to extract. :meth:`BuildContext.digest` hashes
exactly those members (names, types, modes, link targets, contents): the ``COPY``
step's part of its cache key.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import posixpath
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from emberbox.errors import InvalidRequest

IGNORE_FILE = ".dockerignore"
MAX_ENTRIES = 100_000
MAX_BYTES = 1 << 30
_CHUNK = 1 << 20


class ContextError(InvalidRequest):
    """A context tar (or a COPY source in it) emberbox refuses."""


@dataclass(frozen=True)
class Limits:
    max_entries: int = MAX_ENTRIES
    max_bytes: int = MAX_BYTES  # file contents, summed


def clean_name(name: str) -> str:
    """A member name as a relative path without ``.`` parts; ContextError for absolute
    names and ``..``."""
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ContextError(f"context tar member {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ContextError(f"context tar member {name!r} goes up with ..")
    return "/".join(parts)


@dataclass(frozen=True)
class Selection:
    """What one COPY copies: each member's name under ``directory`` (absolute)."""

    directory: str
    members: list[tuple[str, tarfile.TarInfo]]


def _inside(target: str) -> bool:
    return target not in ("..",) and not target.startswith("../") and not target.startswith("/")


class BuildContext:
    """The members of a context tar, by clean relative name (open it with :meth:`open`;
    close it, or use ``with``)."""

    def __init__(self, tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> None:
        self._tar = tar
        self.members = members
        self.ignore = IgnoreRules.parse(self.read_text(IGNORE_FILE) or "")

    @classmethod
    def open(cls, path: Path, limits: Limits = Limits()) -> BuildContext:
        try:
            tar = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by close())
        except (OSError, tarfile.TarError) as exc:
            raise ContextError(f"the build context is not a readable tar: {exc}") from None
        try:
            return cls(tar, _index(tar, limits))
        except BaseException:
            tar.close()
            raise

    @classmethod
    def empty(cls) -> BuildContext:
        """No context at all (a Dockerfile without COPY needs none)."""
        buffer = io.BytesIO()
        tarfile.open(fileobj=buffer, mode="w").close()
        buffer.seek(0)
        return cls(tarfile.open(fileobj=buffer, mode="r"), {})

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> BuildContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_text(self, name: str) -> str | None:
        member = self.members.get(name)
        if member is None or not member.isreg():
            return None
        handle = self._tar.extractfile(member)
        return None if handle is None else handle.read().decode("utf-8", "replace")

    def visible(self, name: str) -> bool:
        return name != "" and not self.ignore.excludes(name)

    # -- COPY sources ------------------------------------------------------------------------

    def select(self, sources: Iterable[str], dest: str) -> Selection:
        """What a COPY of ``sources`` to ``dest`` (absolute) copies: the directory it
        lands in and each member's name under it. ``dest`` ending in "/" is a directory;
        otherwise a single file source is copied *as* ``dest``, a directory's contents
        into it."""
        chosen: dict[str, tarfile.TarInfo] = {}
        sources = list(sources)
        single_file = len(sources) == 1
        for source in sources:
            for top in self._match(source):
                member = self.members.get(top)
                single_file = single_file and member is not None and not member.isdir()
                self._take(top, chosen)
        if single_file and not dest.endswith("/"):
            (member,) = chosen.values()
            return Selection(posixpath.dirname(dest) or "/", [(posixpath.basename(dest), member)])
        return Selection(dest.rstrip("/") or "/", sorted(chosen.items()))

    def _match(self, source: str) -> list[str]:
        if source.startswith("/"):
            source = source.lstrip("/")  # Docker: context paths are relative to its root
        parts = [p for p in source.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ContextError(f"COPY source {source!r} is outside the build context")
        pattern = "/".join(parts)
        if pattern == "":
            return [""]
        if any(c in pattern for c in "*?["):
            found = [n for n in self.members if _path_match(pattern, n) and self.visible(n)]
        else:
            found = [pattern] if pattern in self.members or self._is_dir(pattern) else []
            found = [n for n in found if self.visible(n)]
        if not found:
            raise ContextError(f"COPY source {source!r} is not in the build context")
        return sorted(found)

    def _is_dir(self, name: str) -> bool:
        prefix = name + "/"
        return any(n.startswith(prefix) for n in self.members)

    def _take(self, top: str, chosen: dict[str, tarfile.TarInfo]) -> None:
        member = self.members.get(top)
        if top and member is not None and not member.isdir():
            chosen[posixpath.basename(top)] = member
            return
        prefix = top + "/" if top else ""
        for name, info in self.members.items():
            if name.startswith(prefix) and name != top and self.visible(name):
                chosen[name[len(prefix) :]] = info

    def digest(self, selection: Selection) -> str:
        """sha256 of what a COPY copies: names, types, modes, link targets, contents."""
        h = hashlib.sha256(selection.directory.encode() + b"\0")
        for name, member in selection.members:
            h.update(f"{name}\0{member.type!r}\0{member.mode:o}\0{member.linkname}\0".encode())
            if member.isreg():
                handle = self._tar.extractfile(member)
                assert handle is not None
                while chunk := handle.read(_CHUNK):
                    h.update(chunk)
            h.update(b"\1")
        return h.hexdigest()

    def copy_tar(
        self,
        selection: Selection,
        out: IO[bytes],
        *,
        chmod: int | None = None,
    ) -> int:
        """Write ``selection`` as a tar to ``out`` (names relative to the destination
        directory, owner root, ``chmod`` on files and directories); the member count."""
        written: dict[str, str] = {}  # context name -> name in the new tar (hard links)
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, member in selection.members:
                info = tarfile.TarInfo(name)
                info.type = member.type
                info.mode = chmod if chmod is not None else member.mode & 0o7777
                info.mtime = member.mtime
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                if member.issym():
                    info.linkname = member.linkname
                    tar.addfile(info)
                elif member.islnk():
                    target = written.get(clean_name(member.linkname))
                    if target is None:  # its target is not copied: copy the content
                        info.type = tarfile.REGTYPE
                        source = self.members[clean_name(member.linkname)]
                        info.size = source.size
                        tar.addfile(info, self._tar.extractfile(source))
                    else:
                        info.linkname = target
                        tar.addfile(info)
                elif member.isreg():
                    info.size = member.size
                    tar.addfile(info, self._tar.extractfile(member))
                else:
                    tar.addfile(info)
                written[clean_name(member.name)] = name
        return len(selection.members)


def _index(tar: tarfile.TarFile, limits: Limits) -> dict[str, tarfile.TarInfo]:
    members: dict[str, tarfile.TarInfo] = {}
    total = 0
    for member in tar:
        if len(members) >= limits.max_entries:
            raise ContextError(f"the build context has more than {limits.max_entries} entries")
        name = clean_name(member.name)
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise ContextError(f"context member {name!r} is not a file, directory or link")
        if member.issym():
            target = member.linkname
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
            if target.startswith("/") or not _inside(resolved):
                raise ContextError(f"context symlink {name!r} -> {target!r} points outside it")
        if member.islnk():
            target = clean_name(member.linkname)
            if target not in members:
                raise ContextError(f"context hard link {name!r} -> {target!r} points outside it")
        total += member.size if member.isreg() else 0
        if total > limits.max_bytes:
            raise ContextError(f"the build context is over {limits.max_bytes} bytes")
        if name:
            members[name] = member
    return members


# -- .dockerignore ------------------------------------------------------------------------------


def _path_match(pattern: str, name: str) -> bool:
    """Go's filepath.Match for one path: ``*`` and ``?`` never cross a ``/``."""
    pat_parts, name_parts = pattern.split("/"), name.split("/")
    if len(pat_parts) != len(name_parts):
        return False
    return all(fnmatch.fnmatchcase(n, p) for p, n in zip(pat_parts, name_parts, strict=True))


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern: Go path matching plus ``**`` for any number of dirs."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out.append("(?:.*/)?")
                i += 1
            else:
                out.append(".*")
            continue
        char = pattern[i]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", i)
            if end < 0:
                out.append(re.escape(char))
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                out.append(f"[{'^' + body[1:] if body.startswith('!') else body}]")
                i = end
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("^" + "".join(out) + "(?:/.*)?$")


@dataclass(frozen=True)
class IgnoreRules:
    """.dockerignore rules: the last pattern that matches a path decides; ``!pattern``
    re-includes; a pattern matching a directory excludes what is under it."""

    rules: tuple[tuple[bool, re.Pattern[str]], ...] = ()  # (exception, pattern)

    @classmethod
    def parse(cls, text: str) -> IgnoreRules:
        rules = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exception = line.startswith("!")
            line = line[1:].strip() if exception else line
            cleaned = posixpath.normpath(line.lstrip("/")) if line.strip("/") else ""
            if cleaned in ("", "."):
                continue
            rules.append((exception, _pattern_regex(cleaned)))
        return cls(tuple(rules))

    def excludes(self, name: str) -> bool:
        excluded = False
        for exception, pattern in self.rules:
            if pattern.match(name):
                excluded = not exception
        return excluded
