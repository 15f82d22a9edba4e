"""zest: the containerd snapshotter daemon, its clients and the image tools (`zest` CLI)."""
