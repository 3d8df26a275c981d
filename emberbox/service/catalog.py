"""The images the service starts sandboxes from, as the API lists and resolves them.

The registry itself is :mod:`emberbox.images.registry`; the API names it through the
service (the layer rule in docs/architecture.md: the API calls the service only).
:func:`resolve_ref` turns the image name a tenant asked for into the ref a sandbox
records (``tenants/<id>/<name>`` for the tenant's own image, the name for a shared one).
"""

from __future__ import annotations

from emberbox.config import Settings
from emberbox.images.registry import ImageConfig, ImageInfo, ImageRegistry, display_name
from emberbox.service.sandboxes.handles import ImageCatalog


def image_pool_settings(settings: Settings) -> list[Settings]:
    """Settings for one more warm pool per ``pool_images`` entry (image name or ref ->
    VMs): the pool's image is that settings' ``default_image``, in the default shape;
    together the pools stay within ``pool_memory_budget_mib`` (the default pool first)."""
    budget = settings.pool_memory_budget_mib
    budget -= min(settings.pool_size, budget // max(1, settings.default_memory_mib)) * (
        settings.default_memory_mib
    )
    found = []
    for image, size in sorted(settings.pool_images.items()):
        if size <= 0 or image == settings.default_image:
            continue
        found.append(
            settings.model_copy(
                update={"default_image": image, "pool_size": size, "pool_memory_budget_mib": budget}
            )
        )
        budget -= min(size, budget // max(1, settings.default_memory_mib)) * (
            settings.default_memory_mib
        )
    return found


def resolve_ref(images: ImageCatalog, name: str, tenant_id: str) -> str:
    """The ref of image ``name`` as ``tenant_id`` sees it (ImageNotFound otherwise).

    A catalog that knows no tenants (a test's fake) resolves names as they are.
    """
    if isinstance(images, ImageRegistry):
        return images.get(name, tenant=tenant_id).ref
    images.get(name)
    return name


__all__ = [
    "ImageConfig",
    "ImageInfo",
    "ImageRegistry",
    "display_name",
    "image_pool_settings",
    "resolve_ref",
]
