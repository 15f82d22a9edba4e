"""Images: references, stores (registry, OCI layout, OCI archive) and conversion."""
