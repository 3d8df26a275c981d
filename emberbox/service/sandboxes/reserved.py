"""Metadata keys the server keeps for itself (prefix ``emberbox.``): the E2B front keeps
a sandbox's E2B data, its envd access token among it, under ``emberbox.e2b``. No API
shows them, and a create through the native API cannot set them."""

from __future__ import annotations

from collections.abc import Mapping

RESERVED_PREFIX = "emberbox."


def public_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """``metadata`` without the reserved keys."""
    return {k: v for k, v in metadata.items() if not k.startswith(RESERVED_PREFIX)}
