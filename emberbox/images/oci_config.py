"""Reading an OCI image layout: which manifest a tag names, its layers, its config.

Pure functions over the layout's JSON (index.json, the manifest and config blobs), so
the mapping from an OCI config to emberbox's :class:`ImageConfig` is unit-tested
without skopeo or umoci.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from emberbox.errors import ImageBuildError
from emberbox.images.registry import ImageConfig

REF_NAME = "org.opencontainers.image.ref.name"
_DIGEST_ALGOS = ("sha256", "sha512")


def blob_path(layout: Path, digest: str) -> Path:
    algo, _, hexpart = digest.partition(":")
    if algo not in _DIGEST_ALGOS or not hexpart.isalnum():
        raise ImageBuildError(f"unexpected digest {digest!r} in the OCI layout")
    return layout / "blobs" / algo / hexpart


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ImageBuildError(f"unreadable OCI layout file {path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise ImageBuildError(f"OCI layout file {path.name} is not a JSON object")
    return data


def manifest_descriptor(index: Mapping[str, Any], tag: str) -> dict[str, Any]:
    """The index entry tagged ``tag`` (the only one when there is one and it is untagged)."""
    manifests = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
    tagged = [m for m in manifests if (m.get("annotations") or {}).get(REF_NAME) == tag]
    if tagged:
        return tagged[0]
    if len(manifests) == 1:
        return manifests[0]
    raise ImageBuildError(f"no image tagged {tag!r} in the OCI layout")


def env_dict(env: object) -> dict[str, str]:
    """OCI ``Env`` (``["K=V", ...]``) as a dict; later entries win, malformed ones go."""
    out: dict[str, str] = {}
    if isinstance(env, list):
        for item in env:
            if isinstance(item, str) and "=" in item and not item.startswith("="):
                key, _, value = item.partition("=")
                out[key] = value
    return out


def image_config(config_blob: Mapping[str, Any]) -> ImageConfig:
    """The image's defaults from its OCI config: Env, WorkingDir, User, Labels and
    Entrypoint + Cmd (recorded only); the userland is foreign (the agent brings its own)."""
    cfg = config_blob.get("config") or {}
    if not isinstance(cfg, Mapping):
        cfg = {}
    labels = cfg.get("Labels") or {}
    entry = cfg.get("Entrypoint") or []
    cmd = cfg.get("Cmd") or []
    command = [str(c) for c in (*entry, *cmd)] if isinstance(entry, list) and isinstance(
        cmd, list
    ) else []  # fmt: skip
    return ImageConfig(
        env=env_dict(cfg.get("Env")),
        workdir=str(cfg.get("WorkingDir") or ""),
        user=str(cfg.get("User") or ""),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {},
        cmd=command or None,
        userland="foreign",
    )


def layers(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The manifest's layers as the registry records them (digest, size, step)."""
    out = []
    for i, layer in enumerate(manifest.get("layers") or []):
        if isinstance(layer, Mapping):
            out.append(
                {
                    "digest": str(layer.get("digest", "")),
                    "size": int(layer.get("size") or 0),
                    "step": f"OCI layer {i + 1}",
                }
            )
    return out


def read_layout(layout: Path, tag: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The manifest digest, the manifest and the config blob of ``tag`` in ``layout``."""
    descriptor = manifest_descriptor(read_json(layout / "index.json"), tag)
    digest = str(descriptor.get("digest", ""))
    manifest = read_json(blob_path(layout, digest))
    config_digest = str((manifest.get("config") or {}).get("digest", ""))
    return digest, manifest, read_json(blob_path(layout, config_digest))
