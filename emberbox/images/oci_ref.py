"""OCI image references: what a caller may name, and the ``skopeo copy`` source for it.

Pure (no I/O but the existence checks of :func:`check_local`). Accepted::

    oci:<dir>[:tag]                an OCI image layout directory
    oci-archive:<file>[:tag]       a tarball of one
    docker-archive:<file>[:ref]    a ``docker save`` tarball
    docker://host[:port]/repo[:tag|@sha256:…]   a registry
    host[:port]/repo[:tag]         the same without the scheme (``repo`` alone: Docker Hub)

A registry on a loopback address (127.0.0.1, localhost, ::1) is spoken to over plain
http (``--src-tls-verify=false``): that is a local test or mirror registry; any other
registry needs TLS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from emberbox.errors import InvalidRequest

LOCAL_TRANSPORTS = ("oci", "oci-archive", "docker-archive")
# skopeo's (and URL) transports we do not take: refused by name, not read as a repo.
OTHER_TRANSPORTS = frozenset(
    {"dir", "docker-daemon", "containers-storage", "ostree", "sif", "tarball", "atomic",
     "http", "https", "file", "ftp"}
)  # fmt: skip
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
MAX_REF_LEN = 1024
# distribution/reference: lowercase path components; a tag; or a digest.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"(?:[A-Za-z0-9.-]+|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?"
_REGISTRY_REF = re.compile(
    rf"^(?:(?P<host>{_HOST})/)?(?P<repo>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class OciRef:
    """A parsed reference: its transport and what skopeo copies from."""

    transport: str  # "oci" | "oci-archive" | "docker-archive" | "docker"
    source: str  # skopeo's source argument
    path: Path | None = None  # local transports: the file or directory
    host: str = ""  # registries: host[:port]
    tls_verify: bool = True

    @property
    def is_local(self) -> bool:
        return self.transport in LOCAL_TRANSPORTS

    def skopeo_source_flags(self) -> list[str]:
        return [] if self.tls_verify or self.is_local else ["--src-tls-verify=false"]


def _is_loopback(host: str) -> bool:
    bare = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
    return bare in LOOPBACK_HOSTS


def parse_ref(ref: str) -> OciRef:
    """The :class:`OciRef` for ``ref``; InvalidRequest naming what is wrong."""
    ref = ref.strip()
    if not ref or len(ref) > MAX_REF_LEN or any(c in ref for c in "\x00\n\r\t "):
        raise InvalidRequest(f"not an image reference: {ref[:80]!r}")
    scheme, sep, rest = ref.partition(":")
    if sep and scheme in LOCAL_TRANSPORTS:
        return _local(scheme, rest, ref)
    if ref.startswith("docker://"):
        return _registry(ref.removeprefix("docker://"), ref)
    if "://" in ref or (sep and scheme in OTHER_TRANSPORTS):
        raise InvalidRequest(
            f"unknown transport in {ref!r}: use oci:DIR[:TAG], oci-archive:FILE[:TAG], "
            "docker-archive:FILE, docker://HOST/REPO[:TAG] or HOST/REPO[:TAG]"
        )
    return _registry(ref, ref)


def _local(transport: str, rest: str, ref: str) -> OciRef:
    """``PATH[:TAG]`` (a tag has no ``:`` or ``/``); docker-archive's suffix is a whole
    reference (``name:tag``), so there the path ends at the first ``:``."""
    if transport == "docker-archive":
        path, _, tag = rest.partition(":")
    else:
        path, sep, tag = rest.rpartition(":")
        if not (sep and path and _TAG.match(tag)):
            path, tag = rest, ""
    if not path or not path.startswith("/"):
        raise InvalidRequest(f"{ref!r}: {transport}: needs an absolute path")
    if ".." in Path(path).parts:
        raise InvalidRequest(f"{ref!r}: the path may not contain '..'")
    source = f"{transport}:{path}" + (f":{tag}" if tag else "")
    return OciRef(transport, source, path=Path(path))


def _registry(name: str, ref: str) -> OciRef:
    match = _REGISTRY_REF.match(name)
    if match is None:
        raise InvalidRequest(f"not a valid registry reference: {ref!r}")
    host = match.group("host") or ""
    if host and "." not in host and ":" not in host and host != "localhost":
        # "library/alpine": the first component is a repository path, not a host.
        host, repo = "", f"{host}/{match.group('repo')}"
    else:
        repo = match.group("repo")
    suffix = (
        f"@{match.group('digest')}"
        if match.group("digest")
        else f":{match.group('tag') or 'latest'}"
    )
    if not host:  # Docker Hub, spelled out: skopeo would not resolve a short name
        repo = repo if "/" in repo else f"library/{repo}"
    full = f"{host or 'docker.io'}/{repo}{suffix}"
    loopback = bool(host) and _is_loopback(host)
    return OciRef("docker", f"docker://{full}", host=host or "docker.io", tls_verify=not loopback)


def check_local(ref: OciRef) -> None:
    """InvalidRequest unless a local reference's file or directory is there."""
    if ref.path is None:
        return
    if ref.transport == "oci" and not (ref.path / "index.json").is_file():
        raise InvalidRequest(f"{ref.path} is not an OCI image layout (no index.json)")
    if ref.transport != "oci" and not ref.path.is_file():
        raise InvalidRequest(f"{ref.path}: no such file")
