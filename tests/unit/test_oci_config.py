"""OCI layouts: the tagged manifest, its layers, and the config as ImageConfig defaults."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from emberbox.images import oci_config
from emberbox.images.oci import tool_message

CONFIG: dict[str, Any] = {
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "Env": ["PATH=/usr/bin:/bin", "FOO=bar=baz", "broken", "=x", "FOO2=", "PATH=/bin"],
        "WorkingDir": "/srv/app",
        "User": "1000:1000",
        "Labels": {"org.example": "yes"},
        "Entrypoint": ["/bin/tini", "--"],
        "Cmd": ["serve", "-v"],
    },
}


def test_config_maps_to_image_defaults() -> None:
    """Env (later entries win, malformed dropped), WorkingDir, User, Labels, and the
    command recorded; the userland is foreign."""
    config = oci_config.image_config(CONFIG)
    assert config.env == {"PATH": "/bin", "FOO": "bar=baz", "FOO2": ""}
    assert (config.workdir, config.user) == ("/srv/app", "1000:1000")
    assert config.labels == {"org.example": "yes"}
    assert config.cmd == ["/bin/tini", "--", "serve", "-v"]
    assert config.userland == "foreign"


def test_an_empty_config_gives_the_agent_defaults() -> None:
    """No config section: no env, the agent's cwd, root, no command."""
    config = oci_config.image_config({"os": "linux"})
    assert (config.env, config.workdir, config.user, config.cmd) == ({}, "", "", None)


def _blob(layout: Path, doc: dict[str, object]) -> str:
    data = json.dumps(doc).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}"


def test_read_layout_follows_the_tag_to_manifest_and_config(tmp_path: Path) -> None:
    """index.json's tagged entry -> manifest -> config blob; layers listed in order."""
    config_digest = _blob(tmp_path, CONFIG)
    layers = [
        {"digest": "sha256:" + "1" * 64, "size": 10},
        {"digest": "sha256:" + "2" * 64, "size": 20},
    ]
    manifest = {"schemaVersion": 2, "config": {"digest": config_digest}, "layers": layers}
    digest = _blob(tmp_path, manifest)
    other = _blob(tmp_path, {"schemaVersion": 2, "config": {"digest": config_digest}})
    index = {
        "manifests": [
            {"digest": other, "annotations": {oci_config.REF_NAME: "other"}},
            {"digest": digest, "annotations": {oci_config.REF_NAME: "image"}},
        ]
    }
    (tmp_path / "index.json").write_text(json.dumps(index))
    got_digest, got_manifest, got_config = oci_config.read_layout(tmp_path, "image")
    assert (got_digest, got_config) == (digest, CONFIG)
    assert [layer["size"] for layer in oci_config.layers(got_manifest)] == [10, 20]
    assert oci_config.layers(got_manifest)[1]["step"] == "OCI layer 2"


def test_untagged_single_manifest_and_bad_digests(tmp_path: Path) -> None:
    """One untagged manifest is taken; a missing tag among several, or a digest that is
    not a digest, is an ImageBuildError rather than a path outside the layout."""
    assert oci_config.manifest_descriptor({"manifests": [{"digest": "d"}]}, "x") == {"digest": "d"}
    with pytest.raises(Exception, match="no image tagged"):
        oci_config.manifest_descriptor({"manifests": [{"digest": "a"}, {"digest": "b"}]}, "x")
    with pytest.raises(Exception, match="unexpected digest"):
        oci_config.blob_path(tmp_path, "sha256:../../etc/passwd")


def test_tool_errors_are_reduced_to_their_message() -> None:
    """skopeo's logrus line becomes its msg (quotes unescaped); other output its tail."""
    line = (
        'time="2026-12-04T22:17:59Z" level=fatal msg="initializing source docker://h/x:y: '
        'Get \\"http://h/v2/\\": dial tcp: connect: connection refused"\n'
    )
    assert tool_message(line) == (
        'initializing source docker://h/x:y: Get "http://h/v2/": dial tcp: connect: '
        "connection refused"
    )
    assert tool_message("  plain failure\n") == "plain failure"
