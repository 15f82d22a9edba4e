"""Images: references, where they are stored (registry, OCI layout, OCI archive) and their conversion."""
