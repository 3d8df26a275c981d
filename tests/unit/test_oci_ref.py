"""OCI references: the transports taken, the skopeo source for each, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from emberbox.errors import InvalidRequest
from emberbox.images.oci_ref import check_local, parse_ref


@pytest.mark.parametrize(
    ("ref", "transport", "source"),
    [
        ("oci:/srv/layout:v1", "oci", "oci:/srv/layout:v1"),
        ("oci:/srv/layout", "oci", "oci:/srv/layout"),
        ("oci-archive:/tmp/img.tar:latest", "oci-archive", "oci-archive:/tmp/img.tar:latest"),
        ("docker-archive:/tmp/saved.tar", "docker-archive", "docker-archive:/tmp/saved.tar"),
        ("docker-archive:/t/s.tar:app/x:v1", "docker-archive", "docker-archive:/t/s.tar:app/x:v1"),
        ("docker://127.0.0.1:5000/busy/box:t", "docker", "docker://127.0.0.1:5000/busy/box:t"),
        ("127.0.0.1:5000/busy:t", "docker", "docker://127.0.0.1:5000/busy:t"),
        ("localhost:5000/x", "docker", "docker://localhost:5000/x:latest"),
        ("alpine", "docker", "docker://docker.io/library/alpine:latest"),
        ("alpine:3.19", "docker", "docker://docker.io/library/alpine:3.19"),
        ("ghcr.io/o/r:1", "docker", "docker://ghcr.io/o/r:1"),
        ("someone/tool:2", "docker", "docker://docker.io/someone/tool:2"),
    ],
)
def test_references_map_to_skopeo_sources(ref: str, transport: str, source: str) -> None:
    """Each accepted spelling becomes one transport and one explicit skopeo source."""
    parsed = parse_ref(ref)
    assert (parsed.transport, parsed.source) == (transport, source)


def test_only_loopback_registries_go_without_tls() -> None:
    """127.0.0.1, localhost and ::1 registries are spoken to over http; others need TLS."""
    assert parse_ref("127.0.0.1:5000/a:b").skopeo_source_flags() == ["--src-tls-verify=false"]
    assert parse_ref("[::1]:5000/a:b").skopeo_source_flags() == ["--src-tls-verify=false"]
    assert parse_ref("registry.example:5000/a:b").skopeo_source_flags() == []
    assert parse_ref("oci:/x").skopeo_source_flags() == []


def test_digest_references_are_kept() -> None:
    """A digest pins the image; no tag is added to it."""
    digest = "sha256:" + "ab" * 32
    assert parse_ref(f"ghcr.io/o/r@{digest}").source == f"docker://ghcr.io/o/r@{digest}"


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("dir:/x", "unknown transport"),
        ("containers-storage:alpine", "unknown transport"),
        ("http://registry/x", "unknown transport"),
        ("oci:relative/dir", "absolute path"),
        ("oci-archive:/a/../etc/x.tar", "'..'"),
        ("", "not an image reference"),
        ("has space", "not an image reference"),
        ("Upper/Case", "not a valid registry reference"),
        ("docker://", "not a valid registry reference"),
    ],
)
def test_bad_references_are_refused_by_name(ref: str, message: str) -> None:
    """Unknown transports, relative or escaping paths and malformed names: InvalidRequest."""
    with pytest.raises(InvalidRequest, match=message):
        parse_ref(ref)


def test_local_sources_must_exist(tmp_path: Path) -> None:
    """A missing archive, or a directory that is not an OCI layout, is named."""
    with pytest.raises(InvalidRequest, match="no such file"):
        check_local(parse_ref(f"oci-archive:{tmp_path}/missing.tar"))
    with pytest.raises(InvalidRequest, match="not an OCI image layout"):
        check_local(parse_ref(f"oci:{tmp_path}"))
    (tmp_path / "index.json").write_text("{}")
    check_local(parse_ref(f"oci:{tmp_path}:v1"))
    check_local(parse_ref("docker://127.0.0.1:5000/a:b"))  # nothing local to check


def test_the_path_and_tag_of_local_references() -> None:
    """A layout's tag follows the last ':'; a docker-archive's reference (itself with a
    ':') follows the first; a path with no tag is the whole rest."""
    assert parse_ref("oci:/srv/layout:v1").path == Path("/srv/layout")
    assert parse_ref("oci-archive:/a/b.tar").path == Path("/a/b.tar")
    assert parse_ref("docker-archive:/t/s.tar:app/x:v1").path == Path("/t/s.tar")
