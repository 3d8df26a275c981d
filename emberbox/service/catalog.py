"""The images the service starts sandboxes from, as the API lists and resolves them.

The registry itself is :mod:`emberbox.images.registry`; the API names it through the
service (the layer rule in docs/architecture.md: the API calls the service only).
"""

from __future__ import annotations

from emberbox.images.registry import ImageInfo, ImageRegistry

__all__ = ["ImageInfo", "ImageRegistry"]
