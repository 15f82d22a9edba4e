"""Test helpers that start real components: images, registry, containerd. Never shipped."""
