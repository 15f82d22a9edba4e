"""Distribution (OCI registry) API client: auth, mirrors, blobs, manifests, range reads."""
