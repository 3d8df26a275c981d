"""What :class:`~emberbox.sdk.Images` and :class:`~emberbox.sdk.AsyncImages` share: the
build context as a tar (``.dockerignore`` honoured, made on the client), the calls, and
how a build's NDJSON answer becomes events and a result.

The tar holds the context's files with their modes; symlinks stay symlinks (never
followed), and anything that is not a file, directory or symlink is left out. The
Dockerfile is always sent (also when ``.dockerignore`` names it, as Docker does); one
outside the context is added as :data:`OUTSIDE_DOCKERFILE`.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from emberbox import errors
from emberbox.models.images import BuildEvent, ImageDeleted, ImageDetail
from emberbox.sdk._calls import Call, error_from_body, parse, raise_for_error

BUILD_WAIT_S = 4 * 3600.0  # between two events a RUN may be silent for long
IMPORT_WAIT_S = 3600.0
DELETE_WAIT_S = 120.0
OUTSIDE_DOCKERFILE = ".emberbox-Dockerfile"
CHUNK = 1 << 20


class ImageInfo(ImageDetail):
    """An image as the server describes it (``name``, ``size_bytes``, ``base``,
    ``layers``, ``env``/``workdir``/``user``, ``usage`` ...)."""


# --- .dockerignore -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern[str]
    keep: bool  # a "!" exception


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern (Go filepath.Match plus ``**``) as a regex on a relative path."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                out.append("(?:.*/)?")
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                if body.startswith("!"):  # fnmatch's negation; Go and regex spell it ^
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + "(?:/.*)?")


def ignore_rules(text: str) -> list[_Rule]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        if keep:
            line = line[1:].strip()
        line = os.path.normpath(line.lstrip("/")) if line.strip("/") else ""
        if not line or line == ".":
            continue
        rules.append(_Rule(_pattern_regex(line), keep))
    return rules


def ignored(path: str, rules: list[_Rule]) -> bool:
    """Whether ``path`` (relative, ``/``-separated) is left out: the last rule that
    matches it or a parent directory decides."""
    verdict = False
    for rule in rules:
        if rule.regex.fullmatch(path):
            verdict = not rule.keep
    return verdict


# --- the context tar -------------------------------------------------------------------------


def context_files(root: Path, rules: list[_Rule]) -> Iterator[tuple[str, Path]]:
    """(name in the tar, path) of everything sent, parents before children, sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        kept_dirs = []
        for name in dirnames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            path = here / name
            if path.is_symlink():
                if not ignored(rel, rules):
                    yield rel, path
                continue
            if ignored(rel, rules) and not any(r.keep for r in rules):
                continue  # nothing under it can come back
            kept_dirs.append(name)
            if not ignored(rel, rules):
                yield rel, path
        dirnames[:] = kept_dirs
        for name in sorted(filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if not ignored(rel, rules):
                yield rel, here / name


def write_context(context_dir: str | os.PathLike[str], dockerfile: str, out: IO[bytes]) -> str:
    """Write the context tar to ``out``; returns the Dockerfile's name inside it."""
    root = Path(context_dir)
    if not root.is_dir():
        raise errors.InvalidRequest(f"build context {root} is not a directory")
    ignore_file = root / ".dockerignore"
    rules = ignore_rules(ignore_file.read_text()) if ignore_file.is_file() else []
    docker_path = Path(dockerfile)
    if not docker_path.is_absolute():
        # Docker: -f is relative to the working directory; a bare name to the context.
        docker_path = docker_path if docker_path.exists() else root / dockerfile
    if not docker_path.is_file():
        raise errors.InvalidRequest(f"no Dockerfile at {docker_path}")
    try:
        inside = docker_path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        inside = None
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        sent: set[str] = set()
        for name, path in context_files(root, rules):
            _add(tar, path, name)
            sent.add(name)
        if inside is None:
            inside = OUTSIDE_DOCKERFILE
            _add(tar, docker_path, inside)
        elif inside not in sent:
            _add(tar, docker_path, inside)
    return inside


def _add(tar: tarfile.TarFile, path: Path, name: str) -> None:
    info = tar.gettarinfo(str(path), arcname=name)
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if info.isreg():
        with path.open("rb") as handle:
            tar.addfile(info, handle)
    elif info.isdir() or info.issym():
        tar.addfile(info)
    # sockets, devices and fifos are not part of a build context


def chunks(handle: IO[bytes]) -> Iterator[bytes]:
    handle.seek(0)
    while chunk := handle.read(CHUNK):
        yield chunk


def spooled_context(context_dir: str | os.PathLike[str], dockerfile: str) -> tuple[IO[bytes], str]:
    """The context tar in a temp file (the caller closes it), and the Dockerfile's name."""
    handle = tempfile.TemporaryFile()  # noqa: SIM115 (returned open: the caller closes it)
    try:
        inside = write_context(context_dir, dockerfile, handle)
    except BaseException:
        handle.close()
        raise
    return handle, inside


# --- calls -----------------------------------------------------------------------------


def build_call(
    name: str,
    dockerfile: str,
    content: Any,
    size: int,
    build_args: dict[str, str] | None,
    no_cache: bool,
) -> Call:
    params = [("name", name), ("dockerfile", dockerfile)]
    params += [("build_arg", f"{k}={v}") for k, v in (build_args or {}).items()]
    if no_cache:
        params.append(("no_cache", "true"))
    headers = {"Content-Type": "application/x-tar", "Content-Length": str(size)}
    return Call(
        "POST", "/v1/images", params=params, wait_s=BUILD_WAIT_S, content=content, headers=headers
    )


def import_call(ref: str, name: str) -> Call:
    return Call("POST", "/v1/images/import", json={"ref": ref, "name": name}, wait_s=IMPORT_WAIT_S)


def list_call() -> Call:
    return Call("GET", "/v1/images")


def get_call(name: str) -> Call:
    return Call("GET", f"/v1/images/{_quote(name)}")


def delete_call(name: str) -> Call:
    return Call("DELETE", f"/v1/images/{_quote(name)}", wait_s=DELETE_WAIT_S)


def _quote(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise errors.InvalidRequest(f"invalid image name {name!r}")
    return httpx.URL(f"/{name}").raw_path.decode()[1:]


# --- answers -----------------------------------------------------------------------------


def parse_event(line: str) -> BuildEvent | None:
    line = line.strip()
    if not line:
        return None
    try:
        raw = json.loads(line)
    except ValueError:
        return None
    return BuildEvent.from_dict(raw) if isinstance(raw, dict) and "kind" in raw else None


def failure(event: BuildEvent) -> errors.EmberboxError:
    """The error a build's ``error`` event stands for: the class its ``error`` names
    (QuotaExceeded, InvalidRequest ...), ImageBuildError by default; ``details`` carry
    the failed ``step``, its ``exit_code`` and ``log`` tail."""
    detail = {"type": event.error or "ImageBuildError", "message": event.message}
    exc = error_from_body(detail)
    exc.details.update(step=event.step, exit_code=event.exit_code, log=event.log)
    return exc


def parse_image(response: httpx.Response) -> ImageInfo:
    return parse(ImageInfo, response)


def parse_images(response: httpx.Response) -> list[ImageInfo]:
    raise_for_error(response)
    try:
        items = response.json()
    except ValueError as exc:
        raise errors.EmberboxError(f"unexpected answer from {response.request.url}") from exc
    if not isinstance(items, list):
        raise errors.EmberboxError(f"unexpected answer from {response.request.url}")
    return [ImageInfo.model_validate(item) for item in items]


def parse_deleted(response: httpx.Response) -> ImageDeleted:
    return parse(ImageDeleted, response)
