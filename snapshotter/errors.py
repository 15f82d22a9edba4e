"""Domain errors of the snapshotter, named after containerd's errdefs classes.

Code inside the daemon raises these (chained with `from` when they wrap another
exception); `service.py` turns them into gRPC status codes in one function, so
containerd's `errdefs.FromGRPC` sees exactly the class its own overlayfs
snapshotter would have returned. The subclasses keep containerd's names (no `Error`
suffix) so that the mapping reads one to one.
"""

from __future__ import annotations


class SnapshotterError(Exception):
    """Base of every error the snapshotter reports to containerd."""


class NotFound(SnapshotterError):
    """The snapshot (or its parent) does not exist."""


class AlreadyExists(SnapshotterError):
    """A snapshot of that key or name exists already."""


class FailedPrecondition(SnapshotterError):
    """The snapshot is in the wrong state: it has children, or it is not active."""


class InvalidArgument(SnapshotterError):
    """The request itself is wrong: bad filter, immutable field, uncommitted parent."""


class Unavailable(SnapshotterError):
    """A resource the snapshot needs (a remote layer, the store) cannot be reached now."""
