"""Images as the service handles them: the registry with its usage, tenancy and quotas
(:mod:`.registry_service`), the image defaults applied to commands (:mod:`.defaults`),
and Dockerfile builds (:mod:`.build`)."""
