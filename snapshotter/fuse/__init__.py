"""The FUSE process: serves every lazy layer read-only from its TOC, apart from the gRPC service."""

from snapshotter.fuse import kernelcaps

kernelcaps.load()  # before anything imports pyfuse3
