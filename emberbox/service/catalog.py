"""The images the service starts sandboxes from, as the API lists and resolves them.

The registry itself is :mod:`emberbox.images.registry`; the API names it through the
service (the layer rule in docs/architecture.md: the API calls the service only).
:func:`resolve_ref` turns the image name a tenant asked for into the ref a sandbox
records (``tenants/<id>/<name>`` for the tenant's own image, the name for a shared one).
"""

from __future__ import annotations

from emberbox.images.registry import ImageConfig, ImageInfo, ImageRegistry, display_name
from emberbox.service.sandboxes.handles import ImageCatalog


def resolve_ref(images: ImageCatalog, name: str, tenant_id: str) -> str:
    """The ref of image ``name`` as ``tenant_id`` sees it (ImageNotFound otherwise).

    A catalog that knows no tenants (a test's fake) resolves names as they are.
    """
    if isinstance(images, ImageRegistry):
        return images.get(name, tenant=tenant_id).ref
    images.get(name)
    return name


__all__ = ["ImageConfig", "ImageInfo", "ImageRegistry", "display_name", "resolve_ref"]
